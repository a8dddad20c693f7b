"""SIGTERM: an idle agent exits 0 at once; a long apply is abandoned after the grace period, safely."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from deployer.protocol.deploy import Deploy
from deployer.protocol.manifest import Hook
from tests.support import AgentProcess, wait_until


def test_sigterm_while_idle_exits_zero_within_one_poll(start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent()
    began = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - began < 5  # poll_wait_seconds is 1 here; 20 s at most in production
    assert agent.events("agent_stopped")


def test_sigterm_during_a_hung_hook_abandons_after_the_grace_period_and_the_restart_converges(
    tmp_path: Path, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent(shutdown_grace_seconds=1)
    marker = tmp_path / "hung-hook.pid"
    deploy = publish("after the hang", post=(Hook(f"if [ ! -f {marker} ]; then echo $$ > {marker}; sleep 120; fi"),))
    wait_until(lambda: marker.exists() and marker.read_text().strip() != "", "the hook to hang")
    hook_pid = int(marker.read_text())
    assert agent.process is not None
    began = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(15) == 0
    assert time.monotonic() - began < 10
    assert agent.events("apply_abandoned")[0]["hooks_killed"] == 1
    wait_until(lambda: not Path(f"/proc/{hook_pid}").exists() or _zombie(hook_pid), "the hung hook to be killed", 5)

    agent.start()
    wait_until(lambda: agent.on_seq(deploy.seq), "the restarted agent to resume the deploy")
    assert agent.hook_runs() == [deploy.deploy_id]
    assert agent.events("apply_resumed_after_crash")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
