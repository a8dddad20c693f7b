"""Run manifest hooks: `sh -c` each command in order, the first failure stops the list.

Each hook runs in its own session so a timeout kills its whole process group (stretcher had
no timeouts, and a hung hook wedged the node forever).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

from deployer.protocol.errors import HookFailed, Interrupted
from deployer.protocol.manifest import Hook

#: A hook's timeout unless the manifest or the agent config says otherwise.
DEFAULT_HOOK_TIMEOUT_SECONDS = 600.0
#: How much hook output we keep for logs and status reports.
OUTPUT_TAIL_BYTES = 4096
#: After SIGTERM on timeout, how long the process group gets before SIGKILL.
KILL_GRACE_SECONDS = 5.0

log = structlog.get_logger(__name__)

#: Process groups of hooks running right now, so a shutdown can take them down with the agent.
_RUNNING: set[int] = set()


def kill_running_hooks() -> int:
    """SIGKILL every running hook's process group; returns how many there were."""
    running = list(_RUNNING)
    for pgid in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    return len(running)


def run_hooks(
    hooks: Sequence[Hook],
    *,
    phase: str,
    env: Mapping[str, str],
    cwd: Path,
    default_timeout: float,
    stdin_text: str | None = None,
    user: str | None = None,
    interrupt: threading.Event | None = None,
    redact: Callable[[str], str] = lambda text: text,
) -> str:
    """Run hooks in order; return their combined output tail; raise HookFailed on the first failure.

    A hook killed because the apply was abandoned at shutdown (`interrupt` set, see
    `kill_running_hooks`) raises Interrupted instead: its exit says nothing about the release.
    `redact` is applied to every output before it is logged, returned or raised (secrets a
    hook printed never leave it).
    """
    outputs: list[str] = []
    for index, hook in enumerate(hooks):
        if interrupt is not None and interrupt.is_set():
            raise Interrupted(f"{phase} hook #{index} not started: the apply was abandoned at shutdown")
        timeout = hook.timeout or default_timeout
        hook_env = {**os.environ, **env, **hook.env}
        log.info("hook_started", phase=phase, index=index, command=hook.run, timeout_s=timeout)
        code, output = _run_one(hook.run, hook_env, cwd, timeout, stdin_text, user)
        outputs.append(redact(output))
        tail = tail_of("".join(outputs))
        if code != 0 and interrupt is not None and interrupt.is_set():
            log.warning("hook_abandoned", phase=phase, index=index, command=hook.run, next="resumed after restart")
            raise Interrupted(f"{phase} hook #{index} was stopped by a shutdown: {hook.run}")
        if code is None:
            log.error("hook_timed_out", phase=phase, index=index, command=hook.run, timeout_s=timeout, output_tail=tail)
            raise HookFailed(f"{phase} hook #{index} timed out after {timeout:g}s: {hook.run}", tail)
        if code != 0:
            log.error("hook_failed", phase=phase, index=index, command=hook.run, exit_code=code, output_tail=tail)
            raise HookFailed(f"{phase} hook #{index} exited {code}: {hook.run}", tail)
        log.info("hook_succeeded", phase=phase, index=index, command=hook.run)
    return tail_of("".join(outputs))


def tail_of(text: str, limit: int = OUTPUT_TAIL_BYTES) -> str:
    return text[-limit:]


def _run_one(
    command: str, env: Mapping[str, str], cwd: Path, timeout: float, stdin_text: str | None, user: str | None
) -> tuple[int | None, str]:
    if user is not None:
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise HookFailed(f"run_as user {user!r} does not exist on this machine") from None
        if os.geteuid() not in (0, account.pw_uid):
            raise HookFailed(f"run_as {user!r} needs the agent to run as root (it runs as uid {os.geteuid()})")
        env = {**env, "HOME": account.pw_dir, "USER": user, "LOGNAME": user}
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        user=user,
        group=pwd.getpwnam(user).pw_gid if user is not None else None,
        extra_groups=[] if user is not None and os.geteuid() == 0 else None,
    )
    _RUNNING.add(proc.pid)  # start_new_session: the hook's pid is its process group id
    try:
        out, _ = proc.communicate(stdin_text.encode() if stdin_text is not None else None, timeout=timeout)
        return proc.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        out = _kill_group(proc)
        return None, out.decode(errors="replace")
    finally:
        _RUNNING.discard(proc.pid)


def _kill_group(proc: subprocess.Popen[bytes]) -> bytes:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            out, _ = proc.communicate(timeout=wait)
            return out or b""
        except subprocess.TimeoutExpired:
            continue
    return b""
