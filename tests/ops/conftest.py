"""Fleet-operations tests reuse the e2e agent fixtures, plus helpers for killing and templating."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from deployer.manifest import Commands, Hook, Manifest, SyncStrategy
from tests.conftest import BUCKET, Fleet
from tests.e2e.conftest import AgentProcess, publish, start_agent

__all__ = ["publish", "start_agent"]

#: Agents in these tests heartbeat every second, so --wait can tell live from lost quickly.
FAST_AGENT = {"heartbeat_interval_seconds": 1}


def template_file(path: Path, *post: str) -> Path:
    """A manifest template for `deployer publish --manifest` with the given post hooks."""
    manifest = Manifest(
        dest="/opt/api/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(post=tuple(Hook(run) for run in post)),
    )
    path.write_text(manifest.to_yaml())
    return path


def publish_args(fleet: Fleet, artifact: Path, *extra: str) -> list[str]:
    return [
        "publish", "--bucket", BUCKET, "--topic-arn", fleet.topic_arn,
        "--stage", "prod", "--role", "web", "--component", "api", "--artifact", str(artifact), *extra,
    ]  # fmt: skip


def kill_hard(agent: AgentProcess) -> None:
    """SIGKILL the agent (an instance dying) and take it out of the fixture's clean-stop check."""
    assert agent.process is not None
    agent.process.send_signal(signal.SIGKILL)
    agent.process.wait(timeout=10)
    agent.process = None


def kill_pid_file(path: Path) -> None:
    """Kill a hook process that recorded its pid (hooks run in their own session and outlive a SIGKILLed agent)."""
    if path.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(path.read_text().strip()), signal.SIGKILL)
