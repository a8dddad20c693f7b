"""The post-activation health check: a command or an HTTP GET, retried, each attempt time-bounded."""

from __future__ import annotations

import ipaddress
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from deployer.apply.hooks import run_hooks, tail_of
from deployer.backoff import pause
from deployer.protocol.errors import HealthCheckFailed, HookFailed
from deployer.protocol.manifest import HealthCheck, Hook

log = structlog.get_logger(__name__)

#: For a health check of this machine's own loopback: never through a proxy. An instance with
#: `HTTP_PROXY` and no `NO_PROXY` (urllib bypasses only what NO_PROXY names) would otherwise send
#: `GET http://127.0.0.1:8080/health` to the proxy, whose loopback is another machine's: the
#: check fails, or passes against whatever that machine serves there.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _on_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: the environment's proxy settings decide, as for any client
        return False


def run_health_check(
    check: HealthCheck,
    *,
    env: Mapping[str, str],
    cwd: Path,
    user: str | None = None,
    interrupt: threading.Event | None = None,
    redact: Callable[[str], str] = lambda text: text,
) -> str:
    """Return the last attempt's output once healthy; raise HealthCheckFailed after the last retry.

    An apply abandoned at shutdown (`interrupt` set) stops between attempts with Interrupted:
    a check cut short says nothing about the release.
    """
    last = ""
    for attempt in range(1, check.retries + 1):
        healthy, output = _attempt(check, env, cwd, user, interrupt, redact)
        last = redact(output)
        log.info("health_check", attempt=attempt, of=check.retries, healthy=healthy)
        if healthy:
            return last
        if attempt < check.retries:
            pause(check.interval, interrupt, "the next health check")
    what = check.command or f"GET {check.http}"
    raise HealthCheckFailed(f"health check failed {check.retries} time(s): {what}", tail_of(last))


def _attempt(
    check: HealthCheck,
    env: Mapping[str, str],
    cwd: Path,
    user: str | None,
    interrupt: threading.Event | None,
    redact: Callable[[str], str],
) -> tuple[bool, str]:
    if check.command is not None:
        try:
            output = run_hooks(
                [Hook(check.command, timeout=check.timeout)],
                phase="health",
                env=env,
                cwd=cwd,
                default_timeout=check.timeout,
                user=user,
                interrupt=interrupt,
                redact=redact,
            )
        except HookFailed as exc:
            return False, f"{exc}\n{exc.output_tail}"
        return True, output
    assert check.http is not None
    try:
        opener = _DIRECT.open if _on_loopback(check.http) else urllib.request.urlopen
        with opener(check.http, timeout=check.timeout) as response:
            body = response.read(4096).decode(errors="replace")
            return 200 <= response.status < 300, f"HTTP {response.status}: {body}"
    except urllib.error.HTTPError as exc:
        with exc:  # the error is the open response; close it once its body is read
            return False, f"HTTP {exc.code}: {exc.read(4096).decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"GET {check.http} failed: {exc}"
