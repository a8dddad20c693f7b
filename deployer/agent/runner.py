"""Apply one deploy on this instance, exactly once: idempotency records, lock, status, outcome.

The loop decides *which* deploys to apply (queue batches, reconcile); this module applies one,
under the machine-wide lock, and turns whatever happened into an `Outcome` the loop acts on
(`decide.dispose`). What to do with an existing record is `ledger.plan_start`; what an error
means is `decide.outcome_of`; both are pure.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from deployer.agent.config import AgentConfig
from deployer.agent.decide import Outcome, Verdict, decide_one, outcome_of
from deployer.agent.ledger import DeployRecord, DeployStatus, Ledger, LocalState, Start, plan_start
from deployer.agent.metrics import Metrics
from deployer.agent.protection import ScaleInProtection
from deployer.agent.reporter import StatusReporter
from deployer.agent.shutdown import Shutdown
from deployer.apply.confirmation import Confirmation
from deployer.apply.engine import IN_PLACE, Applier, Cutover, Milestone, is_active
from deployer.apply.fetch import fetch_release_manifest
from deployer.apply.lock import ApplyLock
from deployer.aws.events import failed_instances
from deployer.aws.retry import RetryPolicy
from deployer.aws.s3 import get_document
from deployer.aws.secrets import SecretReader
from deployer.protocol.deploy import Deploy
from deployer.protocol.errors import (
    DeployerError,
    HookFailed,
    Interrupted,
    InvalidMessage,
    Unauthentic,
)
from deployer.protocol.events import EventType, deploy_event
from deployer.protocol.layout import Layout
from deployer.protocol.manifest import Manifest, Traffic
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState
from deployer.protocol.rollout import STABLE_SUFFIX, Cursor, Plan, RolloutState, Side, base_id, side_for
from deployer.protocol.trust import UNVERIFIED, DeployVerifier

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

#: OpenTelemetry's attribute for how a deployment ended, on the outcome's log line.
DEPLOYMENT_STATUS = "deployment.status"
#: An apply still running after this long is reported as `applying` (see _report_applying_if_slow).
APPLYING_REPORT_DELAY_SECONDS = 1.0
#: The status report's state for each outcome that changes it.
REPORTED_STATE = {
    Outcome.APPLIED: ComponentState.OK,
    Outcome.FAILED: ComponentState.FAILED,
    Outcome.UNAVAILABLE: ComponentState.FAILED,
    Outcome.REJECTED: ComponentState.REJECTED,
}

#: The instance event each verdict on an authentic deploy is told as.
INSTANCE_EVENTS = {
    Outcome.FAILED: EventType.INSTANCE_DEPLOY_FAILED,
    Outcome.REJECTED: EventType.INSTANCE_DEPLOY_REJECTED,
}


class History(Protocol):
    """What CI wrote that a deploy is checked against before anything of it happens: the channel's
    history entries and a rollout's cursor (bytes as stored; None when there is none); and who
    told that a rollout's candidate failed (its pre-authorised abort counts them)."""

    def entry(self, channel: Channel, seq: int) -> bytes | None: ...

    def cursor(self, channel: Channel, deploy_id: str) -> bytes | None: ...

    def failed(self, channel: Channel, deploy_id: str) -> frozenset[str]: ...


@dataclass(frozen=True)
class BucketHistory:
    """`History` in the fleet's bucket: one GET per question."""

    s3: S3Client
    bucket: str
    layout: Layout
    policy: RetryPolicy

    def entry(self, channel: Channel, seq: int) -> bytes | None:
        return self._get(self.layout.history_key(channel, seq))

    def cursor(self, channel: Channel, deploy_id: str) -> bytes | None:
        return self._get(self.layout.cursor_key(channel, deploy_id))

    def failed(self, channel: Channel, deploy_id: str) -> frozenset[str]:
        return failed_instances(self.s3, self.bucket, self.layout, channel.stage, channel.role, deploy_id, self.policy)

    def _get(self, key: str) -> bytes | None:
        found = get_document(self.s3, self.bucket, key, self.policy)
        return found[0] if found else None


class Gate(Cutover, Protocol):
    """What the runner needs of `deployer.agent.traffic.TrafficGate`."""

    def settle(self) -> str | None: ...


class DeployRunner:
    def __init__(
        self,
        config: AgentConfig,
        s3: S3Client,
        policy: RetryPolicy,
        *,
        ledger: Ledger,
        reporter: StatusReporter,
        instance_id: str,
        shutdown: Shutdown,
        verifier: Callable[[], DeployVerifier] = lambda: UNVERIFIED,
        traffic: Gate | None = None,
        protection: ScaleInProtection | None = None,
        history: History | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """The shutdown's `stop` (SIGTERM) ends a wait for the apply lock; its `abandon` (the grace
        ran out) ends the running apply's hooks, health-check waits and download retries.
        `verifier` opens history documents as the instance's current trust says; `history` is
        where they are read (the bucket, unless a test gives another). `traffic`, for an
        instance behind a load balancer, takes it out of service around each release switch."""
        self.config = config
        self.metrics = metrics
        #: The running apply's downloaded bytes, and whether it got past the verdict (for `metrics`).
        self._downloaded = 0
        self._attempted = False
        self.traffic = traffic
        self.protection = protection
        self.verifier = verifier
        self.s3 = s3
        self.policy = policy.interruptible(shutdown.abandon)
        self.ledger = ledger
        self.reporter = reporter
        self.instance_id = instance_id
        self.shutdown = shutdown
        self.layout = Layout(config.prefix)
        self.history = history or BucketHistory(s3, config.bucket, self.layout, self.policy)
        self.applier = Applier(
            s3=s3,
            root_dir=config.root_dir,
            hook_timeout=config.hook_timeout_seconds,
            policy=self.policy,
            interrupt=shutdown.abandon,
            secrets=SecretReader(config.region, config.endpoint_url, self.policy),
        )
        #: Runs each deploy's history GET beside its manifest and artifact fetch.
        self._lookups = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")

    def worth_retrying(self, deploy: Deploy) -> bool:
        """Reconcile must not re-run a deploy that can never succeed, or one failing over and over
        (the queue path bounds retries with maxReceiveCount; this is the same bound). A staged
        rollout's deploy is always worth a look: its cursor may have moved."""
        if deploy.rollout is not None:
            return True
        return not self._exhausted(deploy)

    def _exhausted(self, deploy: Deploy) -> bool:
        """Rejected for good, or failed `max_receive_count` times here."""
        record = self.ledger.deploy_record(deploy.deploy_id)
        if record is None:
            return False
        if record.status is DeployStatus.REJECTED or (
            record.status is DeployStatus.FAILED and record.attempts >= self.config.max_receive_count
        ):
            log.warning(
                "reconcile_skipped_failing_deploy",
                deploy_id=deploy.deploy_id,
                seq=deploy.seq,
                status=record.status.value,
                attempts=record.attempts,
                next="publish a new deploy (or a rollback) to move this channel",
            )
            return True
        return False

    def apply(self, deploy: Deploy) -> tuple[Outcome, str]:
        """Apply one deploy under the machine lock; record state and status. Returns the outcome and why."""
        structlog.contextvars.bind_contextvars(
            deploy_id=deploy.deploy_id, seq=deploy.seq, component=deploy.component, **deploy.deployment_attributes()
        )
        started, self._downloaded, self._attempted = time.monotonic(), 0, False
        outcome = self._apply_measured(deploy)
        # Measured: what was attempted under the lock and decided (a skip or a shutdown is neither).
        if self.metrics is not None and self._attempted and outcome[0] is not Outcome.INTERRUPTED:
            self.metrics.applied(deploy.component, outcome[0].value, time.monotonic() - started, self._downloaded)
        return outcome

    def _apply_measured(self, deploy: Deploy) -> tuple[Outcome, str]:
        try:
            with ApplyLock(self.config.state_dir, interrupt=self.shutdown.stop), self._marked_applying():
                # Re-check under the lock: another process (`deployer apply`, a second agent) may have won.
                state = self.ledger.load()
                verdict, why = decide_one(deploy, state.applied(), self.config.channels, state.seen)
                if verdict is Verdict.REJECTED:
                    log.error("apply_refused", reason=why, next="the message goes to the DLQ")
                    return Outcome.REJECTED, why
                if verdict is not Verdict.APPLY:
                    log.info("apply_skipped", verdict=verdict.value, reason=why)
                    return Outcome.APPLIED, why
                self._attempted = True
                if deploy.rollout is not None:
                    return self._apply_rollout(deploy, state)
                return self._apply_locked(deploy)
        except Interrupted as exc:  # stopped while waiting for another apply to release the lock
            log.info("apply_interrupted", reason=str(exc), next="the message is handed back; the next start applies it")
            return Outcome.INTERRUPTED, str(exc)
        finally:
            structlog.contextvars.unbind_contextvars("deploy_id", "seq", "component", *deploy.deployment_attributes())

    def repair(self, channel: Channel) -> bool:
        """Whether this channel's applied record was disowned because history does not confirm it.

        An instance that trusted a forged message before deploys were authenticated (or whose
        state file was tampered with) holds an applied seq that CI never wrote; every genuine
        deploy then looks stale. Reconcile calls this when the pointer looks older than what was
        applied: if `history/<applied seq>` is not that deploy, the record is dropped and the
        pointer is applied again.
        """
        with ApplyLock(self.config.state_dir, interrupt=self.shutdown.stop):
            state = self.ledger.load()
            claims = {claim for claim in (state.applied().get(channel), state.seen.get(channel)) if claim}
            for seq, deploy_id in sorted(claims):
                found = self.history.entry(channel, seq)
                if found is not None and self._opens_as(found, deploy_id):
                    continue
                self.ledger.disown(channel)
                log.error(
                    "applied_seq_unconfirmed",
                    channel=str(channel),
                    seq=seq,
                    deploy_id=deploy_id,
                    next="history does not confirm it: re-converging on the pointer",
                )
                return True
            return False

    def _apply_locked(self, deploy: Deploy) -> tuple[Outcome, str]:
        """Authenticate, then fresh / resume / finish / skip as `plan_start` says, then apply.

        Anyone who can send to the topic or the queue can put a well-formed deploy document in
        front of the agent; only CI can write `history/<seq>`. So nothing about a deploy is
        trusted — not its seq, not its deploy id, not an inline manifest — until `history/<seq>`
        is, byte for byte, the same document. That GET runs beside the manifest (if it is not
        inline) and the artifact download, both on every deploy's critical path: the artifact
        is streamed into a hidden staging directory meanwhile, and the applier waits for the
        confirmation before the release enters `releases/`, before any hook, before any record
        or status says anything (`_begin`). An unauthentic deploy is rejected as such whatever
        its manifest or artifact did.
        """
        record = self.ledger.deploy_record(deploy.deploy_id)
        started = time.monotonic()
        history = self._lookups.submit(self._authenticate, deploy)
        authentic = Confirmation(history.result)
        failure: Exception | None = None
        with ExitStack() as later:  # closed (the `applying` timer cancelled) before any outcome is noted
            try:
                release = self._fetch_manifest(deploy)
                start = plan_start(
                    record,
                    deploy.payload_hash(),
                    release_active=lambda: is_active(self.config.root_dir, release, deploy.release_id),
                )
                if start not in (Start.FRESH, Start.RESUME):
                    authentic.require()
                    return self._settle_start(deploy, start, record, started)

                def begin() -> None:
                    waiting = time.monotonic()
                    authentic.require()
                    self._begin(deploy, start, record, later, waited=time.monotonic() - waiting)

                # What the applier waits for before anything takes effect: history, then the start record.
                begun = Confirmation(begin)
                if not self._fetches_before_confirmation(release):
                    begun.require()
                result = self.applier.apply(
                    release,
                    deploy.release_id,
                    self._hook_env(deploy),
                    on_milestone=lambda milestone: self._record_progress(deploy, milestone),
                    artifact_size=deploy.artifact_size,
                    confirm=begun,
                    cutover=self._cutover(release),
                )
                self._downloaded = result.downloaded
            except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome; none may kill the agent
                failure = exc
        if failure is not None:
            try:
                authentic.require()  # an unauthentic deploy is rejected as such, whatever else failed
            except Exception as unauthentic:  # noqa: BLE001 - as above
                return self._failed(deploy, unauthentic, authentic=False)
            return self._failed(deploy, failure, authentic=True)
        return self._completed(deploy, started, reused=result.reused, output_tail=result.output_tail)

    def _cutover(self, release: Manifest) -> Cutover:
        """The load-balancer gate, unless there is none or the release serves no traffic."""
        if self.traffic is None or release.traffic is Traffic.NONE:
            return IN_PLACE
        return self.traffic

    def settle_traffic(self) -> str | None:
        """Put back into service whatever an apply (or a crash) left out of it; what was done, or None.

        Called after every outcome but a shutdown's, and at boot (a kill -9 mid-apply): the
        gate's marker is the record of what this agent took out.
        """
        if self.traffic is None:
            return None
        try:
            return self.traffic.settle()
        except Interrupted:
            return None  # the marker stays: the next start registers again

    def recover(self) -> None:
        """At boot, under the apply lock: what a killed apply left out of service goes back in, and
        a scale-in protection it left on is cleared."""
        if self.traffic is None and self.protection is None:
            return
        with ApplyLock(self.config.state_dir, interrupt=self.shutdown.stop):
            back = self.settle_traffic()
            if self.protection is not None:
                self.protection.recover()
        if back:
            log.warning("traffic_recovered", result=back, next="serving")

    def refresh_secrets(self) -> list[Channel]:
        """Apply each component's running release again with fresh secret values (rotated since it
        was deployed): the release is on disk, so only its hooks run, around the load balancer
        like any switch. The running deploys stay what the ledger says; nothing is recorded.
        Only components whose manifest names secrets are touched. The channels refreshed."""
        refreshed = []
        with ApplyLock(self.config.state_dir, interrupt=self.shutdown.stop):
            for channel, record in sorted(self.ledger.load().channels.items()):
                if channel not in self.config.channels:
                    continue
                deploy = self._running_deploy(channel, record.seq, record.deploy_id)
                release = self._fetch_manifest(deploy)
                if not release.secrets:
                    continue
                log.info("secrets_refresh_started", channel=str(channel), release_id=deploy.release_id)
                try:
                    self.applier.apply(
                        release, deploy.release_id, self._hook_env(deploy), cutover=self._cutover(release)
                    )
                finally:
                    back = self.settle_traffic()
                    if back:
                        log.info("traffic_settled", result=back)
                log.info("secrets_refreshed", channel=str(channel), release_id=deploy.release_id, next="serving")
                refreshed.append(channel)
        return refreshed

    def _running_deploy(self, channel: Channel, seq: int, deploy_id: str) -> Deploy:
        """The deploy the ledger says this channel runs, as CI wrote it (history, verified)."""
        found = self.history.entry(channel, seq)
        if found is None:
            raise Unauthentic(f"no history entry for seq {seq} of {channel}: the running deploy cannot be read back")
        recorded = self.verifier().open(found)
        if deploy_id == recorded.deploy_id + STABLE_SUFFIX and recorded.rollout is not None:
            recorded = recorded.stable_variant()
        if recorded.deploy_id != deploy_id:
            raise Unauthentic(
                f"seq {seq} of {channel} was published as {recorded.deploy_id}, not the running {deploy_id}"
            )
        return recorded

    def _settle_start(
        self, deploy: Deploy, start: Start, record: DeployRecord | None, started: float
    ) -> tuple[Outcome, str]:
        """An authenticated deploy `plan_start` says not to apply afresh: refuse, skip, or record completion."""
        if start is Start.REJECT:
            # Same idempotency key, different content: a corrupted ledger. Never apply it.
            error = f"deploy id {deploy.deploy_id} was seen before with a different payload"
            log.error("deploy_payload_mismatch", error=error, next="rejected; the earlier record stands")
            self.reporter.note(deploy.component, state=ComponentState.REJECTED, error=error)
            return Outcome.REJECTED, error
        assert record is not None
        if start is Start.SKIP_REJECTED:
            log.info("apply_skipped_rejected", error=record.error, next="rejected before; not attempted again")
            return Outcome.REJECTED, record.error or "rejected before"
        assert start is Start.FINISH
        self._resume(deploy, record)
        return self._completed(deploy, started, reused=True, output_tail="")

    def _begin(
        self, deploy: Deploy, start: Start, record: DeployRecord | None, later: ExitStack, waited: float
    ) -> None:
        """The deploy is CI's: record that it started (fsync'd) and report `applying` if it runs long.

        `waited` is how long the apply stood still for history's answer once the release was
        staged: ~0 when the history GET, sent beside the download, is off the critical path."""
        if start is Start.RESUME:
            assert record is not None
            self._resume(deploy, record)
        log.info("apply_started", release_id=deploy.release_id, history_waited_ms=round(waited * 1000, 1))
        self.ledger.mark(deploy, DeployStatus.IN_PROGRESS, Milestone.STARTED, authenticated=True)
        later.enter_context(self._report_applying_if_slow(deploy))
        if self.protection is not None:
            later.enter_context(self.protection.during_apply())

    def _resume(self, deploy: Deploy, record: DeployRecord) -> None:
        # We hold the lock, so the process that wrote this record is dead: resume.
        log.warning("apply_resumed_after_crash", milestone=record.milestone.value, attempts=record.attempts)
        # A crash counts as an attempt: a release whose hook takes the machine down must not loop forever.
        self.ledger.mark(deploy, DeployStatus.IN_PROGRESS, record.milestone, attempt=True, authenticated=True)

    def _fetches_before_confirmation(self, release: Manifest) -> bool:
        """Whether the artifact may be downloaded while history is still being read: only from this
        fleet's own bucket, which only CI writes. A forged document (an inline manifest is part of
        it) must not make an instance fetch from anywhere else before it is found out."""
        return release.src is not None and release.src.startswith(f"s3://{self.config.bucket}/")

    def _apply_rollout(self, deploy: Deploy, state: LocalState) -> tuple[Outcome, str]:
        """A staged rollout's deploy: the cursor says which of its two releases this instance runs.

        Nothing moves that is already where it belongs. An instance not admitted that already
        runs the stable release only records it (no download, no hook) and reports `waiting`;
        one that does not (a new instance, or an admitted one after an abort) applies it like
        any release. The deploy is authenticated against history before anything is recorded.
        """
        plan = deploy.rollout
        assert plan is not None
        try:
            cursor = self._cursor(deploy)
            cursor = self._pre_authorised_abort(deploy, plan, cursor)
        except Exception as exc:  # noqa: BLE001 - a network failure decides nothing; the message is retried
            return outcome_of(exc), f"cannot read the rollout cursor: {exc}"
        current = state.channels.get(deploy.channel)
        now = None
        if current is not None and base_id(current.deploy_id) == deploy.deploy_id:
            now = Side.STABLE if current.deploy_id.endswith(STABLE_SUFFIX) else Side.CANDIDATE
        zone = self.reporter.zone
        side = side_for(plan, deploy.deploy_id, self.instance_id, cursor, now, zone)
        target = deploy if side is Side.CANDIDATE else deploy.stable_variant()
        waiting = side is Side.STABLE and (cursor is None or cursor.state is RolloutState.ROLLING)
        wave = plan.wave_of(deploy.deploy_id, self.instance_id, zone)
        structlog.contextvars.bind_contextvars(deploy_id=target.deploy_id, release_id=target.release_id)
        if current is not None and current.deploy_id == target.deploy_id:
            log.info("rollout_unchanged", side=side.value, wave=wave, next="nothing to do")
            return Outcome.APPLIED, f"already on the rollout's {side.value} release"
        if self._exhausted(target):
            return Outcome.APPLIED, f"the rollout's {side.value} release cannot be applied here"
        if side is Side.STABLE and current is not None and current.release_id == target.release_id:
            try:
                self._authenticate(target)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome
                return self._failed(target, exc, authentic=False)
            log.info("rollout_holding_stable", wave=wave, cursor_wave=cursor.wave if cursor else None, next="waiting")
            self._transition(
                target,
                DeployStatus.COMPLETED,
                Milestone.POST_HOOKS_DONE,
                ComponentState.WAITING if waiting else ComponentState.OK,
            )
            return Outcome.APPLIED, f"runs the stable release; admitted in wave {wave}"
        log.info("rollout_moving", side=side.value, wave=wave, next=f"applying the {side.value} release")
        outcome, why = self._apply_locked(target)
        if outcome is Outcome.APPLIED and waiting:
            self._report(target, ComponentState.WAITING)
        return outcome, why

    def _pre_authorised_abort(self, deploy: Deploy, plan: Plan, cursor: Cursor | None) -> Cursor | None:
        """The cursor as this instance must act on it: aborted, when the plan's own rule says so
        (enough distinct admitted instances told that the candidate failed), whether or not a
        driver is alive to write that down. The rule can only send the fleet to the stable
        release the signed plan names: it is the cursor's ABORTED, nothing else."""
        if plan.abort_after is None or cursor is None or cursor.state is not RolloutState.ROLLING:
            return cursor
        why = plan.abort_fired(deploy.deploy_id, cursor, self.history.failed(deploy.channel, deploy.deploy_id))
        if why is None:
            return cursor
        log.warning("rollout_aborted_by_its_plan", reason=why, next="every instance returns to the stable release")
        return replace(cursor, state=RolloutState.ABORTED, reason=why)

    def _cursor(self, deploy: Deploy) -> Cursor | None:
        """The rollout's cursor, or None when there is none yet or it is not CI's (never admitted by a forgery)."""
        found = self.history.cursor(deploy.channel, deploy.deploy_id)
        if found is None:
            return None
        try:
            return self.verifier().open_cursor(found, deploy.deploy_id)
        except (InvalidMessage, Unauthentic) as exc:
            log.error(
                "rollout_cursor_rejected",
                key=self.layout.cursor_key(deploy.channel, deploy.deploy_id),
                error=str(exc),
                next="treated as absent: the stable release stays",
            )
            return None

    def _opens_as(self, raw: bytes, deploy_id: str) -> bool:
        try:
            return self.verifier().open(raw).deploy_id == deploy_id
        except (InvalidMessage, Unauthentic):
            return False

    def _authenticate(self, deploy: Deploy) -> None:
        key = self.layout.history_key(deploy.channel, deploy.seq)
        found = self.history.entry(deploy.channel, deploy.seq)
        if found is None:
            raise Unauthentic(f"no deploy was published as seq {deploy.seq} of {deploy.channel} (no {key})")
        try:
            recorded = self.verifier().open(found)
        except Unauthentic as exc:
            raise Unauthentic(f"{key} is not signed as this instance's trust requires: {exc}") from None
        except InvalidMessage as exc:
            raise Unauthentic(
                f"{key} is not a valid deploy document ({exc}); nothing to authenticate against"
            ) from None
        if recorded.rollout is not None and deploy.deploy_id == recorded.deploy_id + STABLE_SUFFIX:
            recorded = recorded.stable_variant()  # the stable side of a rollout CI published
        if recorded != deploy:
            raise Unauthentic(
                f"seq {deploy.seq} of {deploy.channel} was published as deploy {recorded.deploy_id} "
                f"(release {recorded.release_id}); this message differs from it"
            )

    def _failed(self, deploy: Deploy, exc: Exception, *, authentic: bool) -> tuple[Outcome, str]:
        outcome = outcome_of(exc)
        expected = isinstance(exc, DeployerError)
        error = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        if outcome is Outcome.INTERRUPTED:
            # Abandoned at shutdown: nothing is decided about the release. The ledger is left as a
            # kill -9 would leave it (in progress), so the next start resumes it.
            log.warning("apply_interrupted", error=error, next="the message is handed back; the next start resumes it")
            return outcome, error
        if outcome is Outcome.UNAUTHENTIC:
            # Not CI's: no record, no status change, the running release untouched.
            log.error("deploy_unauthentic", error=error, next="rejected to the DLQ; the running release stays")
            return outcome, error
        rejected = outcome is Outcome.REJECTED
        back = self.settle_traffic()  # whatever failed, the instance serves again before it says so
        if back:
            error = f"{error}; {back}"
        if expected:
            log.error(
                "apply_failed",
                **{DEPLOYMENT_STATUS: "failed"},
                error=error,
                outcome=outcome.value,
                next="left on the previous release" + ("" if rejected else "; will be retried"),
            )
        else:
            log.exception("apply_crashed", **{DEPLOYMENT_STATUS: "failed"}, error=error, next="will be retried")
        tail = exc.output_tail if isinstance(exc, HookFailed) else None
        # A network or AWS failure is not held against the release: it does not use up attempts.
        self._transition(
            deploy,
            DeployStatus.REJECTED if rejected else DeployStatus.FAILED,
            Milestone.STARTED,
            REPORTED_STATE[outcome],
            error=error,
            output_tail=tail or None,
            attempt=outcome is Outcome.FAILED,
            authenticated=authentic,
        )
        if authentic and outcome in INSTANCE_EVENTS:
            # A network failure (`unavailable`) is no verdict on the release, and tells nobody.
            self.reporter.tell(deploy_event(INSTANCE_EVENTS[outcome], deploy, instance=self.instance_id, reason=error))
        return outcome, error

    def _completed(self, deploy: Deploy, started: float, *, reused: bool, output_tail: str) -> tuple[Outcome, str]:
        self.settle_traffic()  # a resumed apply that had finished its hooks before a crash
        log.info(
            "apply_succeeded",
            **{DEPLOYMENT_STATUS: "succeeded"},
            release_id=deploy.release_id,
            reused=reused,
            duration_s=round(time.monotonic() - started, 3),
        )
        self._transition(
            deploy,
            DeployStatus.COMPLETED,
            Milestone.POST_HOOKS_DONE,
            ComponentState.OK,
            output_tail=output_tail or None,
        )
        return Outcome.APPLIED, "applied"

    def _transition(
        self,
        deploy: Deploy,
        status: DeployStatus,
        milestone: Milestone,
        state: ComponentState,
        *,
        error: str | None = None,
        attempt: bool = False,
        authenticated: bool = False,
        **report: Any,
    ) -> None:
        """Where a deploy ended, in the one order that survives a crash: the ledger first (fsync'd;
        what the next start trusts), then the status report (noted, flushed once the message is
        settled), so a report never says more than the ledger holds. `report`: more fields of the
        component's status (`output_tail`)."""
        self.ledger.mark(deploy, status, milestone, error=error, attempt=attempt, authenticated=authenticated)
        self._report(deploy, state, error=error, **report)

    def _report(self, deploy: Deploy, state: ComponentState, *, error: str | None = None, **extra: Any) -> None:
        """This deploy's component status: its state, and which deploy that state is about.

        Noted, not written: the caller (the loop) flushes it once the message is settled, so an
        outcome's report costs no time between the apply and the acknowledgement. `applying`
        is the exception, written at once by `_report_applying_if_slow`.
        """
        self.reporter.note(
            deploy.component,
            state=state,
            error=error,
            release_id=deploy.release_id,
            seq=deploy.seq,
            deploy_id=deploy.deploy_id,
            **extra,
        )

    def _fetch_manifest(self, deploy: Deploy) -> Manifest:
        expected_key = self.layout.manifest_key(deploy.component, deploy.release_id)
        if deploy.manifest_key != expected_key:
            raise InvalidMessage(f"manifest_key {deploy.manifest_key!r} is not {expected_key!r}")
        return fetch_release_manifest(deploy, self.config.bucket, self.s3, self.policy)

    def _hook_env(self, deploy: Deploy) -> dict[str, str]:
        return {
            "DEPLOYER_RELEASE_ID": deploy.release_id,
            "DEPLOYER_SEQ": str(deploy.seq),
            "DEPLOYER_DEPLOY_ID": deploy.deploy_id,
            "DEPLOYER_COMPONENT": deploy.component,
            "DEPLOYER_STAGE": deploy.stage,
            "DEPLOYER_ROLE": deploy.role,
            "DEPLOYER_INSTANCE_ID": self.instance_id,
        }

    def _record_progress(self, deploy: Deploy, milestone: Milestone) -> None:
        # Only POST_HOOKS_DONE changes what a resume does (it skips the finished hooks); the other
        # milestones are not worth an fsync'd write on every deploy's critical path.
        if milestone is Milestone.POST_HOOKS_DONE:
            self.ledger.mark(deploy, DeployStatus.IN_PROGRESS, milestone)

    @contextmanager
    def _report_applying_if_slow(self, deploy: Deploy) -> Iterator[None]:
        """Report `applying` only once an apply has run for APPLYING_REPORT_DELAY_SECONDS.

        Most applies finish sooner, and their final report follows at once; skipping the
        intermediate write takes one S3 PUT per instance off every fast deploy. The lock makes
        sure a late `applying` write can never land after the final one.
        """
        lock = threading.Lock()
        finished = False

        def report() -> None:
            with lock:
                if not finished:
                    self._report(deploy, ComponentState.APPLYING)
                    self.reporter.flush()

        timer = threading.Timer(APPLYING_REPORT_DELAY_SECONDS, report)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            with lock:
                finished = True
            timer.cancel()

    @contextmanager
    def _marked_applying(self) -> Iterator[None]:
        """While set, a shutdown grants the apply its grace period instead of stopping it at once."""
        self.shutdown.applying.set()
        try:
            yield
        finally:
            self.shutdown.applying.clear()
