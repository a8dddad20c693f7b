"""The `deployer` command: the composition root, the only package that wires agent and publisher.

Commands are standalone click commands grouped by audience, one module each: `instance` (agent,
boot, apply, seed), `ci` (init, publish, rollback, history), `fleet` (status, gc, iam-policy,
doctor), `rollouts` (rollout status/resume/abort), `keys` (keygen, trust) and `dev` (demo). A
command's module is imported only when that command runs (`--help` lists them all, so it imports
them all), and each imports what it runs inside its own body: `deployer agent` never loads the
publisher, and `deployer publish` loads the ci commands alone — a CI job starts it for every
deploy, and the other modules' imports were ~10 % of a re-publish.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from deployer import __version__
from deployer.protocol.errors import DeployerError

#: Each audience's module under `deployer.cli` and the commands its COMMANDS holds
#: (`tests/unit/test_cli_ops.py` holds the two equal).
SECTIONS: dict[str, tuple[str, ...]] = {
    "instance": ("agent", "boot", "apply", "seed"),
    "ci": ("init", "publish", "rollback", "history"),
    "rollouts": ("rollout",),
    "fleet": ("status", "gc", "iam-policy", "doctor"),
    "keys": ("keygen", "trust"),
    "dev": ("demo",),
}
_MODULE_OF = {command: module for module, commands in SECTIONS.items() for command in commands}


class _Group(click.Group):
    """Loads a command's module when the command is asked for, and turns expected failures into
    one `error: …` line and a non-zero exit, not a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: ARG002 - click's signature
        return sorted(_MODULE_OF)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:  # noqa: ARG002 - as above
        if cmd_name not in self.commands and cmd_name in _MODULE_OF:
            module = importlib.import_module(f"{__name__}.{_MODULE_OF[cmd_name]}")
            for command in module.COMMANDS:
                self.add_command(command)
        return self.commands.get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DeployerError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="deployer")
def main() -> None:
    """Pull-based deployer for EC2 Auto Scaling fleets (S3 + SNS + per-instance SQS)."""
