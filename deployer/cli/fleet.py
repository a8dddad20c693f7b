"""Commands for operators looking after a fleet: `deployer status`, `gc` and `iam-policy`."""

from __future__ import annotations

import dataclasses
import json

import click

from deployer.cli.options import (
    Store,
    bucket_option,
    name_callback,
    prefix_option,
    publisher_arn_option,
    queue_prefix_option,
    quiet,
    store_options,
    topic_option,
)
from deployer.protocol.report import DEFAULT_GC_TTL_SECONDS, MIN_GC_TTL_SECONDS


@click.command()
@store_options
@click.option("--stage", callback=name_callback("stage"))
@click.option("--role", callback=name_callback("role"))
@click.option("--component", callback=name_callback("component"))
@click.option(
    "--stale-after",
    default=3600.0,
    show_default=True,
    help="Seconds without a heartbeat before an instance is marked stale.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@quiet
def status(
    store: Store, stage: str | None, role: str | None, component: str | None, stale_after: float, as_json: bool
) -> None:
    """Where the fleet stands: instances × components, with a summary per channel."""
    from deployer.aws.reports import ReportReader
    from publisher.fleet import channels_of, fleet_rows, format_table, summary
    from publisher.history import pointer_deploys

    entries = ReportReader(store.clients.s3, store.bucket, store.layout, stage, role).refresh()
    pointers = pointer_deploys(store.clients.s3, store.bucket, store.layout, channels_of(entries.values()))
    rows = fleet_rows(entries.values(), component=component, stale_after_s=stale_after, pointers=pointers)
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


@click.command()
@store_options
@topic_option()
@queue_prefix_option
@click.option(
    "--ttl",
    default=DEFAULT_GC_TTL_SECONDS,
    show_default=True,
    type=click.FloatRange(min=MIN_GC_TTL_SECONDS),
    help=f"Seconds without a heartbeat after which an instance is collected (at least {MIN_GC_TTL_SECONDS:.0f}).",
)
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@quiet
def gc(store: Store, topic_arn: str, queue_prefix: str, ttl: float, dry_run: bool, as_json: bool) -> None:
    """Remove subscriptions, then queues, then status reports of instances silent for longer than --ttl.

    Silent means both the report's heartbeat and the object's own LastModified are older than
    --ttl: a heartbeat written into a body is only a claim.

    Idempotent and safe to run on a schedule (cron, a scheduled Lambda).
    """
    from publisher.gc import Collector, describe

    collector = Collector(store.clients, store.bucket, topic_arn, store.layout, queue_prefix)
    removed = collector.run(ttl, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": [dataclasses.asdict(r) for r in removed]}, indent=2))
        return
    for line in describe(removed, dry_run=dry_run):
        click.echo(line)


@click.command("iam-policy")
@click.option(
    "--for",
    "audience",
    required=True,
    type=click.Choice(["ci", "instance", "gc", "bucket", "topic"]),
    help="Who the policy is for: an identity policy (ci, instance, gc) or a resource policy (bucket, topic).",
)
@bucket_option()
@prefix_option()
@topic_option()
@queue_prefix_option
@click.option("--stage", callback=name_callback("stage"), help="CI/instance/gc: narrow to one stage.")
@click.option("--role", callback=name_callback("role"), help="Instance/gc: narrow to one role (with --stage).")
@click.option("--asg", "asg_name", help="Instance: allow completing the launch hook of this Auto Scaling group.")
@click.option("--lifecycle", is_flag=True, help="Instance: allow completing launch hooks (of --asg, else any group).")
@click.option("--deregister", is_flag=True, help="Instance: allow deregister_on_shutdown (delete own queues/status).")
@publisher_arn_option
@click.option(
    "--sign-key",
    "sign_keys",
    multiple=True,
    metavar="kms:KEY",
    help="CI: allow kms:Sign with this release key (its id or ARN); repeatable.",
)
def iam_policy(
    audience: str,
    asg_name: str | None,
    publisher_arns: tuple[str, ...],
    sign_keys: tuple[str, ...],
    **scope: str | bool | None,
) -> None:
    """Print a least-privilege IAM policy (JSON): for CI, the instances or gc, or the bucket's or topic's policy."""
    from publisher.iam import Audience, Scope, policy_for, render

    chosen = Scope(asg_name=asg_name, publishers=publisher_arns, sign_keys=sign_keys, **scope)  # type: ignore[arg-type]
    click.echo(render(policy_for(Audience(audience), chosen)))


COMMANDS = (status, gc, iam_policy)
