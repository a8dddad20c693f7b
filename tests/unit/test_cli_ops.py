"""The operations commands' surface: shared --wait flags, documented exit codes."""

from __future__ import annotations

import click
from click.testing import CliRunner

from deployer.cli import main


def options(command: str) -> dict[str, click.Option]:
    found = main.commands[command]
    return {p.name: p for p in found.params if isinstance(p, click.Option) and p.name}


def test_publish_and_rollback_take_the_same_wait_flags_with_the_same_defaults() -> None:
    names = ("wait", "timeout", "heartbeat_ttl", "poll_interval", "allow_lost")
    publish, rollback = options("publish"), options("rollback")
    for name in names:
        assert (publish[name].default, publish[name].opts) == (rollback[name].default, rollback[name].opts), name


def test_help_names_the_exit_codes_ci_can_branch_on() -> None:
    for command in ("publish", "rollback"):
        result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        assert "0 every expected instance converged" in text
        assert "4 some failed, were rejected or were lost" in text
        assert "5 timed out" in text
