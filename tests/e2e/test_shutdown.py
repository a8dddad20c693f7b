"""SIGTERM: an idle agent exits 0 at once; one waiting for the apply lock hands its message back at
once; a long apply is abandoned after the grace period, safely."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from deployer.apply.lock import ApplyLock
from deployer.protocol.deploy import Deploy
from deployer.protocol.manifest import Hook
from tests.support import AgentProcess, Fleet, wait_until


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


def test_sigterm_while_waiting_for_the_apply_lock_exits_promptly_and_hands_the_message_back(
    fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent()
    # Another apply (`deployer apply`, say) holds the machine's lock for as long as it likes.
    with ApplyLock(agent.home / "state"):
        deploy = publish("queued behind the lock")
        wait_until(lambda: queue_counts(fleet, agent) == (0, 1), "the agent to take the message and wait")
        time.sleep(0.5)  # well inside the lock wait
        assert agent.process is not None
        began = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(10) == 0
        assert time.monotonic() - began < 3  # not the lock's hour, not systemd's SIGKILL
        assert agent.events("apply_interrupted")
        assert queue_counts(fleet, agent) == (1, 0)  # handed back: visible again at once
        agent.process = None
    restarted = agent.start()
    wait_until(lambda: restarted.on_seq(deploy.seq), "the restarted agent to apply it")
    assert restarted.hook_runs() == [deploy.deploy_id]


def queue_counts(fleet: Fleet, agent: AgentProcess) -> tuple[int, int]:
    """(visible, in flight) messages in the agent's queue."""
    attrs = fleet.clients.sqs.get_queue_attributes(QueueUrl=agent.queue_url(), AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])
