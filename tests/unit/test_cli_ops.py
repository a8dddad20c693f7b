"""The operations commands' surface: shared --wait flags, documented exit codes."""

from __future__ import annotations

import importlib

import click
from click.testing import CliRunner

from deployer.cli import SECTIONS, main


def options(command: str) -> dict[str, click.Option]:
    found = main.get_command(click.Context(main), command)
    assert found is not None
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


def test_every_command_is_listed_under_the_module_that_defines_it_and_only_there() -> None:
    for module, listed in SECTIONS.items():
        defined = importlib.import_module(f"deployer.cli.{module}").COMMANDS
        assert tuple(command.name for command in defined) == listed, module
    assert main.list_commands(click.Context(main)) == sorted(name for names in SECTIONS.values() for name in names)


def test_an_unknown_command_is_named_in_the_error() -> None:
    result = CliRunner().invoke(main, ["pubish"])
    assert result.exit_code == 2
    assert "No such command 'pubish'" in result.output
