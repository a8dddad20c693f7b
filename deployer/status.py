"""Status reports: one JSON object per instance in S3, written on every change and as a heartbeat."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from deployer import __version__
from deployer.layout import Layout
from deployer.protocol import utc_now_iso
from deployer.retry import DEFAULT_POLICY, RetryPolicy

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)
STATUS_VERSION = 1


class ComponentState(enum.StrEnum):
    PENDING = "pending"  # nothing applied yet
    APPLYING = "applying"
    OK = "ok"
    FAILED = "failed"  # may succeed on retry (hook failure, network)
    REJECTED = "rejected"  # can never succeed (invalid manifest, checksum, unsafe archive)


@dataclass(frozen=True)
class ComponentStatus:
    state: ComponentState = ComponentState.PENDING
    release_id: str | None = None
    seq: int | None = None
    deploy_id: str | None = None
    error: str | None = None
    output_tail: str | None = None
    updated_at: str = field(default_factory=utc_now_iso)


class StatusReporter:
    """Keeps this instance's report in memory and writes it whole on every change."""

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        layout: Layout,
        *,
        stage: str,
        role: str,
        instance_id: str,
        components: tuple[str, ...],
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.key = layout.status_key(stage, role, instance_id)
        self.policy = policy
        self.started_at = utc_now_iso()
        self.doc_base = {"instance_id": instance_id, "stage": stage, "role": role}
        self.components: dict[str, ComponentStatus] = {c: ComponentStatus() for c in components}
        self.last_rejection: dict[str, str] | None = None

    def update(self, component: str, **changes: Any) -> None:
        current = self.components.get(component, ComponentStatus())
        self.components[component] = replace(current, updated_at=utc_now_iso(), **changes)
        self.write()

    def reject_message(self, message_id: str, reason: str) -> None:
        self.last_rejection = {"message_id": message_id, "reason": reason, "at": utc_now_iso()}
        self.write()

    def write(self) -> None:
        """Best effort: a status write failure is logged, never allowed to fail a deploy."""
        doc = {
            "v": STATUS_VERSION,
            **self.doc_base,
            "agent_version": __version__,
            "started_at": self.started_at,
            "heartbeat_at": utc_now_iso(),
            "components": {name: _status_dict(status) for name, status in self.components.items()},
            "last_rejection": self.last_rejection,
        }
        try:
            self.policy.call(
                self.s3.put_object,
                Bucket=self.bucket,
                Key=self.key,
                Body=json.dumps(doc, sort_keys=True, indent=1).encode(),
                ContentType="application/json",
            )
        except Exception as exc:  # noqa: BLE001 - reporting must never take the agent down
            log.warning(
                "status_write_failed", key=self.key, error=str(exc), next="retried at the next change or heartbeat"
            )


def _status_dict(status: ComponentStatus) -> dict[str, Any]:
    out = asdict(status)
    out["state"] = status.state.value
    return out


def iter_reports(
    s3: S3Client,
    bucket: str,
    layout: Layout,
    stage: str | None = None,
    role: str | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Iterator[dict[str, Any]]:
    """Every instance report under status/ (optionally one stage or stage/role)."""
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=layout.status_prefix(stage, role if stage else None)):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith(".json"):
                continue
            body = policy.call(s3.get_object, Bucket=bucket, Key=obj["Key"])["Body"].read()
            try:
                report = json.loads(body)
            except ValueError:
                log.warning("status_report_unreadable", key=obj["Key"])
                continue
            if role and report.get("role") != role:
                continue
            yield report


@dataclass
class ReportCache:
    """Repeated reads of the status prefix that GET only the reports whose ETag changed.

    `publish --wait` polls every few seconds; listing is one request per 1000 instances, and
    an idle fleet's reports change once per heartbeat, so most polls cost a LIST and no GET.
    """

    s3: S3Client
    bucket: str
    layout: Layout
    stage: str | None = None
    role: str | None = None
    policy: RetryPolicy = DEFAULT_POLICY
    _seen: dict[str, tuple[str, dict[str, Any] | None]] = field(default_factory=dict)

    def refresh(self) -> dict[str, dict[str, Any]]:
        """Every readable report by instance id (as listed now; deleted reports drop out)."""
        listed: dict[str, str] = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        prefix = self.layout.status_prefix(self.stage, self.role if self.stage else None)
        for page in self.policy.call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix))):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(".json"):
                    listed[obj["Key"]] = obj.get("ETag", "")
        fresh: dict[str, tuple[str, dict[str, Any] | None]] = {}
        for key, etag in listed.items():
            cached = self._seen.get(key)
            fresh[key] = cached if cached and cached[0] == etag else (etag, self._read(key))
        self._seen = fresh
        reports = {}
        for _, report in fresh.values():
            if report is None or (self.role and report.get("role") != self.role):
                continue
            reports[str(report.get("instance_id", "?"))] = report
        return reports

    def _read(self, key: str) -> dict[str, Any] | None:
        try:
            body = self.policy.call(self.s3.get_object, Bucket=self.bucket, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None  # deleted between LIST and GET (gc, or an agent deregistering)
        try:
            report = json.loads(body)
        except ValueError:
            log.warning("status_report_unreadable", key=key, next="skipped until it is rewritten")
            return None
        return report if isinstance(report, dict) else None


def age_seconds(timestamp: str | None, now: datetime | None = None) -> float | None:
    if not timestamp:
        return None
    now = now or datetime.now(UTC)
    return (now - datetime.fromisoformat(timestamp)).total_seconds()
