"""The `deployer` command: the composition root, the only package that wires agent and publisher.

Commands are standalone click commands grouped by audience and attached here:
`instance` (agent, boot, apply), `ci` (init, publish, rollback, history), `fleet` (status, gc,
iam-policy), `rollouts` (rollout status/resume/abort), `keys` (keygen, trust) and `dev` (demo). Each imports what it runs inside its own body, so `deployer
agent` never loads the publisher and `deployer publish` never loads the agent.
"""

from __future__ import annotations

from typing import Any

import click

from deployer import __version__
from deployer.cli import ci, dev, fleet, instance, keys, rollouts
from deployer.protocol.errors import DeployerError


class _Group(click.Group):
    """Turns expected failures into one `error: …` line and a non-zero exit, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DeployerError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="deployer")
def main() -> None:
    """Pull-based deployer for EC2 Auto Scaling fleets (S3 + SNS + per-instance SQS)."""


for _command in (*instance.COMMANDS, *ci.COMMANDS, *rollouts.COMMANDS, *fleet.COMMANDS, *keys.COMMANDS, *dev.COMMANDS):
    main.add_command(_command)
