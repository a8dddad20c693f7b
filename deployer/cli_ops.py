"""Fleet operations commands: history, rollback, gc, iam-policy; and `--wait`, shared with publish.

Registered on the `deployer` group when `deployer.cli` is imported (see the end of cli.py).
"""

from __future__ import annotations

import dataclasses
import json

import click

from deployer import logs
from deployer.aws import make_clients
from deployer.cli import _aws_options, _name, _store_options, main
from deployer.cli_wait import conclude, wait_options
from deployer.layout import Layout
from deployer.protocol import Channel


@main.command()
@_aws_options
@_store_options
@click.option("--stage", required=True, callback=_name("stage"))
@click.option("--role", required=True, callback=_name("role"))
@click.option("--component", required=True, callback=_name("component"))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Newest deploys to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def history(
    region: str | None,
    endpoint_url: str | None,
    bucket: str,
    prefix: str,
    stage: str,
    role: str,
    component: str,
    limit: int,
    as_json: bool,
) -> None:
    """Deploys of one channel, newest first: seq, release, deploy id, time, who and from where."""
    from itertools import islice

    from deployer.pointers import read_pointer
    from publisher.history import format_history, iter_history

    logs.configure(level="warning")
    clients = make_clients(region, endpoint_url)
    channel = Channel(stage, role, component)
    deploys = list(islice(iter_history(clients.s3, bucket, Layout(prefix), channel), limit))
    pointer = read_pointer(clients.s3, bucket, Layout(prefix), channel)
    current = pointer.deploy.seq if pointer else None
    if as_json:
        click.echo(json.dumps({"current_seq": current, "deploys": [d.to_dict() for d in deploys]}, indent=2))
        return
    if not deploys:
        click.echo(f"{channel} has no deploys yet")
        return
    click.echo(format_history(deploys, current))


@main.command()
@_aws_options
@_store_options
@click.option("--topic-arn", envvar="DEPLOYER_TOPIC_ARN", required=True, help="SNS topic [env DEPLOYER_TOPIC_ARN].")
@click.option("--stage", required=True, callback=_name("stage"))
@click.option("--role", required=True, callback=_name("role"))
@click.option("--component", required=True, callback=_name("component"))
@click.option("--to", "to_release", help="Release id to go back to [default: the previous release].")
@wait_options
def rollback(
    region: str | None,
    endpoint_url: str | None,
    bucket: str,
    prefix: str,
    topic_arn: str,
    stage: str,
    role: str,
    component: str,
    to_release: str | None,
    wait: bool,
    timeout: float,
    heartbeat_ttl: float,
    poll_interval: float,
    allow_lost: bool,
) -> None:
    """Publish the previous (or --to) release as a new seq; instances re-activate it without downloading.

    "Previous" is the release of the highest history seq below the current one whose release id
    differs from the current release, so two rollbacks in a row toggle between the last two.
    """
    from publisher.publish import Publisher, ci_origin
    from publisher.rollback import rollback as do_rollback

    logs.configure(level="warning")
    clients = make_clients(region, endpoint_url)
    publisher = Publisher(clients, bucket, topic_arn, Layout(prefix))
    result, replaced = do_rollback(publisher, Channel(stage, role, component), to=to_release, origin=ci_origin())
    deploy = result.deploy
    click.echo(
        f"rolled back {deploy.channel} from {replaced.release_id} (seq {replaced.seq}) to {deploy.release_id} "
        f"as seq {deploy.seq} (deploy {deploy.deploy_id})"
    )
    conclude(
        result,
        clients,
        bucket,
        prefix,
        wait=wait,
        timeout=timeout,
        heartbeat_ttl=heartbeat_ttl,
        poll_interval=poll_interval,
        allow_lost=allow_lost,
    )


@main.command()
@_aws_options
@_store_options
@click.option("--topic-arn", envvar="DEPLOYER_TOPIC_ARN", required=True, help="SNS topic [env DEPLOYER_TOPIC_ARN].")
@click.option("--queue-prefix", default="deployer", show_default=True, help="The agents' queue_prefix.")
@click.option(
    "--ttl",
    default=3 * 3600.0,
    show_default=True,
    type=click.FloatRange(min=600),
    help="Seconds without a heartbeat after which an instance is collected (at least 600).",
)
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gc(
    region: str | None,
    endpoint_url: str | None,
    bucket: str,
    prefix: str,
    topic_arn: str,
    queue_prefix: str,
    ttl: float,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove subscriptions, then queues, then status reports of instances whose heartbeat is older than --ttl.

    Idempotent and safe to run on a schedule (cron, a scheduled Lambda).
    """
    from publisher.gc import Collector

    logs.configure(level="warning")
    collector = Collector(make_clients(region, endpoint_url), bucket, topic_arn, Layout(prefix), queue_prefix)
    removed = collector.run(ttl, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": [dataclasses.asdict(r) for r in removed]}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        click.echo(
            f"{verb} {r.stage}/{r.role}/{r.instance_id}: {len(r.subscriptions)} subscription(s), "
            f"queues {', '.join(r.queues) or '-'}, status report"
        )
    click.echo(f"{len(removed)} stale instance(s) {'would be removed' if dry_run else 'removed'}")


@main.command("iam-policy")
@click.option(
    "--for", "audience", required=True, type=click.Choice(["ci", "instance", "gc"]), help="Who the policy is for."
)
@click.option("--bucket", envvar="DEPLOYER_BUCKET", required=True, help="Release/status bucket [env DEPLOYER_BUCKET].")
@click.option("--prefix", envvar="DEPLOYER_PREFIX", default="deployer", show_default=True, help="Key prefix.")
@click.option("--topic-arn", envvar="DEPLOYER_TOPIC_ARN", required=True, help="SNS topic [env DEPLOYER_TOPIC_ARN].")
@click.option("--queue-prefix", default="deployer", show_default=True, help="The agents' queue_prefix.")
@click.option("--stage", callback=_name("stage"), help="Instance/gc: narrow queues and status to one stage.")
@click.option("--role", callback=_name("role"), help="Instance/gc: narrow to one role (with --stage).")
@click.option("--asg", "asg_name", help="Instance: allow completing the launch hook of this Auto Scaling group.")
@click.option("--lifecycle", is_flag=True, help="Instance: allow completing launch hooks (of --asg, else any group).")
@click.option("--deregister", is_flag=True, help="Instance: allow deregister_on_shutdown (delete own queues/status).")
def iam_policy(
    audience: str,
    bucket: str,
    prefix: str,
    topic_arn: str,
    queue_prefix: str,
    stage: str | None,
    role: str | None,
    asg_name: str | None,
    lifecycle: bool,
    deregister: bool,
) -> None:
    """Print a least-privilege IAM policy (JSON) for CI, the instances or gc."""
    from publisher.iam import Audience, Scope, policy_for, render

    scope = Scope(
        bucket=bucket,
        topic_arn=topic_arn,
        prefix=prefix,
        queue_prefix=queue_prefix,
        stage=stage,
        role=role,
        asg_name=asg_name,
        lifecycle=lifecycle,
        deregister=deregister,
    )
    click.echo(render(policy_for(Audience(audience), scope)))
