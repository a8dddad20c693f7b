"""`deployer gc`: remove the registrations of instances that stopped heartbeating.

Every agent writes `status/<stage>/<role>/<instance>.json` at boot and at least once per
heartbeat interval. An instance whose heartbeat is older than the TTL is gone (terminated by
Auto Scaling, or long stopped); gc removes its subscription, then its queue and DLQ, then its
status report (`deployer.lifecycle.remove_registration`, same order as a clean deregistration).

Safe on a schedule: every step is idempotent, two overlapping runs only skip each other's
work, an interrupted run leaves the status report (deleted last) for the next run to finish,
and the report is re-checked right before removal, so an instance that heartbeated since the
scan is left alone. An instance that comes back after being collected re-creates its queue and
subscription at its next boot and replays the pointers, so nothing is lost, only delayed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from botocore.exceptions import ClientError

from deployer.aws import Clients
from deployer.layout import Layout
from deployer.lifecycle import Removal, queue_arn, remove_registration, subscriptions_by_endpoint
from deployer.retry import DEFAULT_POLICY, RetryPolicy
from deployer.status import age_seconds

log = structlog.get_logger(__name__)

#: Default TTL: 12 missed heartbeats at the default 15-minute interval.
DEFAULT_TTL_SECONDS = 3 * 3600.0
#: Refuse TTLs this short: they would collect healthy instances mid-apply (no heartbeat while hooks run).
MIN_TTL_SECONDS = 600.0


@dataclass(frozen=True)
class Registration:
    """One instance as seen under status/: where its report is and when it last heartbeated."""

    instance_id: str
    stage: str
    role: str
    key: str
    etag: str
    heartbeat_at: str | None
    last_modified: datetime

    def age_s(self, now: datetime) -> float:
        """Heartbeat age, or the object's age when the report is unreadable."""
        age = None
        if self.heartbeat_at:
            try:
                age = age_seconds(self.heartbeat_at, now)
            except ValueError:
                age = None
        return age if age is not None else (now - self.last_modified).total_seconds()


def select_stale(registrations: Iterable[Registration], now: datetime, ttl_s: float) -> list[Registration]:
    """Pure: the registrations whose heartbeat is older than the TTL, oldest first."""
    stale = [r for r in registrations if r.age_s(now) > ttl_s]
    return sorted(stale, key=lambda r: (-r.age_s(now), r.key))


class Collector:
    def __init__(
        self,
        clients: Clients,
        bucket: str,
        topic_arn: str,
        layout: Layout,
        queue_prefix: str = "deployer",
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.clients = clients
        self.bucket = bucket
        self.topic_arn = topic_arn
        self.layout = layout
        self.queue_prefix = queue_prefix
        self.policy = policy

    def scan(self) -> list[Registration]:
        prefix = self.layout.status_prefix()
        paginator = self.clients.s3.get_paginator("list_objects_v2")
        pages = self.policy.call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix)))
        found = []
        for page in pages:
            for obj in page.get("Contents", []):
                parts = obj["Key"][len(prefix) :].split("/")
                if len(parts) != 3 or not parts[2].endswith(".json"):
                    continue
                stage, role, name = parts
                found.append(
                    Registration(
                        instance_id=name.removesuffix(".json"),
                        stage=stage,
                        role=role,
                        key=obj["Key"],
                        etag=obj.get("ETag", ""),
                        heartbeat_at=self._heartbeat(obj["Key"]),
                        last_modified=obj["LastModified"],
                    )
                )
        return found

    def run(self, ttl_s: float, *, dry_run: bool = False, now: datetime | None = None) -> list[Removal]:
        now = now or datetime.now(UTC)
        stale = select_stale(self.scan(), now, ttl_s)
        if not stale:
            return []
        subscriptions = subscriptions_by_endpoint(self.clients, self.topic_arn, self.policy)
        removed = []
        for reg in stale:
            if not dry_run and not self._unchanged(reg):
                log.info("gc_skipped_instance_came_back", instance_id=reg.instance_id, key=reg.key)
                continue
            name = f"{self.queue_prefix}-{reg.stage}-{reg.role}-{reg.instance_id}"
            removed.append(
                remove_registration(
                    self.clients,
                    bucket=self.bucket,
                    layout=self.layout,
                    topic_arn=self.topic_arn,
                    queue_name=name,
                    stage=reg.stage,
                    role=reg.role,
                    instance_id=reg.instance_id,
                    subscription_arns=subscriptions.get(queue_arn(self.topic_arn, name), []),
                    dry_run=dry_run,
                    policy=self.policy,
                )
            )
        return removed

    def _heartbeat(self, key: str) -> str | None:
        try:
            body = self.policy.call(self.clients.s3.get_object, Bucket=self.bucket, Key=key)["Body"].read()
            report = json.loads(body)
        except (ClientError, ValueError):
            return None
        value = report.get("heartbeat_at") if isinstance(report, dict) else None
        return value if isinstance(value, str) else None

    def _unchanged(self, reg: Registration) -> bool:
        try:
            head = self.policy.call(self.clients.s3.head_object, Bucket=self.bucket, Key=reg.key)
        except ClientError:
            return True  # already gone: finish removing the queues
        return head.get("ETag", "") == reg.etag
