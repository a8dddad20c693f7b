"""Commands CI runs: `deployer init`, `publish`, `rollback` and `history`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deployer.cli.options import (
    Aws,
    News,
    Store,
    aws_options,
    bucket_option,
    channel_options,
    fleets,
    inline_manifest_option,
    news_options,
    prefix_option,
    publisher_arn_option,
    queue_prefix_option,
    quiet,
    rollout_options,
    sign_key_option,
    store_options,
    targets_store_options,
    topic_option,
    wait_options,
)
from deployer.protocol.manifest import Manifest, SyncStrategy, parse_manifest
from deployer.protocol.names import Channel

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from deployer.aws.elb import Membership
    from deployer.aws.reports import ReportReader
    from deployer.protocol.deploy import Deploy
    from deployer.protocol.targets import Target
    from publisher.cache import PublishCache
    from publisher.notify import Herald
    from publisher.publish import Publisher, PublishResult
    from publisher.rollout import Capacity, Gates, Staging
    from publisher.wait import WaitOptions

#: Without --wait: the pointer moved but the SNS publish failed (agents converge at their next reconcile).
EXIT_NOTIFY_FAILED = 3


@click.command()
@aws_options
@bucket_option(help="Bucket to create [env DEPLOYER_BUCKET].")
@click.option(
    "--topic-name", envvar="DEPLOYER_TOPIC_NAME", default="deployer", show_default=True, help="SNS topic name."
)
@publisher_arn_option
@queue_prefix_option
@prefix_option()
@click.option(
    "--events-target",
    metavar="ARN",
    help="Route deploy events (the CLI's and the instances') from the default EventBridge bus to this SQS "
    "queue, SNS topic or log group: turns on the bucket's EventBridge notifications and puts two rules.",
)
@quiet
def init(
    aws: Aws,
    bucket: str,
    topic_name: str,
    publisher_arns: tuple[str, ...],
    queue_prefix: str,
    prefix: str,
    events_target: str | None,
) -> None:
    """Create the bucket and the SNS topic (idempotent), set the topic's policy, and print what exists.

    The policy lets only SQS queues named like the agents' subscribe, and with --publisher-arn
    only those CI principals publish.
    """
    from publisher.infra import init_resources

    clients = aws.clients()
    result = init_resources(clients, bucket, topic_name, publishers=publisher_arns, queue_prefix=queue_prefix)
    click.echo(f"bucket {result.bucket}: {'created' if result.bucket_created else 'already exists'}")
    who = ", ".join(result.publishers) or "any principal the account's IAM allows (pass --publisher-arn to narrow)"
    click.echo(f"topic {result.topic_arn}: ready; publishes: {who}")
    if events_target:
        from deployer.aws.clients import events_client
        from deployer.aws.events import route_events
        from deployer.protocol.events import FLEET_RULE, INSTANCE_RULE
        from deployer.protocol.layout import Layout

        events = events_client(aws.region, aws.endpoint_url)
        route_events(events, clients.s3, bucket, Layout(prefix).events_prefix(), events_target)
        click.echo(f"events: rules {FLEET_RULE} and {INSTANCE_RULE} on the default bus deliver to {events_target}")
    click.echo(f"export DEPLOYER_BUCKET={result.bucket} DEPLOYER_TOPIC_ARN={result.topic_arn}")


@click.command()
@targets_store_options
@topic_option(required=False)
@channel_options
@click.option(
    "--artifact",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A .tar.gz or .tar.zst, or a directory to pack into one.",
)
@click.option(
    "--compression",
    type=click.Choice(["zstd", "gzip"]),
    default="zstd",
    show_default=True,
    help="How a directory is packed (zstd packs 2-3× faster than gzip -6; agents read both).",
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
@click.option(
    "--cache/--no-cache",
    "use_cache",
    default=True,
    show_default=True,
    help="Reuse this machine's pack of an unchanged directory and its check of the same bytes "
    "(in $DEPLOYER_CACHE_DIR, else ~/.cache/deployer).",
)
@sign_key_option("Sign the deploy (history, pointer and message become a signed envelope).")
@inline_manifest_option
@rollout_options
@wait_options
@news_options
@quiet
def publish(
    store: Store,
    targets: tuple[Target, ...],
    topic_arn: str,
    channel: Channel,
    artifact: Path,
    compression: str,
    manifest_path: Path | None,
    dest: str | None,
    sync_strategy: str | None,
    release_id: str | None,
    use_cache: bool,
    sign_keys: tuple[str, ...],
    inline_manifest: bool,
    gates: Gates | None,
    wait: WaitOptions | None,
    news: News,
) -> None:
    """Upload a release, move the channel pointer and notify the fleet.

    With --wait, then follow the instances that were live at publish time (status report lists
    the component, heartbeat younger than --heartbeat-ttl), and with --asg every InService
    instance of the group, until each converged, failed, was rejected or was lost; exit 0 all
    converged, 4 any failed/rejected/lost, 5 timeout.

    With --targets (or --target …), the release is stored in every target first, then the
    targets move as waves, each converging (its own --waves inside it) before the next; a
    failed target rolls back every target already moved: exit 0 everywhere, 6 rolled back.
    """
    from publisher.artifact_file import ArtifactFile
    from publisher.cache import PublishCache, default_cache_dir
    from publisher.pack import Artifact, Compression, pack_directory

    cache_dir = default_cache_dir() if use_cache else None
    cache = PublishCache(cache_dir) if cache_dir is not None else None
    template = parse_manifest(manifest_path.read_bytes()) if manifest_path else Manifest()
    if manifest_path is None or sync_strategy:
        # Manifests we write default to symlink; a user's template keeps its own (stretcher: rsync).
        template = dataclasses.replace(template, sync_strategy=SyncStrategy(sync_strategy or "symlink"))
    if dest:
        template = dataclasses.replace(template, dest=dest)
    if targets:
        spread_publish(
            store, targets, channel, artifact, compression, template, release_id, sign_keys, gates, wait, news
        )
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="deployer-publish-") as tmp:
        packed: ArtifactFile | Artifact | None = None
        if not artifact.is_dir():
            # Hashed (and checked) while boto3 is imported and the clients are made (figure 5).
            packed = stack.enter_context(ArtifactFile(artifact, cache))
        from publisher.publish import ci_origin

        members = group_members(store, wait)
        publisher = make_publisher(store, topic_arn, sign_keys, inline_manifest, cache)
        staging = stage(publisher, store, channel, gates, wait)
        if packed is None:
            packing = Compression(compression)
            packed = (
                cache.pack(artifact, packing, Path(tmp))
                if cache is not None
                else pack_directory(artifact, Path(tmp) / f"artifact{packing.suffix}", compression=packing)
            )
        result = publisher.publish(
            channel, packed, template=template, release_id=release_id, origin=ci_origin(), staged=staging
        )
    deploy = result.deploy
    click.echo(
        f"published {deploy.channel} release {deploy.release_id} as seq {deploy.seq} (deploy {deploy.deploy_id})"
    )
    conclude(result, store, wait, members, publisher, staging, news)


@click.command()
@store_options
@topic_option()
@channel_options
@click.option("--to", "to_release", help="Release id to go back to [default: the previous release].")
@sign_key_option("Sign the rollback's deploy.")
@inline_manifest_option
@rollout_options
@wait_options
@news_options
@quiet
def rollback(
    store: Store,
    topic_arn: str,
    channel: Channel,
    to_release: str | None,
    sign_keys: tuple[str, ...],
    inline_manifest: bool,
    gates: Gates | None,
    wait: WaitOptions | None,
    news: News,
) -> None:
    """Publish the previous (or --to) release as a new seq; instances re-activate it without downloading.

    "Previous" is the release of the highest history seq below the current one whose release id
    differs from the current release, so two rollbacks in a row toggle between the last two.
    """
    from publisher.publish import ci_origin
    from publisher.rollback import rollback as do_rollback

    members = group_members(store, wait)
    publisher = make_publisher(store, topic_arn, sign_keys, inline_manifest)
    staging = stage(publisher, store, channel, gates, wait)
    result, replaced = do_rollback(publisher, channel, to=to_release, origin=ci_origin(), staged=staging)
    deploy = result.deploy
    click.echo(
        f"rolled back {deploy.channel} from {replaced.release_id} (seq {replaced.seq}) to {deploy.release_id} "
        f"as seq {deploy.seq} (deploy {deploy.deploy_id})"
    )
    conclude(result, store, wait, members, publisher, staging, news)


@click.command()
@targets_store_options
@channel_options
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Newest deploys to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@quiet
def history(store: Store, targets: tuple[Target, ...], channel: Channel, limit: int, as_json: bool) -> None:
    """Deploys of one channel, newest first: seq, release, deploy id, time, who and from where;
    with --targets, each target's (its own seqs), headed by its region and account."""
    from itertools import islice

    from deployer.aws.s3 import read_pointer
    from publisher.history import format_history, iter_history

    found: dict[str, dict[str, Any]] = {}
    for where in fleets(store, targets):
        s3 = where.clients.s3
        deploys = list(islice(iter_history(s3, where.bucket, where.layout, channel), limit))
        pointer = read_pointer(s3, where.bucket, where.layout, channel)
        current = pointer.deploy.seq if pointer else None
        found[where.label] = {"current_seq": current, "deploys": [d.to_dict() for d in deploys]}
        if as_json:
            continue
        if targets:
            click.echo(f"== {where.label}")
        click.echo(format_history(deploys, current) if deploys else f"{channel} has no deploys yet")
    if as_json:
        click.echo(json.dumps(found if targets else found[store.bucket], indent=2))


def spread_publish(
    store: Store,
    targets: tuple[Target, ...],
    channel: Channel,
    artifact: Path,
    compression: str,
    template: Manifest,
    release_id: str | None,
    sign_keys: tuple[str, ...],
    gates: Gates | None,
    wait: WaitOptions | None,
    news: News,
) -> None:
    """`publish --targets`: pack once, store everywhere, move the targets as waves; exits."""
    from publisher.pack import Compression, file_artifact, pack_directory, sniff
    from publisher.publish import ci_origin, default_release_id
    from publisher.targets import Spread, connect

    if wait is None:
        raise click.UsageError("--targets moves the targets one wave after another: it needs --wait")
    signers = store.signers(sign_keys)
    reaches = [connect(target, store.aws.endpoint_url, signers) for target in targets]
    with tempfile.TemporaryDirectory(prefix="deployer-publish-") as tmp:
        if artifact.is_dir():
            packing = Compression(compression)
            packed = pack_directory(artifact, Path(tmp) / f"artifact{packing.suffix}", compression=packing)
        else:
            packed = file_artifact(artifact, sniff(artifact))
        spread = Spread(reaches, channel, wait, gates, origin=ci_origin(), herald=news.herald(store), echo=click.echo)
        sys.exit(spread.publish(packed, template, release_id or default_release_id(packed.sha256)))


def make_publisher(
    store: Store, topic_arn: str, sign_keys: tuple[str, ...], inline_manifest: bool, cache: PublishCache | None = None
) -> Publisher:
    """The publisher `publish` and `rollback` share: the store's clients, its signers, inlining as asked."""
    from publisher.publish import Publisher

    signers = store.signers(sign_keys)
    return Publisher(
        store.clients,
        store.bucket,
        topic_arn,
        store.layout,
        signers=signers,
        inline_manifests=inline_manifest,
        cache=cache,
    )


def group_members(store: Store, wait: WaitOptions | None) -> frozenset[str]:
    """With `--wait --asg`, the group's InService instances, read BEFORE the pointer moves: a
    misspelt group name fails the command while nothing has been published yet."""
    if wait is None or not wait.asg:
        return frozenset()
    from deployer.aws.autoscaling import in_service_instances
    from deployer.aws.clients import autoscaling_client

    return in_service_instances(autoscaling_client(store.aws.region, store.aws.endpoint_url), wait.asg)


def stage(
    publisher: Publisher, store: Store, channel: Channel, gates: Gates | None, wait: WaitOptions | None
) -> Staging | None:
    """With --waves: the stable release and the live instances the waves are cut from, read before publishing."""
    if gates is None:
        return None
    from deployer.aws.reports import ReportReader
    from publisher.rollout import prepare

    gates = gates.watching(wait)
    reader = ReportReader(store.clients.s3, store.bucket, store.layout, channel.stage, channel.role)
    staging = prepare(publisher, channel, gates, {who.instance_id: e for who, e in reader.refresh().items()})
    return dataclasses.replace(staging, capacity=capacity_watch(store, gates))


def conclude(
    result: PublishResult,
    store: Store,
    wait: WaitOptions | None,
    members: frozenset[str],
    publisher: Publisher,
    staging: Staging | None,
    news: News,
) -> None:
    """What `publish` and `rollback` share after moving a pointer: report a failed fan-out, tell
    the event bus (and `--notify`, when nothing follows), then follow the fleet if asked (a
    staged rollout: drive it); exits with the verdict's code."""
    from deployer.protocol.events import EventType, deploy_event

    deploy = result.deploy
    herald = news.herald(store, by=staging.driver if staging else None)
    published = deploy_event(EventType.DEPLOY_PUBLISHED, deploy, reason=result.sns_error)
    herald.emit(published, notify=wait is None and staging is None)
    if result.sns_error:
        click.echo(
            f"error: the pointer moved to seq {deploy.seq} but the SNS publish failed ({result.sns_error}); "
            "agents will still converge at their next reconcile",
            err=True,
        )
        if wait is None:
            sys.exit(EXIT_NOTIFY_FAILED)
    if staging is not None and wait is None:
        click.echo(
            f"rollout started at wave 0 of {deploy.rollout.last_wave if deploy.rollout else 0}; "
            f"drive it with `deployer rollout resume --stage {deploy.stage} --role {deploy.role} --component {deploy.component}`"
        )
        return
    if wait is None:
        return
    from deployer.aws.reports import ReportReader  # the fleet reader and the waiter: only to follow the fleet
    from publisher.wait import ProgressPrinter, Waiter

    reader = ReportReader(store.clients.s3, store.bucket, store.layout, deploy.stage, deploy.role)
    if staging is not None:
        sys.exit(drive(publisher, store, reader, staging.gates, deploy, herald, staging.driver))
    printer = ProgressPrinter(sys.stdout)
    outcome = Waiter(reader, wait, members).wait(deploy, printer)
    printer.finish(outcome)
    herald.emit(outcome.event())
    sys.exit(outcome.exit_code)


def alarm_watch(store: Store, gates: Gates) -> Callable[[], Sequence[str]]:
    """The `--alarm` gate: which of the named CloudWatch alarms are in ALARM right now."""
    if not gates.alarms:
        return tuple
    from deployer.aws.clients import cloudwatch_client
    from deployer.aws.cloudwatch import alarms_in_alarm

    cloudwatch = cloudwatch_client(store.aws.region, store.aws.endpoint_url)

    def firing() -> Sequence[str]:
        return alarms_in_alarm(cloudwatch, gates.alarms)

    return firing


def capacity_watch(store: Store, gates: Gates) -> Capacity:
    """The `--target-group` gate: each group's registered and healthy targets, read when asked."""
    if not gates.target_groups:
        return tuple
    from deployer.aws.clients import elbv2_client
    from deployer.aws.elb import membership

    elbv2 = elbv2_client(store.aws.region, store.aws.endpoint_url)

    def read() -> Sequence[Membership]:
        return [membership(elbv2, arn) for arn in gates.target_groups]

    return read


def drive(
    publisher: Publisher,
    store: Store,
    reader: ReportReader,
    gates: Gates,
    deploy: Deploy,
    herald: Herald,
    driver: str | None = None,
    force: bool = False,
) -> int:
    """Drive a staged rollout to its end; the exit code says how it ended."""
    from publisher.rollout import Driver, driver_id

    runner = Driver(
        publisher,
        reader,
        gates,
        deploy,
        alarms=alarm_watch(store, gates),
        capacity=capacity_watch(store, gates),
        driver=driver or driver_id(),
        echo=click.echo,
        herald=herald,
    )
    runner.take(force=force)
    return runner.drive().exit_code


COMMANDS = (init, publish, rollback, history)
