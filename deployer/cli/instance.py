"""Commands that run on an instance: `deployer agent`, `deployer boot`, `deployer apply`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from deployer.apply.hooks import DEFAULT_HOOK_TIMEOUT_SECONDS
from deployer.apply.lock import DEFAULT_STATE_DIR
from deployer.cli.options import Aws, Store, aws_options, channel_options, log_options, store_options
from deployer.protocol.errors import ConfigError, DeployerError
from deployer.protocol.names import Channel

config_option = click.option(
    "--config", "config_path", required=True, type=click.Path(path_type=Path), help="Agent config YAML."
)


@click.command()
@config_option
@click.option(
    "--refresh-secrets",
    is_flag=True,
    help="Do not run the agent: apply each running release again with fresh secret values (after a "
    "rotation; its hooks restart the app), then exit. The running deploys are unchanged.",
)
@log_options
def agent(config_path: Path, refresh_secrets: bool) -> None:
    """Run the instance agent: boot (queue, subscription, replay), then long-poll until SIGTERM."""
    from deployer.agent.config import load_config
    from deployer.agent.loop import refresh, run
    from deployer.aws.clients import make_clients

    config = load_config(config_path)
    clients = make_clients(config.region, config.endpoint_url)
    if refresh_secrets:
        for channel in refresh(config, clients):
            click.echo(f"refreshed the secrets of {channel}")
        return
    run(config, clients)


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
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The agent's config: state_dir, root_dir, hook_timeout_seconds and allow_http_manifests come from it.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    help=f"Where the apply lock lives, shared with the agent [default: {DEFAULT_STATE_DIR}].",
)
@click.option("--root-dir", type=click.Path(path_type=Path), help="Prefix for the manifest's dest [default: /].")
@click.option("--release-id", help="Release directory name for the symlink strategy [default: from the checksum].")
@click.option(
    "--hook-timeout",
    type=float,
    help=f"Default per-hook timeout in seconds [default: {DEFAULT_HOOK_TIMEOUT_SECONDS:g}].",
)
@click.option(
    "--allow-http",
    is_flag=True,
    envvar="DEPLOYER_ALLOW_HTTP",
    help="Accept an http:// manifest URL (anyone on the path could replace it).",
)
@click.option(
    "--trust",
    "trust_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Apply only a signed deploy document these keys signed (with --document) [default: the config's trust_file].",
)
@click.option("--document", "document_url", help="s3:// URL of a signed pointer or history document to apply.")
@log_options
def apply_command(
    aws: Aws,
    manifest_url: str | None,
    config_path: Path | None,
    release_id: str | None,
    allow_http: bool,
    trust_path: Path | None,
    document_url: str | None,
    **paths: Any,
) -> None:
    """Apply one manifest now, like stretcher: `echo s3://bucket/manifest.yml | deployer apply`.

    With --trust (or a config with a trust_file) the input must be a signed deploy document
    (--document, or its URL on stdin), verified as an agent verifies it; a bare manifest URL is
    then refused, since nothing signs a manifest on its own.
    """
    from deployer.agent.config import load_config
    from deployer.apply.oneshot import apply_manifest_url, manifest_url_from_stdin
    from deployer.aws.clients import make_clients
    from deployer.aws.secrets import SecretReader

    config = load_config(config_path) if config_path else None
    state_dir = paths["state_dir"] or (config.state_dir if config else DEFAULT_STATE_DIR)
    root_dir = paths["root_dir"] or (config.root_dir if config else Path("/"))
    hook_timeout = paths["hook_timeout"] or (config.hook_timeout_seconds if config else DEFAULT_HOOK_TIMEOUT_SECONDS)
    trust_file = trust_path or (config.trust_file if config else None)
    if trust_file is not None and manifest_url:
        raise ConfigError("--manifest cannot be used with a trust file: apply a signed --document instead")
    url = document_url or manifest_url or manifest_url_from_stdin(sys.stdin.read())
    if url is None:
        click.echo("no event on stdin; nothing to apply", err=True)
        return
    # S3 redirects a GetObject to the bucket's region, so any region will do when none is set.
    region = aws.region or (config.region if config else None) or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = aws.endpoint_url or (config.endpoint_url if config else None)
    clients = make_clients(region, endpoint)
    secrets = SecretReader(region, endpoint)
    if trust_file is not None:
        from deployer.agent.trust_store import load_trust_file
        from deployer.apply.oneshot import apply_signed_document

        apply_signed_document(
            url,
            trust=load_trust_file(trust_file),
            s3=clients.s3,
            root_dir=root_dir,
            state_dir=state_dir,
            hook_timeout=hook_timeout,
            secrets=secrets,
        )
        return
    if document_url:
        raise ConfigError(
            "--document needs --trust (or a config with trust_file): a document is applied only when verified"
        )
    apply_manifest_url(
        url,
        s3=clients.s3,
        root_dir=root_dir,
        state_dir=state_dir,
        hook_timeout=hook_timeout,
        release_id=release_id,
        allow_http=allow_http or bool(config and config.allow_http_manifests),
        secrets=secrets,
    )


@click.command("seed")
@store_options
@channel_options
@click.option("--release-id", help="The release to bake in [default: the channel's current one].")
@click.option(
    "--root-dir",
    type=click.Path(path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Prefix for the manifest's dest (the image's root on a Packer builder).",
)
@log_options
def seed_command(store: Store, channel: Channel, release_id: str | None, root_dir: Path) -> None:
    """Bake a release into an image: its verified files and record under releases/, nothing else.

    For a Packer builder: no queue, subscription, report, state or hook. An instance from the
    image reuses the release without downloading it while a deploy still names it (checked by
    checksum); its hooks run at boot as for any deploy.
    """
    from deployer.apply.seed import seed

    seeded = seed(
        store.clients.s3, store.bucket, store.layout, channel, root_dir=root_dir.absolute(), release_id=release_id
    )
    what = "already there" if seeded.reused else "downloaded and verified"
    click.echo(f"seeded {channel} release {seeded.release_id} into {seeded.release_dir} ({what})")


COMMANDS = (agent, boot, apply_command, seed_command)
