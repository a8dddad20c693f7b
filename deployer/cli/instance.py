"""Commands that run on an instance: `deployer agent`, `deployer boot`, `deployer apply`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from deployer.apply.hooks import DEFAULT_HOOK_TIMEOUT_SECONDS
from deployer.apply.lock import DEFAULT_STATE_DIR
from deployer.cli.options import Aws, aws_options, log_options
from deployer.protocol.errors import DeployerError

config_option = click.option(
    "--config", "config_path", required=True, type=click.Path(path_type=Path), help="Agent config YAML."
)


@click.command()
@config_option
@log_options
def agent(config_path: Path) -> None:
    """Run the instance agent: boot (queue, subscription, replay), then long-poll until SIGTERM."""
    from deployer.agent.config import load_config
    from deployer.agent.loop import run
    from deployer.aws.clients import make_clients

    config = load_config(config_path)
    run(config, make_clients(config.region, config.endpoint_url))


@click.command()
@config_option
@log_options
def boot(config_path: Path) -> None:
    """One-shot for cloud-init: ensure queue + subscription, replay the pointers, exit.

    Exits non-zero if any component is not on its channel's latest release afterwards.
    """
    from deployer.agent.config import load_config
    from deployer.agent.loop import boot as boot_agent
    from deployer.agent.shutdown import Shutdown
    from deployer.aws.clients import make_clients
    from deployer.protocol.report import FAILING_STATES

    config = load_config(config_path)
    booted = boot_agent(
        config, make_clients(config.region, config.endpoint_url), Shutdown(config.shutdown_grace_seconds)
    )
    bad = {name: state.value for name, state in booted.reporter.states().items() if state in FAILING_STATES}
    if bad:
        raise DeployerError(f"boot replay left components failing: {bad}")


@click.command("apply")
@aws_options
@click.option(
    "--manifest",
    "manifest_url",
    help="Manifest URL (s3://, https://, file://); else read from stdin as stretcher does.",
)
@click.option(
    "--state-dir",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the apply lock lives (shared with the agent).",
)
@click.option(
    "--root-dir",
    default="/",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Prefix for the manifest's dest.",
)
@click.option("--release-id", help="Release directory name for the symlink strategy [default: from the checksum].")
@click.option(
    "--hook-timeout",
    default=DEFAULT_HOOK_TIMEOUT_SECONDS,
    show_default=True,
    help="Default per-hook timeout in seconds.",
)
@log_options
def apply_command(
    aws: Aws, manifest_url: str | None, state_dir: Path, root_dir: Path, release_id: str | None, hook_timeout: float
) -> None:
    """Apply one manifest now, like stretcher: `echo s3://bucket/manifest.yml | deployer apply`."""
    from deployer.apply.oneshot import apply_manifest_url, manifest_url_from_stdin
    from deployer.aws.clients import make_clients

    url = manifest_url or manifest_url_from_stdin(sys.stdin.read())
    if url is None:
        click.echo("no event on stdin; nothing to apply", err=True)
        return
    # S3 redirects a GetObject to the bucket's region, so any region will do when none is set.
    clients = make_clients(aws.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1", aws.endpoint_url)
    apply_manifest_url(
        url, s3=clients.s3, root_dir=root_dir, state_dir=state_dir, hook_timeout=hook_timeout, release_id=release_id
    )


COMMANDS = (agent, boot, apply_command)
