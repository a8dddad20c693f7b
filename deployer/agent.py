"""The instance agent: boot (queue first, then replay), then long-poll, decide, apply, report.

Boot order is the no-lost-deploy argument (DESIGN.md invariant 4): the queue and its
subscription exist before the pointers are read, so a deploy published before subscribing
is seen by the replay, one published after is delivered to the queue, and the seq check
removes the overlap. Periodic reconcile covers what SNS delays or drops.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import structlog

from deployer.apply import Applier, ApplyFailed, is_active
from deployer.aws import Clients
from deployer.config import AgentConfig
from deployer.decide import Decision, Incoming, Verdict, decide_batch, decide_one
from deployer.errors import ArtifactError, AwsError, DeployerError, FetchError, InvalidMessage, ManifestError
from deployer.fetch import read_source
from deployer.hooks import kill_running_hooks
from deployer.identity import resolve_instance_id
from deployer.layout import Layout
from deployer.lifecycle import autoscaling_client, deregister, finish_launch
from deployer.limits import MAX_MANIFEST_BYTES
from deployer.manifest import Manifest, parse_manifest
from deployer.pointers import read_pointer
from deployer.protocol import Deploy, parse_deploy
from deployer.queue import InstanceQueue, Received, unwrap_body
from deployer.retry import DEFAULT_POLICY, RetryPolicy
from deployer.state import ApplyLock, DeployStatus, Milestone, StateStore
from deployer.status import ComponentState, ComponentStatus, StatusReporter

log = structlog.get_logger(__name__)

#: Reconcile runs at interval × (1 ± this), so a fleet started together does not read S3 in lockstep.
RECONCILE_JITTER = 0.1
#: Longest pause between polls after repeated failures (each already retried by the policy).
POLL_FAILURE_PAUSE_CAP_SECONDS = 60.0
#: A message whose apply failed is retried after 30 s, 60 s, 120 s, … (by SQS visibility), at most this.
RETRY_VISIBILITY_CAP_SECONDS = 900
#: Log event per verdict for messages acknowledged without applying.
SKIP_EVENTS = {
    Verdict.DUPLICATE: "message_duplicate",
    Verdict.STALE: "message_stale",
    Verdict.SUPERSEDED: "message_superseded",
    Verdict.NOT_MINE: "message_not_mine",
}


class Agent:
    def __init__(self, config: AgentConfig, clients: Clients, policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self.config = config
        self.clients = clients
        self._stop = threading.Event()
        self.policy = policy.interruptible(self._stop)
        self._shutdown_policy = policy
        self.layout = Layout(config.prefix)
        self.state = StateStore(config.state_dir)
        self.applier = Applier(
            s3=clients.s3, root_dir=config.root_dir, hook_timeout=config.hook_timeout_seconds, policy=self.policy
        )
        self.instance_id = ""
        self.queue: InstanceQueue | None = None
        self.reporter: StatusReporter | None = None
        self._applying = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def boot(self) -> None:
        """Identity, queue + subscription FIRST, then replay the pointers in component order."""
        self.instance_id = resolve_instance_id(self.config.instance_id, self.config.metadata_endpoint)
        structlog.contextvars.bind_contextvars(instance_id=self.instance_id)
        self.queue = InstanceQueue(self.clients.sqs, self.clients.sns, self.config, self.instance_id, self.policy)
        self.queue.ensure()
        self.reporter = StatusReporter(
            self.clients.s3,
            self.config.bucket,
            self.layout,
            stage=self.config.stage,
            role=self.config.role,
            instance_id=self.instance_id,
            components=self.config.components,
            policy=self.policy,
        )
        self._seed_status()
        self.reporter.write()
        self.reconcile(reason="boot")
        if self.config.lifecycle_hook_name and not self._stop.is_set():
            # Enter service only on the current release: CONTINUE, or ABANDON if a component failed.
            finish_launch(
                autoscaling_client(self.config),
                self.config,
                self.instance_id,
                {name: status.state for name, status in self.reporter.components.items()},
                self.policy,
            )

    def run(self) -> None:
        """Boot, then serve until SIGTERM/SIGINT. Returns normally on a requested stop."""
        self._install_signal_handlers()
        self.boot()
        next_reconcile = self._next(self.config.reconcile_interval_seconds)
        next_heartbeat = self._next(self.config.heartbeat_interval_seconds, jitter=0.0)
        log.info("agent_serving", queue=self.queue.name if self.queue else None)
        failures = 0
        while not self._stop.is_set():
            try:
                self.poll_once()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the agent outlives any one failed poll
                failures += 1
                pause = min(POLL_FAILURE_PAUSE_CAP_SECONDS, 2.0**failures) * random.uniform(0.5, 1.0)
                log.error(
                    "poll_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    pause_s=round(pause, 2),
                    next="polling again after the pause",
                )
                self._stop.wait(pause)
            now = time.monotonic()
            if not self._stop.is_set() and now >= next_reconcile:
                self.reconcile(reason="periodic")
                next_reconcile = self._next(self.config.reconcile_interval_seconds)
            if now >= next_heartbeat and self.reporter:
                self.reporter.write()
                next_heartbeat = self._next(self.config.heartbeat_interval_seconds, jitter=0.0)
        if self.config.deregister_on_shutdown and self.queue is not None and self.queue.handle is not None:
            try:
                deregister(
                    self.clients,
                    self.config,
                    self.instance_id,
                    subscription_arn=self.queue.handle.subscription_arn,
                    policy=self._shutdown_policy,  # the stop flag is set; this must still retry
                )
            except Exception as exc:  # noqa: BLE001 - whatever is left, `deployer gc` removes after its TTL
                log.error("deregister_failed", error=str(exc), next="deployer gc removes the rest after its TTL")
        log.info("agent_stopped", next="exit 0")

    def stop(self) -> None:
        self._stop.set()

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info(
                "shutdown_requested",
                signal=signal.Signals(signum).name,
                next="finishing the current step, handing back unprocessed messages",
            )
            if not self._stop.is_set() and self._applying.is_set():
                timer = threading.Timer(self.config.shutdown_grace_seconds, self._abandon_apply)
                timer.daemon = True
                timer.start()
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _abandon_apply(self) -> None:
        """The grace period ran out mid-apply: stop now. Every on-disk step is crash-safe (temp file +
        rename, atomic symlink swap, idempotency record), so this leaves what a kill -9 would, and
        the restarted agent resumes; the in-flight message comes back after its visibility timeout."""
        killed = kill_running_hooks()
        log.warning("apply_abandoned", grace_s=self.config.shutdown_grace_seconds, hooks_killed=killed, next="exit 0")
        os._exit(0)

    @staticmethod
    def _next(interval: float, jitter: float = RECONCILE_JITTER) -> float:
        return time.monotonic() + interval * random.uniform(1 - jitter, 1 + jitter)

    def _seed_status(self) -> None:
        assert self.reporter is not None
        for channel, record in self.state.load().channels.items():
            if channel in self.config.channels:
                self.reporter.components[channel.component] = ComponentStatus(
                    state=ComponentState.OK, release_id=record.release_id, seq=record.seq, deploy_id=record.deploy_id
                )

    # -- reconcile -------------------------------------------------------------------------

    def reconcile(self, reason: str) -> None:
        """Read every component's pointer (in boot order) and apply whatever we are behind on."""
        for channel in self.config.channels:
            if self._stop.is_set():
                return
            try:
                pointer = read_pointer(self.clients.s3, self.config.bucket, self.layout, channel, self.policy)
            except InvalidMessage as exc:
                log.error("pointer_invalid", channel=str(channel), error=str(exc), next="ignored until it is rewritten")
                continue
            except Exception as exc:  # noqa: BLE001 - one unreadable channel must not stop the others
                log.warning(
                    "pointer_unreadable", channel=str(channel), error=str(exc), next="retried at the next reconcile"
                )
                continue
            if pointer is None:
                log.info("pointer_absent", channel=str(channel), reason=reason)
                continue
            deploy = pointer.deploy
            verdict, _ = decide_one(deploy, self.state.applied(), self.config.channels)
            if verdict is not Verdict.APPLY:
                log.debug("reconcile_up_to_date", channel=str(channel), seq=deploy.seq, verdict=verdict.value)
                continue
            if not self._worth_retrying(deploy):
                continue
            log.info("reconcile_behind", channel=str(channel), seq=deploy.seq, reason=reason)
            self.apply_deploy(deploy)

    def _worth_retrying(self, deploy: Deploy) -> bool:
        """Reconcile must not re-run a deploy that can never succeed, or one failing over and over
        (the queue path bounds retries with maxReceiveCount; this is the same bound)."""
        record = self.state.deploy_record(deploy.deploy_id)
        if record is None:
            return True
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
            return False
        return True

    # -- queue -----------------------------------------------------------------------------

    def poll_once(self) -> None:
        assert self.queue is not None
        messages = self.queue.receive(self.config.poll_wait_seconds)
        if not messages:
            return
        by_receipt = {m.receipt_handle: m for m in messages}
        decisions = decide_batch([self._parse(m) for m in messages], self.state.applied(), self.config.channels)
        # Acknowledge and log everything that needs no apply first: it is cheap and final.
        pending: list[Decision] = []
        for decision in decisions:
            if decision.verdict is Verdict.APPLY:
                pending.append(decision)
            else:
                self._settle(by_receipt[decision.incoming.receipt_handle], decision)
        order = {c: i for i, c in enumerate(self.config.components)}
        pending.sort(key=lambda d: order[d.incoming.deploy.component] if d.incoming.deploy else 0)
        for index, decision in enumerate(pending):
            message = by_receipt[decision.incoming.receipt_handle]
            if self._stop.is_set():
                for later in pending[index:]:
                    self.queue.set_visibility(later.incoming.receipt_handle, 0)
                log.info("messages_handed_back", count=len(pending) - index)
                return
            assert decision.incoming.deploy is not None
            with self._visibility_heartbeat(message.receipt_handle):
                outcome = self.apply_deploy(decision.incoming.deploy)
            if outcome is ComponentState.FAILED:
                # Not deleted: SQS redelivers it after a backoff (set through its visibility), up to
                # maxReceiveCount times, then moves it to the DLQ.
                retry_in = min(RETRY_VISIBILITY_CAP_SECONDS, 30 * 2 ** (message.receive_count - 1))
                self.queue.set_visibility(message.receipt_handle, retry_in)
                log.warning(
                    "message_kept_for_retry",
                    message_id=message.message_id,
                    receive_count=message.receive_count,
                    retry_in_s=retry_in,
                    next="SQS redelivers it after retry_in_s; the DLQ after maxReceiveCount",
                )
                continue
            if outcome is ComponentState.REJECTED:
                self.queue.dead_letter(message, "apply rejected the release")
                continue
            self.queue.delete(message.receipt_handle)

    def _parse(self, message: Received) -> Incoming:
        try:
            deploy = parse_deploy(unwrap_body(message.body))
        except InvalidMessage as exc:
            return Incoming(message.message_id, message.receipt_handle, None, str(exc))
        return Incoming(message.message_id, message.receipt_handle, deploy)

    def _settle(self, message: Received, decision: Decision) -> None:
        assert self.queue is not None
        deploy = decision.incoming.deploy
        fields: dict[str, object] = {
            "message_id": message.message_id,
            "verdict": decision.verdict.value,
            "reason": decision.reason,
        }
        if deploy is not None:
            fields.update(deploy_id=deploy.deploy_id, seq=deploy.seq, component=deploy.component)
        if decision.verdict is Verdict.REJECTED:
            log.error("message_rejected", **fields, next="moved to the DLQ; it will never be applied")
            self.queue.dead_letter(message, decision.reason)
            if self.reporter:
                self.reporter.reject_message(message.message_id, decision.reason)
            return
        log.info(SKIP_EVENTS[decision.verdict], **fields, next="acknowledged without applying")
        self.queue.delete(message.receipt_handle)

    @contextmanager
    def _marked_applying(self) -> Iterator[None]:
        self._applying.set()
        try:
            yield
        finally:
            self._applying.clear()

    @contextmanager
    def _visibility_heartbeat(self, receipt_handle: str) -> Iterator[None]:
        """Keep extending the message's visibility while it is being applied, so SQS never hands it
        to anyone again mid-apply however long the hooks take."""
        assert self.queue is not None
        queue = self.queue
        timeout = self.config.visibility_timeout_seconds
        done = threading.Event()

        def beat() -> None:
            while not done.wait(timeout / 3):
                try:
                    queue.set_visibility(receipt_handle, timeout)
                except Exception as exc:  # noqa: BLE001 - a missed beat only risks a duplicate, which is harmless
                    log.warning("visibility_extend_failed", error=str(exc))

        thread = threading.Thread(target=beat, name="visibility-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    # -- apply -----------------------------------------------------------------------------

    def apply_deploy(self, deploy: Deploy) -> ComponentState:
        """Apply one deploy under the machine lock; record state and status. Returns the outcome."""
        assert self.reporter is not None
        structlog.contextvars.bind_contextvars(deploy_id=deploy.deploy_id, seq=deploy.seq, component=deploy.component)
        try:
            with ApplyLock(self.config.state_dir), self._marked_applying():
                # Re-check under the lock: another process (`deployer apply`, a second agent) may have won.
                verdict, why = decide_one(deploy, self.state.applied(), self.config.channels)
                if verdict is Verdict.REJECTED:
                    log.error("apply_refused", reason=why)
                    return ComponentState.REJECTED
                if verdict is not Verdict.APPLY:
                    log.info("apply_skipped", verdict=verdict.value, reason=why)
                    return ComponentState.OK
                return self._apply_locked(deploy)
        finally:
            structlog.contextvars.unbind_contextvars("deploy_id", "seq", "component")

    def _apply_locked(self, deploy: Deploy) -> ComponentState:
        assert self.reporter is not None
        record = self.state.deploy_record(deploy.deploy_id)
        if record is not None and record.payload_hash != deploy.payload_hash():
            # Same idempotency key, different content: a forged or corrupted message. Never apply it.
            error = f"deploy id {deploy.deploy_id} was seen before with a different payload"
            log.error("deploy_payload_mismatch", error=error, next="rejected; the earlier record stands")
            self.reporter.update(deploy.component, state=ComponentState.REJECTED, error=error)
            return ComponentState.REJECTED
        if record is not None and record.status is DeployStatus.REJECTED:
            log.info("apply_skipped_rejected", error=record.error, next="rejected before; not attempted again")
            return ComponentState.REJECTED
        started = time.monotonic()
        try:
            manifest = self._fetch_manifest(deploy)
            if record is not None and record.status is DeployStatus.IN_PROGRESS:
                # We hold the lock, so the process that wrote this record is dead: resume.
                log.warning("apply_resumed_after_crash", milestone=record.milestone.value, attempts=record.attempts)
                # A crash counts as an attempt: a release whose hook takes the machine down must not loop forever.
                self.state.mark(deploy, DeployStatus.IN_PROGRESS, record.milestone, attempt=True)
                if record.milestone is Milestone.POST_HOOKS_DONE and is_active(
                    self.config.root_dir, manifest, deploy.release_id
                ):
                    return self._completed(deploy, started, reused=True, output_tail="")
            log.info("apply_started", release_id=deploy.release_id)
            self.state.mark(deploy, DeployStatus.IN_PROGRESS, Milestone.STARTED)
            self.reporter.update(
                deploy.component,
                state=ComponentState.APPLYING,
                error=None,
                release_id=deploy.release_id,
                seq=deploy.seq,
                deploy_id=deploy.deploy_id,
            )
            result = self.applier.apply(
                manifest,
                deploy.release_id,
                self._hook_env(deploy),
                on_milestone=lambda milestone: self.state.mark(deploy, DeployStatus.IN_PROGRESS, milestone),
            )
        except (ApplyFailed, DeployerError) as exc:
            permanent = exc.permanent if isinstance(exc, ApplyFailed) else _is_permanent(exc)
            state = ComponentState.REJECTED if permanent else ComponentState.FAILED
            status = DeployStatus.REJECTED if permanent else DeployStatus.FAILED
            # A network or AWS failure is not held against the release: it does not use up attempts.
            infrastructure = (
                exc.infrastructure if isinstance(exc, ApplyFailed) else isinstance(exc, FetchError | AwsError)
            )
            blame = not infrastructure
            self.state.mark(deploy, status, Milestone.STARTED, error=str(exc), attempt=blame)
            log.error(
                "apply_failed",
                error=str(exc),
                state=state.value,
                next="left on the previous release" + ("" if permanent else "; will be retried"),
            )
            self.reporter.update(
                deploy.component,
                state=state,
                error=str(exc),
                release_id=deploy.release_id,
                seq=deploy.seq,
                deploy_id=deploy.deploy_id,
                output_tail=getattr(exc, "output_tail", "") or None,
            )
            return state
        except Exception as exc:
            log.exception("apply_crashed", error=str(exc), next="will be retried")
            self.state.mark(
                deploy, DeployStatus.FAILED, Milestone.STARTED, error=f"{type(exc).__name__}: {exc}", attempt=True
            )
            self.reporter.update(deploy.component, state=ComponentState.FAILED, error=f"{type(exc).__name__}: {exc}")
            return ComponentState.FAILED
        return self._completed(deploy, started, reused=result.reused, output_tail=result.output_tail)

    def _completed(self, deploy: Deploy, started: float, *, reused: bool, output_tail: str) -> ComponentState:
        assert self.reporter is not None
        self.state.mark(deploy, DeployStatus.COMPLETED, Milestone.POST_HOOKS_DONE)
        log.info(
            "apply_succeeded",
            release_id=deploy.release_id,
            reused=reused,
            duration_s=round(time.monotonic() - started, 3),
        )
        self.reporter.update(
            deploy.component,
            state=ComponentState.OK,
            error=None,
            release_id=deploy.release_id,
            seq=deploy.seq,
            deploy_id=deploy.deploy_id,
            output_tail=output_tail or None,
        )
        return ComponentState.OK

    def _fetch_manifest(self, deploy: Deploy) -> Manifest:
        expected_key = self.layout.manifest_key(deploy.component, deploy.release_id)
        if deploy.manifest_key != expected_key:
            raise InvalidMessage(f"manifest_key {deploy.manifest_key!r} is not {expected_key!r}")
        url = f"s3://{self.config.bucket}/{deploy.manifest_key}"
        data = read_source(url, self.clients.s3, MAX_MANIFEST_BYTES, self.policy)
        digest = hashlib.sha256(data).hexdigest()
        if digest != deploy.manifest_sha256:
            raise InvalidMessage(f"manifest sha256 {digest} does not match the deploy's {deploy.manifest_sha256}")
        return parse_manifest(data)

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


def _is_permanent(exc: DeployerError) -> bool:
    """Input that can never succeed however often it is retried."""
    return isinstance(exc, InvalidMessage | ManifestError | ArtifactError)
