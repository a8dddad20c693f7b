"""Staged rollouts, the CI side: plan the waves, write the cursor, drive it wave by wave.

There is no server. The driver is `publish --waves … --wait` itself, or `deployer rollout
resume` in a later job: per wave it waits until every admitted live instance runs the
candidate, bakes, then advances the cursor and announces it (the deploy document is published
to SNS again, so admitted agents move at once; the others see it at reconcile). Failures above
the budget, an alarm, or a missed progress deadline abort: the cursor says `aborted` and every
instance returns to the stable release, which the admitted ones still hold on disk.

Only the holder of the cursor's lease drives, and every cursor write is conditional: two CI
jobs can never both advance one rollout, and a driver that dies leaves the fleet frozen where
it was, never advancing, until `rollout resume` (or `abort`). A newer publish supersedes a
rollout in flight: agents follow the higher seq, and the old driver stops.
(docs/design.md, "Staged rollouts")
"""

from __future__ import annotations

import enum
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from deployer.aws.elb import Membership
from deployer.aws.events import failed_instances
from deployer.aws.reports import ReportEntry, ReportReader
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import get_document, put_conditional, read_pointer
from deployer.protocol.deploy import Deploy
from deployer.protocol.envelope import ROLLOUT_PAYLOAD_TYPE
from deployer.protocol.errors import PreconditionFailed, PublishError, RejectedInput
from deployer.protocol.events import EventType, deploy_event
from deployer.protocol.layout import Layout
from deployer.protocol.names import Channel
from deployer.protocol.report import DEFAULT_HEARTBEAT_TTL_SECONDS, ComponentState
from deployer.protocol.rollout import (
    STABLE_SUFFIX,
    Cursor,
    Plan,
    RolloutState,
    Stable,
    plan_waves,
)
from deployer.protocol.timestamps import age_seconds
from deployer.protocol.trust import UNVERIFIED
from publisher.notify import Herald
from publisher.publish import Publisher
from publisher.signing import sign

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from publisher.wait import WaitOptions

log = structlog.get_logger(__name__)

#: How long a driver's claim on a rollout lasts without renewal; renewed every third of it.
DEFAULT_LEASE_SECONDS = 60.0
#: Exit codes beside publish --wait's 0 / 4 / 5.
EXIT_ROLLED_BACK = 6
EXIT_SUPERSEDED = 7


@dataclass(frozen=True)
class Gates:
    """The knobs of `publish --waves`: what to wait for, how long to watch, how much to tolerate."""

    waves: tuple[str, ...]
    bake_s: float = 0.0
    max_failed: str = "0"
    progress_deadline_s: float = 900.0
    alarms: tuple[str, ...] = ()
    lease_s: float = DEFAULT_LEASE_SECONDS
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_SECONDS
    poll_s: float = 5.0
    #: `--min-healthy-percent`: a wave starts only if, with its instances out of service, at
    #: least this share of each `--target-group`'s registered targets stays healthy.
    min_healthy_percent: float = 0.0
    target_groups: tuple[str, ...] = ()
    #: `--abort-after K`: the pre-authorised abort the signed plan carries (Plan.abort_after).
    abort_after: int | None = None

    @classmethod
    def of_plan(cls, plan: Plan, **knobs: Any) -> Gates:
        """The gates a published plan fixed (waves, bake, max-failed, deadline), for a driver that
        did not publish it (`rollout resume`, a publish across targets); `knobs` are its own."""
        return cls(plan.waves, plan.bake_s, plan.max_failed, plan.progress_deadline_s, **knobs)

    def watching(self, wait: WaitOptions | None) -> Gates:
        """These gates, polling and judging liveness as `--wait`'s flags say (unchanged without --wait)."""
        return self if wait is None else replace(self, heartbeat_ttl_s=wait.heartbeat_ttl_s, poll_s=wait.poll_s)


#: Reads each `--target-group`'s membership (deployer.aws.elb.membership); injected, like alarms.
Capacity = Callable[[], Sequence[Membership]]


def capacity_refusal(groups: Sequence[Membership], leaving: Collection[str], min_percent: float) -> str | None:
    """Why a wave that takes `leaving` out of service must not start now, or None. Pure.

    Like instance refresh's MinHealthyPercentage: in every group, the healthy targets that stay
    must be at least `min_percent` of the registered ones (rounded up), except that one target
    may always leave (instance refresh replaces one instance at a time at 100 %, and a group of
    one can be deployed at all). Instances of the wave that are not healthy now take nothing
    away; a group with no target constrains nothing.
    """
    for group in groups:
        if not group.registered:
            continue
        floor = min(math.ceil(min_percent / 100 * len(group.registered) - 1e-9), len(group.registered) - 1)
        staying = len(group.healthy - set(leaving))
        if staying < floor:
            out = len(group.healthy & set(leaving))
            return (
                f"{group.group_arn} would keep {staying} of {len(group.registered)} targets healthy with "
                f"{out} out of service, under --min-healthy-percent {min_percent:g} ({floor})"
            )
    return None


def driver_id() -> str:
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def read_cursor(
    s3: S3Client, bucket: str, layout: Layout, channel: Channel, deploy_id: str, policy: RetryPolicy = DEFAULT_POLICY
) -> tuple[Cursor, str] | None:
    """A rollout's cursor and its etag, or None if it has none; RejectedInput if it does not parse or is forged.

    Not verified: the driver and the fleet view read it as written; agents, which act on it,
    verify their own copy.
    """
    found = get_document(s3, bucket, layout.cursor_key(channel, deploy_id), policy)
    return (UNVERIFIED.open_cursor(found[0], deploy_id), found[1]) if found else None


def rollout_cursors(
    s3: S3Client, bucket: str, layout: Layout, pointers: Mapping[Channel, Deploy], policy: RetryPolicy = DEFAULT_POLICY
) -> dict[Channel, Cursor]:
    """The cursor of each pointer that is a staged rollout and has a readable one; one GET each.

    A missing or unreadable cursor is left out: a view then says it does not know which waves
    are admitted, which is also what agents conclude (a newcomer takes stable).
    """
    found: dict[Channel, Cursor] = {}
    for channel, deploy in sorted(pointers.items()):
        if deploy.rollout is None:
            continue
        try:
            cursor = read_cursor(s3, bucket, layout, channel, deploy.deploy_id, policy)
        except RejectedInput as exc:
            log.warning(
                "rollout_cursor_invalid", channel=str(channel), error=str(exc), next="admission shown as unknown"
            )
            continue
        if cursor is not None:
            found[channel] = cursor[0]
    return found


class Cursors:
    """A channel's rollout cursors in S3: created once, then changed only by the lease holder (If-Match)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def _key(self, channel: Channel, deploy_id: str) -> str:
        return self.publisher.layout.cursor_key(channel, deploy_id)

    def read(self, channel: Channel, deploy_id: str) -> tuple[Cursor, str] | None:
        p = self.publisher
        return read_cursor(p.clients.s3, p.bucket, p.layout, channel, deploy_id, p.policy)

    def write(self, channel: Channel, cursor: Cursor, etag: str | None) -> str:
        """Create (etag None) or replace the cursor; PreconditionFailed if someone else wrote it since."""
        p = self.publisher
        payload = cursor.to_json().encode()
        body = sign(payload, ROLLOUT_PAYLOAD_TYPE, p.signers).to_json().encode() if p.signers else payload
        return put_conditional(
            p.clients.s3, p.bucket, self._key(channel, cursor.deploy_id), body, if_match=etag, policy=p.policy
        )


@dataclass
class Staging:
    """What `Publisher.publish` needs to stage a deploy: the plan (made once the deploy id is known)
    and the first cursor, written before the pointer moves so no agent ever finds a deploy without one."""

    cursors: Cursors
    gates: Gates
    stable: Stable
    live: tuple[str, ...]
    driver: str = field(default_factory=driver_id)
    capacity: Capacity = tuple
    #: The live instances' Availability Zones, as their reports say (for zonal waves).
    zones: Mapping[str, str | None] = field(default_factory=dict)

    def plan(self, deploy_id: str) -> Plan:
        try:
            waves = plan_waves(self.gates.waves, deploy_id, self.live, self.zones)
            plan = Plan(
                waves=waves.specs,
                first=waves.first,
                thresholds=waves.thresholds,
                zones=waves.zones,
                stable=self.stable,
                bake_s=self.gates.bake_s,
                max_failed=self.gates.max_failed,
                progress_deadline_s=self.gates.progress_deadline_s,
                abort_after=self.gates.abort_after,
            )
            plan.failure_budget(len(self.live))  # a malformed --max-failed fails before anything is written
        except ValueError as exc:
            raise PublishError(str(exc)) from None
        # Wave 0 is admitted the moment the pointer moves: its capacity is checked before anything is written.
        wave0 = [i for i in self.live if plan.wave_of(deploy_id, i, self.zones.get(i)) == 0]
        refusal = capacity_refusal(self.capacity(), wave0, self.gates.min_healthy_percent)
        if refusal is not None:
            raise PublishError(f"wave 0 refused: {refusal}; nothing was published")
        return plan

    def start(self, deploy: Deploy) -> None:
        now = _now()
        cursor = Cursor(
            deploy.deploy_id, 0, RolloutState.ROLLING, now, self.driver, now + timedelta(seconds=self.gates.lease_s)
        )
        self.cursors.write(deploy.channel, cursor, None)


def prepare(publisher: Publisher, channel: Channel, gates: Gates, entries: Mapping[str, ReportEntry]) -> Staging:
    """The stable release (what the channel runs now) and the live instances the waves are cut from."""
    pointer = read_pointer(publisher.clients.s3, publisher.bucket, publisher.layout, channel, publisher.policy)
    if pointer is None:
        raise PublishError(f"{channel} has never been published: a first deploy has no stable release to stage from")
    cursors = Cursors(publisher)
    current = pointer.deploy
    stable = Stable(
        current.release_id,
        current.manifest_key,
        current.manifest_sha256,
        current.artifact_sha256,
        current.artifact_size,
    )
    if current.rollout is not None:
        found = cursors.read(channel, current.deploy_id)
        if found is None or found[0].state is not RolloutState.DONE:
            stable = current.rollout.stable  # superseding a rollout that never finished: its stable stays stable
    live = tuple(
        sorted(
            instance
            for instance, entry in entries.items()
            if entry.report is not None
            and channel.component in entry.report.components
            and age_seconds(entry.report.heartbeat_at) <= gates.heartbeat_ttl_s
        )
    )
    zones = {i: report.zone for i in live if (report := entries[i].report) is not None}
    return Staging(cursors, gates, stable, live, zones=zones)


class RolloutEnd(enum.StrEnum):
    """How a driven rollout ended (the agent's own decisions are `deployer.agent.decide.Verdict`)."""

    DONE = "done"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"

    @property
    def exit_code(self) -> int:
        """`publish --waves --wait` and `rollout resume`: 0 done, 6 rolled back, 7 superseded."""
        return {RolloutEnd.DONE: 0, RolloutEnd.ROLLED_BACK: EXIT_ROLLED_BACK, RolloutEnd.SUPERSEDED: EXIT_SUPERSEDED}[
            self
        ]


@dataclass(frozen=True)
class WaveCount:
    """One poll's view of a rollout: per instance, what the driver waits for."""

    wave: int
    admitted: frozenset[str]
    converged: frozenset[str]
    failed: Mapping[str, str]
    waiting: frozenset[str]
    live: int

    @property
    def pending(self) -> frozenset[str]:
        return self.admitted - self.converged - set(self.failed)

    def counts(self) -> dict[str, int]:
        """The tallies an event carries."""
        return {
            "admitted": len(self.admitted),
            "ok": len(self.converged),
            "failed": len(self.failed),
            "pending": len(self.pending),
            "waiting": len(self.waiting),
            "live": self.live,
        }

    def line(self, deploy: Deploy, bake_left: float | None = None) -> str:
        plan = deploy.rollout
        assert plan is not None
        text = (
            f"{deploy.channel} seq {deploy.seq} wave {self.wave}/{plan.last_wave} ({plan.wave_label(self.wave)}): "
            f"{len(self.admitted)} admitted, {len(self.converged)} ok, {len(self.failed)} failed, "
            f"{len(self.pending)} pending, {len(self.waiting)} waiting, {self.live} live"
        )
        return text + (f", bake {bake_left:.0f}s left" if bake_left is not None else "")


def count(deploy: Deploy, wave: int, entries: Mapping[str, ReportEntry], now: datetime, ttl_s: float) -> WaveCount:
    """Pure: who is admitted at `wave` among the live instances, and where each stands."""
    plan = deploy.rollout
    assert plan is not None
    admitted, converged, waiting, failed = set(), set(), set(), {}
    live = 0
    for instance, entry in entries.items():
        report = entry.report
        if report is None or deploy.component not in report.components:
            continue
        status = report.components[deploy.component]
        if age_seconds(report.heartbeat_at, now) > ttl_s and status.deploy_id != deploy.deploy_id:
            continue  # dead and never on the candidate: drops out of the denominator (scale-in)
        live += 1
        if status.deploy_id == deploy.deploy_id and status.state in (ComponentState.FAILED, ComponentState.REJECTED):
            failed[instance] = status.error or status.state.value
        if plan.admits(deploy.deploy_id, instance, wave, report.zone):
            admitted.add(instance)
            if status.deploy_id == deploy.deploy_id and status.state is ComponentState.OK:
                converged.add(instance)
        elif status.deploy_id == deploy.deploy_id + STABLE_SUFFIX:
            waiting.add(instance)
    return WaveCount(wave, frozenset(admitted), frozenset(converged), failed, frozenset(waiting), live)


@dataclass
class Driver:
    """Drives one rollout to done or rolled back, holding its lease; one line of progress per change."""

    publisher: Publisher
    reader: ReportReader
    gates: Gates
    deploy: Deploy
    alarms: Callable[[], Sequence[str]] = lambda: ()
    capacity: Capacity = tuple
    driver: str = field(default_factory=driver_id)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    echo: Callable[[str], None] = print
    herald: Herald = field(default_factory=Herald)
    _etag: str | None = None
    _tally: WaveCount | None = None
    _cursor: Cursor | None = None
    _renewed: float = 0.0

    @property
    def plan(self) -> Plan:
        assert self.deploy.rollout is not None
        return self.deploy.rollout

    def take(self, *, force: bool = False) -> Cursor:
        """Hold the rollout's lease: free, expired, ours, or taken over with `force`."""
        found = Cursors(self.publisher).read(self.deploy.channel, self.deploy.deploy_id)
        if found is None:
            raise PublishError(f"deploy {self.deploy.deploy_id} has no rollout cursor")
        cursor, self._etag = found
        held = cursor.driver != self.driver and cursor.lease_until > _now()
        if held and not force and cursor.state is RolloutState.ROLLING:
            raise PublishError(
                f"the rollout of seq {self.deploy.seq} is driven by {cursor.driver} until "
                f"{cursor.lease_until:%H:%M:%SZ}; wait for its lease to lapse, or use --force"
            )
        return self._write(replace(cursor, driver=self.driver))

    def drive(self) -> RolloutEnd:
        cursor = self._cursor or self.take()
        if cursor.state is not RolloutState.ROLLING:
            return RolloutEnd.DONE if cursor.state is RolloutState.DONE else RolloutEnd.ROLLED_BACK
        # Whoever drives now says so: agents re-read the cursor at once instead of at their reconcile.
        self.publisher.announce(self.deploy.channel)
        self._tell(EventType.WAVE_STARTED, cursor.wave)
        for wave in range(cursor.wave, self.plan.last_wave + 1):
            if wave > cursor.wave:
                stopped = self._hold_for_capacity(wave)
                if stopped is not None:
                    return stopped
                cursor = self._cursor or cursor
                cursor = self._write(replace(cursor, wave=wave))
                self.publisher.announce(self.deploy.channel)
                log.info(
                    "rollout_wave_started", seq=self.deploy.seq, wave=wave, next="waiting for the admitted instances"
                )
                self._tell(EventType.WAVE_STARTED, wave)
            stopped = self._watch(wave)
            if stopped is not None:
                return stopped
            self._tell(EventType.WAVE_PASSED, wave)
            cursor = self._cursor or cursor
        self._write(replace(cursor, state=RolloutState.DONE, reason=None))
        self.publisher.announce(self.deploy.channel)
        self._tell(EventType.ROLLOUT_SUCCEEDED, self.plan.last_wave)
        self.echo(f"OK: rollout of {self.deploy.channel} seq {self.deploy.seq} done in {self.plan.last_wave + 1} waves")
        return RolloutEnd.DONE

    def abort(self, reason: str) -> RolloutEnd:
        """Every instance back to stable: the cursor says so and the deploy is announced again."""
        cursor = self._cursor or self.take(force=True)
        self._write(replace(cursor, state=RolloutState.ABORTED, reason=reason[:500]))
        self.publisher.announce(self.deploy.channel)
        log.error(
            "rollout_aborted", seq=self.deploy.seq, reason=reason, next="every instance returns to the stable release"
        )
        self._tell(EventType.ROLLOUT_ROLLED_BACK, cursor.wave, reason=reason)
        self.echo(f"ROLLED BACK: {self.deploy.channel} seq {self.deploy.seq}: {reason}")
        return RolloutEnd.ROLLED_BACK

    def _watch(self, wave: int) -> RolloutEnd | None:
        """Wait for the wave, then bake it; None when the next wave may start."""
        started = self.clock()
        baking_since: float | None = None
        last = ""
        while True:
            if self._superseded():
                self.echo(f"SUPERSEDED: a newer deploy of {self.deploy.channel} replaced seq {self.deploy.seq}")
                return RolloutEnd.SUPERSEDED
            tally = self._tally = count(self.deploy, wave, self._entries(), _now(), self.gates.heartbeat_ttl_s)
            stop = self._gate(tally, wave, started if baking_since is None else None)
            if stop is not None:
                return self.abort(stop)
            if baking_since is None and not tally.pending:
                baking_since = self.clock()
            bake_left = None if baking_since is None else self.plan.bake_s - (self.clock() - baking_since)
            line = tally.line(self.deploy, bake_left if bake_left is not None and bake_left > 0 else None)
            if line != last:
                self.echo(line)
                last = line
            if bake_left is not None and bake_left <= 0:
                return None
            self._renew()
            self.sleep(self.gates.poll_s)

    def _hold_for_capacity(self, wave: int) -> RolloutEnd | None:
        """Before admitting `wave`: wait while it would take a target group under its healthy
        minimum (an instance of the last wave still warming up, a scale-in); roll back when the
        wait outlasts the progress deadline. None when the wave may start."""
        if not self.gates.target_groups:
            return None
        started = self.clock()
        last = ""
        while True:
            entries = self._entries()
            leaving = [
                i
                for i, entry in entries.items()
                if self.plan.wave_of(self.deploy.deploy_id, i, entry.report.zone if entry.report else None) == wave
            ]
            refusal = capacity_refusal(self.capacity(), leaving, self.gates.min_healthy_percent)
            if refusal is None:
                return None
            if self.clock() - started > self.plan.progress_deadline_s:
                return self.abort(f"wave {wave} never had the capacity to start: {refusal}")
            line = f"{self.deploy.channel} seq {self.deploy.seq} holding wave {wave}: {refusal}"
            if line != last:
                self.echo(line)
                log.warning("rollout_wave_held", wave=wave, reason=refusal, next="starting it once capacity allows")
                if not last:
                    self._tell(EventType.ROLLOUT_HELD, wave, reason=refusal)
                last = line
            self._renew()
            self.sleep(self.gates.poll_s)

    def _gate(self, tally: WaveCount, wave: int, waiting_since: float | None) -> str | None:
        """Why the rollout must stop now, if it must: the plan's own rule (which the fleet may
        already be carrying out), an alarm, too many failures, a missed deadline."""
        pre_authorised = self._pre_authorised()
        if pre_authorised is not None:
            return pre_authorised
        alarming = list(self.alarms())
        if alarming:
            return f"alarm(s) in ALARM: {', '.join(alarming)}"
        budget = self.plan.failure_budget(tally.live)
        if len(tally.failed) > budget:
            worst = "; ".join(f"{i}: {e}" for i, e in sorted(tally.failed.items())[:3])
            return f"{len(tally.failed)} failed, {budget} tolerated ({worst})"
        if waiting_since is not None and self.clock() - waiting_since > self.plan.progress_deadline_s:
            return f"wave {wave} missed its progress deadline of {self.plan.progress_deadline_s:.0f}s"
        return None

    def _pre_authorised(self) -> str | None:
        """The plan's abort rule, counted from the failure markers as every agent counts them."""
        if self.plan.abort_after is None:
            return None
        p = self.publisher
        failed = failed_instances(
            p.clients.s3, p.bucket, p.layout, self.deploy.stage, self.deploy.role, self.deploy.deploy_id, p.policy
        )
        return self.plan.abort_fired(self.deploy.deploy_id, self._cursor, failed)

    def _tell(self, kind: EventType, wave: int, reason: str | None = None) -> None:
        """An event about this rollout, with the last poll's tallies when they are about `wave`."""
        tally = self._tally if self._tally is not None and self._tally.wave == wave else None
        counts = tally.counts() if tally is not None and kind is not EventType.WAVE_STARTED else None
        self.herald.emit(deploy_event(kind, self.deploy, wave=wave, counts=counts, reason=reason))

    def _entries(self) -> dict[str, ReportEntry]:
        return {
            who.instance_id: entry
            for who, entry in self.reader.refresh().items()
            if (who.stage, who.role) == (self.deploy.stage, self.deploy.role)
        }

    def _superseded(self) -> bool:
        p = self.publisher
        pointer = read_pointer(p.clients.s3, p.bucket, p.layout, self.deploy.channel, p.policy)
        return pointer is not None and pointer.deploy.seq > self.deploy.seq

    def _renew(self) -> None:
        if self._cursor is not None and self.clock() - self._renewed >= self.gates.lease_s / 3:
            self._write(self._cursor)

    def _write(self, cursor: Cursor) -> Cursor:
        now = _now()
        renewed = replace(cursor, updated_at=now, lease_until=now + timedelta(seconds=self.gates.lease_s))
        try:
            self._etag = Cursors(self.publisher).write(self.deploy.channel, renewed, self._etag)
        except PreconditionFailed:
            raise PublishError(
                "the rollout cursor was changed by someone else (another driver, or `rollout abort`); stopping"
            ) from None
        self._cursor, self._renewed = renewed, self.clock()
        return renewed


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
