"""The `deployer` command. Commands parse flags, build clients and call into the modules."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from deployer import __version__, logs
from deployer.aws import make_clients
from deployer.cli_wait import conclude, wait_options
from deployer.errors import DeployerError
from deployer.layout import Layout
from deployer.manifest import Manifest, SyncStrategy, parse_manifest
from deployer.protocol import Channel, check_name


class _Group(click.Group):
    """Turns expected failures into one `error: …` line and a non-zero exit, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DeployerError as exc:
            raise click.ClickException(str(exc)) from None
        except NoCredentialsError:
            raise click.ClickException("no AWS credentials found (environment, profile or instance role)") from None
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise click.ClickException(
                f"AWS {exc.operation_name} failed: {error.get('Code')}: {error.get('Message')}"
            ) from None
        except BotoCoreError as exc:
            raise click.ClickException(f"AWS call failed: {exc}") from None


def _aws_options(func: Any) -> Any:
    func = click.option(
        "--endpoint-url", envvar="AWS_ENDPOINT_URL", help="AWS endpoint (the emulator's URL in tests)."
    )(func)
    func = click.option("--region", envvar=["AWS_REGION", "AWS_DEFAULT_REGION"], help="AWS region.")(func)
    return func


def _store_options(func: Any) -> Any:
    func = click.option(
        "--prefix", envvar="DEPLOYER_PREFIX", default="deployer", show_default=True, help="Key prefix in the bucket."
    )(func)
    func = click.option(
        "--bucket", envvar="DEPLOYER_BUCKET", required=True, help="Release/status bucket [env DEPLOYER_BUCKET]."
    )(func)
    return func


def _log_options(func: Any) -> Any:
    func = click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))(func)
    func = click.option(
        "--log-json/--log-console", default=None, help="Log format (default: JSON unless stderr is a TTY)."
    )(func)
    return func


def _name(kind: str) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_name(kind, value)
        except DeployerError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="deployer")
def main() -> None:
    """Pull-based deployer for EC2 Auto Scaling fleets (S3 + SNS + per-instance SQS)."""


@main.command()
@_aws_options
@click.option("--bucket", envvar="DEPLOYER_BUCKET", required=True, help="Bucket to create [env DEPLOYER_BUCKET].")
@click.option(
    "--topic-name", envvar="DEPLOYER_TOPIC_NAME", default="deployer", show_default=True, help="SNS topic name."
)
def init(region: str | None, endpoint_url: str | None, bucket: str, topic_name: str) -> None:
    """Create the bucket and the SNS topic (idempotent) and print what exists."""
    from publisher.infra import init_resources

    logs.configure(level="warning")
    result = init_resources(make_clients(region, endpoint_url), bucket, topic_name)
    click.echo(f"bucket {result.bucket}: {'created' if result.bucket_created else 'already exists'}")
    click.echo(f"topic {result.topic_arn}: ready")
    click.echo(f"export DEPLOYER_BUCKET={result.bucket} DEPLOYER_TOPIC_ARN={result.topic_arn}")


@main.command()
@_aws_options
@_store_options
@click.option("--topic-arn", envvar="DEPLOYER_TOPIC_ARN", required=True, help="SNS topic [env DEPLOYER_TOPIC_ARN].")
@click.option("--stage", required=True, callback=_name("stage"))
@click.option("--role", required=True, callback=_name("role"))
@click.option("--component", required=True, callback=_name("component"))
@click.option(
    "--artifact",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A .tar.gz, or a directory to pack into one.",
)
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Manifest template (commands, dest, env, …); src and checksum are filled in.",
)
@click.option("--dest", help="Where the release goes on instances [default: /opt/<component>/current].")
@click.option(
    "--sync-strategy",
    type=click.Choice([s.value for s in SyncStrategy]),
    help="Override the template's strategy [default: symlink].",
)
@click.option("--release-id", help="Release id [default: <UTC time>-<commit or artifact hash>].")
@wait_options
def publish(
    region: str | None,
    endpoint_url: str | None,
    bucket: str,
    prefix: str,
    topic_arn: str,
    stage: str,
    role: str,
    component: str,
    artifact: Path,
    manifest_path: Path | None,
    dest: str | None,
    sync_strategy: str | None,
    release_id: str | None,
    wait: bool,
    timeout: float,
    heartbeat_ttl: float,
    poll_interval: float,
    allow_lost: bool,
) -> None:
    """Upload a release, move the channel pointer and notify the fleet.

    With --wait, then follow the instances that were live at publish time (status report lists
    the component, heartbeat younger than --heartbeat-ttl) until each converged, failed, was
    rejected or was lost; exit 0 all converged, 4 any failed/rejected/lost, 5 timeout.
    """
    import tempfile

    from publisher.pack import check_artifact, pack_directory
    from publisher.publish import Publisher, ci_origin

    logs.configure(level="warning")
    template = parse_manifest(manifest_path.read_bytes()) if manifest_path else Manifest()
    if manifest_path is None or sync_strategy:
        # Manifests we write default to symlink; a user's template keeps its own (stretcher: rsync).
        template = dataclasses.replace(template, sync_strategy=SyncStrategy(sync_strategy or "symlink"))
    if dest:
        template = dataclasses.replace(template, dest=dest)
    publisher = Publisher(make_clients(region, endpoint_url), bucket, topic_arn, Layout(prefix))
    with tempfile.TemporaryDirectory(prefix="deployer-publish-") as tmp:
        if artifact.is_dir():
            artifact = pack_directory(artifact, Path(tmp) / "artifact.tar.gz")
        check_artifact(artifact)
        result = publisher.publish(
            Channel(stage, role, component), artifact, template=template, release_id=release_id, origin=ci_origin()
        )
    deploy = result.deploy
    click.echo(
        f"published {deploy.channel} release {deploy.release_id} as seq {deploy.seq} (deploy {deploy.deploy_id})"
    )
    conclude(
        result,
        publisher.clients,
        bucket,
        prefix,
        wait=wait,
        timeout=timeout,
        heartbeat_ttl=heartbeat_ttl,
        poll_interval=poll_interval,
        allow_lost=allow_lost,
    )


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="Agent config YAML.")
@_log_options
def agent(config_path: Path, log_json: bool | None, log_level: str) -> None:
    """Run the instance agent: boot (queue, subscription, replay), then long-poll until SIGTERM."""
    from deployer.agent import Agent
    from deployer.config import load_config

    logs.configure(json=log_json, level=log_level)
    config = load_config(config_path)
    Agent(config, make_clients(config.region, config.endpoint_url)).run()


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="Agent config YAML.")
@_log_options
def boot(config_path: Path, log_json: bool | None, log_level: str) -> None:
    """One-shot for cloud-init: ensure queue + subscription, replay the pointers, exit.

    Exits non-zero if any component is not on its channel's latest release afterwards.
    """
    from deployer.agent import Agent
    from deployer.config import load_config
    from deployer.status import ComponentState

    logs.configure(json=log_json, level=log_level)
    config = load_config(config_path)
    runner = Agent(config, make_clients(config.region, config.endpoint_url))
    runner.boot()
    assert runner.reporter is not None
    bad = {
        c: s.state.value
        for c, s in runner.reporter.components.items()
        if s.state in (ComponentState.FAILED, ComponentState.REJECTED)
    }
    if bad:
        raise DeployerError(f"boot replay left components failing: {bad}")


@main.command()
@_aws_options
@_store_options
@click.option("--stage", callback=_name("stage"))
@click.option("--role", callback=_name("role"))
@click.option("--component", callback=_name("component"))
@click.option(
    "--stale-after",
    default=3600.0,
    show_default=True,
    help="Seconds without a heartbeat before an instance is marked stale.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(
    region: str | None,
    endpoint_url: str | None,
    bucket: str,
    prefix: str,
    stage: str | None,
    role: str | None,
    component: str | None,
    stale_after: float,
    as_json: bool,
) -> None:
    """Where the fleet stands: instances × components, with a summary per channel."""
    from deployer.fleet import fleet_rows, format_table, summary
    from deployer.status import iter_reports

    logs.configure(level="warning")
    clients = make_clients(region, endpoint_url)
    reports = list(iter_reports(clients.s3, bucket, Layout(prefix), stage, role))
    rows = fleet_rows(reports, component=component, stale_after_s=stale_after)
    if as_json:
        click.echo(json.dumps({"instances": [dataclasses.asdict(r) for r in rows], "summary": summary(rows)}, indent=2))
        return
    if not rows:
        click.echo("no instances have reported yet")
        return
    click.echo(format_table(rows))
    click.echo()
    for line in summary(rows):
        click.echo(line)


@main.command("apply")
@_aws_options
@click.option(
    "--manifest",
    "manifest_url",
    help="Manifest URL (s3://, https://, file://); else read from stdin as stretcher does.",
)
@click.option(
    "--state-dir",
    default="/var/lib/deployer",
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
@click.option("--hook-timeout", default=600.0, show_default=True, help="Default per-hook timeout in seconds.")
@_log_options
def apply_command(
    region: str | None,
    endpoint_url: str | None,
    manifest_url: str | None,
    state_dir: Path,
    root_dir: Path,
    release_id: str | None,
    hook_timeout: float,
    log_json: bool | None,
    log_level: str,
) -> None:
    """Apply one manifest now, like stretcher: `echo s3://bucket/manifest.yml | deployer apply`."""
    from deployer.oneshot import apply_manifest_url, manifest_url_from_stdin

    logs.configure(json=log_json, level=log_level)
    url = manifest_url or manifest_url_from_stdin(sys.stdin.read())
    if url is None:
        click.echo("no event on stdin; nothing to apply", err=True)
        return
    # S3 redirects a GetObject to the bucket's region, so any region will do when none is set.
    clients = make_clients(region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1", endpoint_url)
    apply_manifest_url(
        url, s3=clients.s3, root_dir=root_dir, state_dir=state_dir, hook_timeout=hook_timeout, release_id=release_id
    )


@main.command()
@click.option("--agents", default=3, show_default=True, type=click.IntRange(1, 20), help="How many agents to start.")
@click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), help="Keep files here instead of a temp dir."
)
def demo(agents: int, workdir: Path | None) -> None:
    """Run the whole path on the embedded emulator: init, agents, two releases, a late joiner."""
    from deployer.demo import run_demo

    logs.configure(level="warning")
    run_demo(agents=agents, workdir=workdir, echo=click.echo)


# Fleet operations (history, rollback, gc, iam-policy) register themselves on `main`.
from deployer import cli_ops  # noqa: E402, F401
