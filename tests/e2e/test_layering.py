"""The layers hold in a running process, not only in import-linter's graph."""

from __future__ import annotations

from collections.abc import Callable

from tests.support import AgentProcess, wait_until


def test_a_running_agent_never_loaded_any_publisher_module(start_agent: Callable[..., AgentProcess]) -> None:
    # PYTHONPROFILEIMPORTTIME makes the interpreter list every module it imports on stderr (the log).
    agent = start_agent(env={"PYTHONPROFILEIMPORTTIME": "1"})
    wait_until(lambda: bool(agent.events("agent_serving")), "the agent to serve")
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in agent.log_path.read_text().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "deployer.agent.loop" in imported  # the listing works
    assert not {name for name in imported if name == "publisher" or name.startswith("publisher.")}
    assert not {name for name in imported if name.startswith("deployer.local")}
