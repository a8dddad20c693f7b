"""`deployer gc`: remove the registrations of instances that stopped heartbeating.

Every agent writes `status/<stage>/<role>/<instance>.json` at boot and at least once per
heartbeat interval. An instance whose heartbeat is older than the TTL is gone (terminated by
Auto Scaling, or long stopped); gc removes its subscription, then its queue and DLQ, then its
status report (`deployer.aws.registration.remove_registration`, the order a clean
deregistration uses too).

Safe on a schedule: every step is idempotent, two overlapping runs only skip each other's
work, an interrupted run leaves the status report (deleted last) for the next run to finish,
and the report is re-checked right before removal, so an instance that heartbeated since the
scan is left alone. An instance that comes back after being collected re-creates its queue and
subscription at its next boot and replays the pointers, so nothing is lost, only delayed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from deployer.aws.clients import Clients
from deployer.aws.registration import Removal, remove_registration, subscriptions_by_endpoint
from deployer.aws.reports import ReportReader
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import head
from deployer.protocol.errors import ConfigError
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.names import DEFAULT_QUEUE_PREFIX, TopicArn, queue_name
from deployer.protocol.report import Lifecycle
from deployer.protocol.timestamps import age_seconds

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Registration:
    """One instance as seen under status/: where its report is and when it last heartbeated."""

    who: ReportKey
    key: str
    etag: str
    heartbeat_at: datetime | None
    last_modified: datetime
    #: What the report says of the instance's Auto Scaling lifecycle (read only for old reports).
    lifecycle: Lifecycle | None = None

    def age_s(self, now: datetime) -> float:
        """How long nobody has vouched for this instance: the younger of its heartbeat and of the
        object itself. A body's heartbeat is only a claim (a back-dated one must not get a live
        instance collected); S3's LastModified is when someone last wrote the report."""
        written = age_seconds(self.last_modified, now)
        return written if self.heartbeat_at is None else min(written, age_seconds(self.heartbeat_at, now))


def select_stale(registrations: Iterable[Registration], now: datetime, ttl_s: float) -> list[Registration]:
    """Pure: the registrations whose heartbeat and object are both older than the TTL, oldest first.

    An instance asleep in a warm pool heartbeats no more than a dead one, but it wakes up with
    its queue expected in place: its report says `warmed`, and it is never collected.
    """
    stale = [r for r in registrations if r.age_s(now) > ttl_s and r.lifecycle is not Lifecycle.WARMED]
    return sorted(stale, key=lambda r: (-r.age_s(now), r.key))


class Collector:
    def __init__(
        self,
        clients: Clients,
        bucket: str,
        topic_arn: str,
        layout: Layout,
        queue_prefix: str = DEFAULT_QUEUE_PREFIX,
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.clients = clients
        self.bucket = bucket
        self.topic = TopicArn.parse(topic_arn)
        self.layout = layout
        self.queue_prefix = queue_prefix
        self.policy = policy

    def scan(self, now: datetime, ttl_s: float) -> list[Registration]:
        """Every registration, reading only the reports that may be stale.

        A report S3 wrote within the TTL is not stale whatever its body says (`Registration.age_s`
        takes the younger of the two), so only objects older than the TTL are read: a scan of a
        healthy fleet costs one LIST per 1,000 instances and no GET.
        """
        reader = ReportReader(self.clients.s3, self.bucket, self.layout, policy=self.policy)
        listed = reader.listing()
        old = [(who, item) for who, item in listed.items() if age_seconds(item.last_modified, now) > ttl_s]
        read = {entry.s3_key: entry for entry in reader.read(old)}
        registrations = []
        for who, item in listed.items():
            entry = read.get(item.s3_key)
            if entry is None and age_seconds(item.last_modified, now) > ttl_s:
                continue  # deleted between LIST and GET: someone else removed it
            report = entry.report if entry is not None else None
            heartbeat = report.heartbeat_at if report is not None else None
            lifecycle = report.lifecycle if report is not None else None
            registrations.append(Registration(who, item.s3_key, item.etag, heartbeat, item.last_modified, lifecycle))
        return registrations

    def run(self, ttl_s: float, *, dry_run: bool = False, now: datetime | None = None) -> list[Removal]:
        now = now or datetime.now(UTC)
        stale = select_stale(self.scan(now, ttl_s), now, ttl_s)
        if not stale:
            return []
        subscriptions = subscriptions_by_endpoint(self.clients, str(self.topic), self.policy)
        removed = []
        for reg in stale:
            if not dry_run and not self._unchanged(reg):
                log.info("gc_skipped_instance_came_back", instance_id=reg.who.instance_id, key=reg.key)
                continue
            try:
                name = queue_name(self.queue_prefix, reg.who.stage, reg.who.role, reg.who.instance_id)
            except ConfigError as exc:  # no agent could have made this queue: not an agent's report
                log.warning("gc_skipped_foreign_report", key=reg.key, error=str(exc), next="left alone")
                continue
            removed.append(
                remove_registration(
                    self.clients,
                    bucket=self.bucket,
                    layout=self.layout,
                    who=reg.who,
                    queue_name=name,
                    subscription_arns=subscriptions.get(self.topic.queue_arn(name), []),
                    dry_run=dry_run,
                    policy=self.policy,
                )
            )
        return removed

    def _unchanged(self, reg: Registration) -> bool:
        found = head(self.clients.s3, self.bucket, reg.key, self.policy)
        return found is None or found.get("ETag", "") == reg.etag  # gone already: finish removing the queues


def describe(removed: Iterable[Removal], *, dry_run: bool) -> list[str]:
    """What a run did (or would do), one line per instance and a count. Pure."""
    verb = "would remove" if dry_run else "removed"
    lines = [
        f"{verb} {r.stage}/{r.role}/{r.instance_id}: {len(r.subscriptions)} subscription(s), "
        f"queues {', '.join(r.queues) or '-'}, status report"
        for r in removed
    ]
    count = len(lines)
    return [*lines, f"{count} stale instance(s) {'would be removed' if dry_run else 'removed'}"]
