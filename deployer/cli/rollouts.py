"""`deployer rollout status|resume|abort`: see, continue or stop a channel's staged rollout from any CI job."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from deployer.cli.options import (
    News,
    Store,
    capacity_flags,
    channel_options,
    news_options,
    quiet,
    sign_key_option,
    targets_store_options,
    topic_option,
    wait_options,
)
from deployer.protocol.errors import ConfigError
from deployer.protocol.names import Channel
from deployer.protocol.report import DEFAULT_HEARTBEAT_TTL_SECONDS

if TYPE_CHECKING:
    from deployer.aws.reports import ReportEntry
    from deployer.protocol.deploy import Deploy
    from deployer.protocol.targets import Record, Target
    from publisher.publish import Publisher
    from publisher.targets import Spread
    from publisher.wait import WaitOptions


@click.group()
def rollout() -> None:
    """A channel's staged rollout (`publish --waves`): where it is, continue it, or roll it back."""


def _staged(
    store: Store, topic_arn: str, channel: Channel, sign_keys: tuple[str, ...] = ()
) -> tuple[Publisher, Deploy]:
    from deployer.aws.s3 import read_pointer
    from publisher.publish import Publisher

    publisher = Publisher(store.clients, store.bucket, topic_arn, store.layout, signers=store.signers(sign_keys))
    pointer = read_pointer(store.clients.s3, store.bucket, store.layout, channel)
    if pointer is None or pointer.deploy.rollout is None:
        raise ConfigError(f"{channel}'s current deploy is not a staged rollout")
    return publisher, pointer.deploy


@rollout.command("status")
@targets_store_options
@topic_option(required=False)
@channel_options
@wait_options
@quiet
def rollout_status(
    store: Store, targets: tuple[Target, ...], topic_arn: str, channel: Channel, wait: WaitOptions | None
) -> None:
    """The plan, the cursor (wave, state, driver and lease) and where each wave's instances stand;
    with --targets, the last publish across them: each target's move and where its pointer is."""
    from datetime import UTC, datetime

    if targets:
        _targets_status(store, targets, channel)
        return

    from deployer.aws.reports import ReportReader
    from publisher.rollout import Cursors, count

    publisher, deploy = _staged(store, topic_arn, channel)
    plan = deploy.rollout
    assert plan is not None
    found = Cursors(publisher).read(channel, deploy.deploy_id)
    if found is None:
        click.echo(f"{channel} seq {deploy.seq}: no cursor yet")
        return
    cursor = found[0]
    ttl = wait.heartbeat_ttl_s if wait else DEFAULT_HEARTBEAT_TTL_SECONDS
    reader = ReportReader(store.clients.s3, store.bucket, store.layout, channel.stage, channel.role)
    entries = {who.instance_id: e for who, e in reader.refresh().items()}
    click.echo(
        f"{channel} seq {deploy.seq}: release {deploy.release_id} (stable {plan.stable.release_id}), "
        f"waves {', '.join(plan.waves)}; {cursor.state.value} at wave {cursor.wave}/{plan.last_wave}, "
        f"driver {cursor.driver} until {cursor.lease_until:%Y-%m-%dT%H:%M:%SZ}"
        + (f"; reason: {cursor.reason}" if cursor.reason else "")
    )
    if plan.abort_after is not None:
        from deployer.aws.events import failed_instances

        failed = failed_instances(
            store.clients.s3, store.bucket, store.layout, channel.stage, channel.role, deploy.deploy_id
        )
        fired = plan.abort_fired(deploy.deploy_id, cursor, failed)
        click.echo(
            f"  {fired}; the fleet is returning to stable by itself, the next driver records it"
            if fired
            else f"  pre-authorised abort after {plan.abort_after} failed instance(s): "
            f"{len(plan.failures_counted(deploy.deploy_id, cursor, failed))} counted so far"
        )
    now = datetime.now(UTC)
    # At the last wave every live instance is admitted: who is in which wave, and how it fares;
    # at the cursor's wave, who still holds stable.
    everyone = count(deploy, plan.last_wave, entries, now, ttl)
    waiting = count(deploy, cursor.wave, entries, now, ttl).waiting
    for wave in range(plan.last_wave + 1):
        members = {i for i in everyone.admitted if plan.wave_of(deploy.deploy_id, i, _zone(entries.get(i))) == wave}
        click.echo(
            f"  wave {wave} ({plan.wave_label(wave)}): {len(members)} instance(s), {len(members & everyone.converged)} ok, "
            f"{len(members & set(everyone.failed))} failed, {len(members & waiting)} waiting"
        )


def _targets_status(store: Store, targets: tuple[Target, ...], channel: Channel) -> None:
    from deployer.aws.s3 import read_pointer
    from publisher.targets import Records, connect

    reaches = [connect(target, store.aws.endpoint_url) for target in targets]
    found = Records(reaches[0]).latest(channel)
    if found is None:
        click.echo(f"{channel}: no publish across these targets is recorded")
        return
    record = found[0]
    click.echo(
        f"{channel} release {record.release_id} across {len(record.targets)} target(s): {record.state.value}"
        + (f"; reason: {record.reason}" if record.reason else "")
    )
    for reach in reaches:
        move = record.moves.get(reach.target.name)
        p = reach.publisher
        pointer = read_pointer(p.clients.s3, p.bucket, p.layout, channel, p.policy)
        where = f"pointer at seq {pointer.deploy.seq} ({pointer.deploy.release_id})" if pointer else "no pointer"
        moved = f"seq {move.seq} {move.state.value}" if move else "not moved"
        click.echo(f"  [{reach.target.name}] {reach.label()}: {moved}; {where}")


def _spread(
    store: Store,
    targets: tuple[Target, ...],
    channel: Channel,
    wait: WaitOptions | None,
    sign_keys: tuple[str, ...] = (),
) -> tuple[Spread, Record, str]:
    """The publish across these targets recorded last, ready to resume or roll back."""
    from publisher.targets import Records, Spread, connect
    from publisher.wait import WaitOptions

    signers = store.signers(sign_keys)
    reaches = [connect(target, store.aws.endpoint_url, signers) for target in targets]
    found = Records(reaches[0]).latest(channel)
    if found is None:
        raise ConfigError(f"{channel}: no publish across these targets is recorded")
    options = wait or WaitOptions(900.0, DEFAULT_HEARTBEAT_TTL_SECONDS, 5.0)
    return Spread(reaches, channel, options, echo=click.echo), *found


def _zone(entry: ReportEntry | None) -> str | None:
    return entry.report.zone if entry is not None and entry.report is not None else None


@rollout.command("resume")
@targets_store_options
@topic_option(required=False)
@channel_options
@sign_key_option("Sign the cursor like the deploy (needed when agents require signatures).")
@wait_options
@click.option("--force", is_flag=True, help="Take the rollout over even if another driver's lease has not lapsed.")
@click.option(
    "--lease",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds this driver's claim lasts unrenewed.",
)
@capacity_flags
@news_options
@quiet
def rollout_resume(
    store: Store,
    targets: tuple[Target, ...],
    topic_arn: str,
    channel: Channel,
    sign_keys: tuple[str, ...],
    wait: WaitOptions | None,
    force: bool,
    lease: float,
    target_groups: tuple[str, ...],
    min_healthy_percent: float,
    news: News,
) -> None:
    """Continue the rollout from its cursor's wave to the end (or to an automatic rollback); with
    --targets, the last publish across them, from the targets its record says moved."""
    from deployer.aws.reports import ReportReader
    from deployer.cli.ci import drive
    from publisher.rollout import Gates

    if targets:
        spread, record, etag = _spread(store, targets, channel, wait, sign_keys)
        sys.exit(spread.resume(record, etag))

    publisher, deploy = _staged(store, topic_arn, channel, sign_keys)
    plan = deploy.rollout
    assert plan is not None
    gates = Gates.of_plan(
        plan, lease_s=lease, min_healthy_percent=min_healthy_percent, target_groups=target_groups
    ).watching(wait)
    reader = ReportReader(store.clients.s3, store.bucket, store.layout, channel.stage, channel.role)
    sys.exit(drive(publisher, store, reader, gates, deploy, news.herald(store), force=force))


@rollout.command("abort")
@targets_store_options
@topic_option(required=False)
@channel_options
@sign_key_option("Sign the cursor like the deploy (needed when agents require signatures).")
@click.option("--reason", default="aborted by an operator", show_default=True, help="Recorded in the cursor.")
@news_options
@quiet
def rollout_abort(
    store: Store,
    targets: tuple[Target, ...],
    topic_arn: str,
    channel: Channel,
    sign_keys: tuple[str, ...],
    reason: str,
    news: News,
) -> None:
    """Roll the rollout back now: every instance returns to the stable release; with --targets,
    every target the last publish across them moved returns to the release it replaced."""
    if targets:
        spread, record, etag = _spread(store, targets, channel, None, sign_keys)
        sys.exit(spread.abort(record, etag, reason))
    from deployer.aws.reports import ReportReader
    from publisher.rollout import Driver, Gates

    publisher, deploy = _staged(store, topic_arn, channel, sign_keys)
    plan = deploy.rollout
    assert plan is not None
    reader = ReportReader(store.clients.s3, store.bucket, store.layout, channel.stage, channel.role)
    Driver(publisher, reader, Gates(plan.waves), deploy, echo=click.echo, herald=news.herald(store)).abort(reason)


COMMANDS = (rollout,)
