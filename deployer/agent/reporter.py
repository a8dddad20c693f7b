"""This instance's status report: kept in memory, written whole to S3 on every change and as a heartbeat.

The document itself is `deployer.protocol.report.StatusReport`; this is its only writer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from deployer import __version__
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import put_conditional
from deployer.protocol.errors import PreconditionFailed
from deployer.protocol.events import DeployEvent, EventType, boot_failed_event
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.report import ComponentState, ComponentStatus, Lifecycle, Rejection, StatusReport
from deployer.protocol.timestamps import utc_now_iso

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)


class StatusReporter:
    """Keeps this instance's report in memory and writes it whole on every change."""

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        layout: Layout,
        who: ReportKey,
        components: tuple[str, ...],
        policy: RetryPolicy = DEFAULT_POLICY,
        zone: str | None = None,
    ) -> None:
        self.s3 = s3
        #: The instance's Availability Zone: its wave in a zonal rollout.
        self.zone = zone
        self.bucket = bucket
        self.who = who
        self.layout = layout
        self.key = layout.status_key(who)
        self.policy = policy
        self.started_at = utc_now_iso()
        self.components: dict[str, ComponentStatus] = {c: ComponentStatus(updated_at=utc_now_iso()) for c in components}
        self.last_rejection: Rejection | None = None
        #: Why the last boot attempt failed; None once booted (a new reporter per attempt).
        self.boot_error: str | None = None
        #: Set once the instance left through its terminate hook, or while it sleeps in a warm pool.
        self.lifecycle: Lifecycle | None = None
        #: A change `note`d and not written yet; `flush` writes it.
        self.unwritten = False

    def states(self) -> Mapping[str, ComponentState]:
        return {name: status.state for name, status in self.components.items()}

    def seed(self, component: str, status: ComponentStatus) -> None:
        """Set a component's status without writing (boot, from the local ledger)."""
        self.components[component] = status

    def update(self, component: str, **changes: Any) -> None:
        self.note(component, **changes)
        self.write()

    def note(self, component: str, **changes: Any) -> None:
        """Change a component's status in memory only; the next `flush` (or any write) sends it.

        How a deploy's outcome is reported: the agent acknowledges the message first and writes
        the report after, so the status PUT is not on the deploy's critical path. A crash in
        between costs at most that report: boot reports the applied releases the ledger holds,
        and a failed deploy is tried (and reported) again.
        """
        current = self.components.get(component, ComponentStatus())
        if changes.get("error"):
            changes["last_error"] = changes["error"]
        self.components[component] = replace(current, updated_at=utc_now_iso(), **changes)
        self.unwritten = True

    def stale_since(self, component: str) -> str | None:
        status = self.components.get(component)
        return status.stale_since if status else None

    def vouched(self, component: str, stale_since: str | None) -> None:
        """Say whether a signed timestamp vouches for the component's pointer (None: yes), written
        with the next flush or heartbeat; not a change of the deploy's, so `updated_at` stays.
        Going stale is also told, once, as an `Instance Pointer Stale` event about the deploy it runs."""
        current = self.components.get(component, ComponentStatus())
        if current.stale_since == stale_since:
            return
        self.components[component] = replace(current, stale_since=stale_since)
        self.unwritten = True
        told = current.deploy_id and current.seq and current.release_id
        if stale_since is not None and current.stale_since is None and told:
            self.tell(
                DeployEvent(
                    type=EventType.INSTANCE_POINTER_STALE,
                    at=utc_now_iso(),
                    stage=self.who.stage,
                    role=self.who.role,
                    component=component,
                    seq=current.seq,
                    deploy_id=current.deploy_id,
                    release_id=current.release_id,
                    instance=self.who.instance_id,
                    reason=f"no valid signed timestamp vouches for this channel's pointer since {stale_since}",
                )
            )

    def flush(self) -> None:
        """Write the report if a noted change is not written yet."""
        if self.unwritten:
            self.write()

    def reject_message(self, message_id: str, reason: str) -> None:
        self.last_rejection = Rejection(message_id=message_id, reason=reason, at=utc_now_iso())
        self.write()

    def boot_failed(self, error: str, *, tell: bool) -> None:
        """Say that this agent cannot join (it retries): the instance is seen as broken, not as
        absent. With `tell` (the first failed attempt of this agent's life), also as an event:
        an agent retrying every few minutes must not raise one per attempt."""
        self.boot_error = error
        self.write()
        if tell:
            self.tell(boot_failed_event(self.who.stage, self.who.role, self.who.instance_id, error))

    def entered(self, lifecycle: Lifecycle | None) -> None:
        """Say where the instance is in its Auto Scaling lifecycle (None: in service) and write it."""
        self.lifecycle = lifecycle
        self.write()

    def report(self, now: datetime | None = None) -> StatusReport:
        return StatusReport(
            key=self.who,
            heartbeat_at=(now or datetime.now(UTC)).replace(microsecond=0),
            agent_version=__version__,
            started_at=self.started_at,
            components=dict(self.components),
            last_rejection=self.last_rejection,
            boot_error=self.boot_error,
            lifecycle=self.lifecycle,
            zone=self.zone,
        )

    def tell(self, event: DeployEvent) -> None:
        """Write an instance event once, under this instance's own key: the bucket's EventBridge
        notification is what delivers it (docs/design.md, "Events"), so telling costs one PUT
        and no permission beyond the bucket. Write-once (If-None-Match): a deploy retried after a
        failure is one event, and a retried PUT whose first answer was lost is not a second.
        Best effort, like the report."""
        key = self.layout.event_key(event.type.slug, self.who, event.deploy_id or f"boot-{_compact(event.at)}")
        try:
            put_conditional(self.s3, self.bucket, key, event.to_json().encode(), policy=self.policy)
        except PreconditionFailed:
            return  # told already
        except Exception as exc:  # noqa: BLE001 - telling must never take the agent down
            log.warning(
                "event_write_failed",
                key=key,
                event_type=event.type.value,
                error=str(exc)[:300],
                next="the report still says it; the event is not retried",
            )

    def write(self) -> None:
        """Best effort: a status write failure is logged, never allowed to fail a deploy."""
        self.unwritten = False
        try:
            self.policy.call(
                self.s3.put_object,
                Bucket=self.bucket,
                Key=self.key,
                Body=self.report().to_json(),
                ContentType="application/json",
            )
        except Exception as exc:  # noqa: BLE001 - reporting must never take the agent down
            log.warning(
                "status_write_failed", key=self.key, error=str(exc), next="retried at the next change or heartbeat"
            )


def _compact(timestamp: str) -> str:
    """`2026-12-07T18:01:56Z` → `20261207T180156Z`: a boot attempt's name in an event key."""
    return timestamp.replace("-", "").replace(":", "")
