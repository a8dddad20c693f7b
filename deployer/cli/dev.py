"""Commands for trying the deployer on one machine: `deployer demo` (the `emulator` extra)."""

from __future__ import annotations

from pathlib import Path

import click

from deployer.cli.options import quiet


@click.command()
@click.option("--agents", default=3, show_default=True, type=click.IntRange(1, 20), help="How many agents to start.")
@click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), help="Keep files here instead of a temp dir."
)
@click.option(
    "--endpoint-url",
    help="Use this emulator, already running on loopback (e.g. LocalStack), instead of starting moto.",
)
@quiet
def demo(agents: int, workdir: Path | None, endpoint_url: str | None) -> None:
    """Run the whole path on the embedded emulator (or --endpoint-url's): init, agents, two releases, a late joiner."""
    from deployer.local.demo import run_demo

    run_demo(agents=agents, workdir=workdir, echo=click.echo, endpoint_url=endpoint_url)


COMMANDS = (demo,)
