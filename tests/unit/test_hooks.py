from __future__ import annotations

import time
from pathlib import Path

import pytest

from deployer.apply.hooks import run_hooks
from deployer.protocol.errors import HookFailed
from deployer.protocol.manifest import Hook


def run(hooks: list[Hook], tmp_path: Path, **kwargs: object) -> str:
    return run_hooks(hooks, phase="post", env={"GREETING": "hello"}, cwd=tmp_path, default_timeout=10, **kwargs)  # type: ignore[arg-type]


def test_hooks_run_in_order_with_env_and_return_their_output(tmp_path: Path) -> None:
    output = run([Hook('echo "$GREETING one"'), Hook("echo two", env={"X": "y"}), Hook('echo "$X"')], tmp_path)
    assert output == "hello one\ntwo\n\n"


def test_the_first_failure_stops_the_list(tmp_path: Path) -> None:
    with pytest.raises(HookFailed, match="exited 3") as info:
        run([Hook("echo before; exit 3"), Hook(f"touch {tmp_path}/ran")], tmp_path)
    assert not (tmp_path / "ran").exists()
    assert "before" in info.value.output_tail


def test_stdin_carries_the_deploy_log(tmp_path: Path) -> None:
    run([Hook(f"cat > {tmp_path}/log")], tmp_path, stdin_text="line 1\nline 2\n")
    assert (tmp_path / "log").read_text() == "line 1\nline 2\n"


def test_a_hook_that_times_out_has_its_whole_process_group_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(HookFailed, match=r"timed out after 0\.5s"):
        run([Hook(f"sleep 300 & echo $! > {pidfile}; wait", timeout=0.5)], tmp_path)
    assert time.monotonic() - started < 20
    child = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"background child {child} of the timed-out hook is still alive")


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a reaper (containers often lack one)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
