"""Apply one deploy on this instance, exactly once: idempotency records, lock, status, outcome.

The agent decides *which* deploys to apply (queue batches, reconcile); this module applies one,
under the machine-wide lock, and turns whatever happened into an outcome the caller acts on:
OK (acknowledge), FAILED (retry later) or REJECTED (never retry; dead-letter the message).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from deployer.apply import Applier, ApplyFailed, is_active
from deployer.aws import Clients
from deployer.config import AgentConfig
from deployer.decide import Verdict, decide_one
from deployer.errors import ArtifactError, AwsError, DeployerError, FetchError, InvalidMessage, ManifestError
from deployer.fetch import read_source
from deployer.layout import Layout
from deployer.limits import MAX_MANIFEST_BYTES
from deployer.manifest import Manifest, parse_manifest
from deployer.protocol import Deploy
from deployer.retry import RetryPolicy
from deployer.state import ApplyLock, DeployStatus, Milestone, StateStore
from deployer.status import ComponentState, StatusReporter

log = structlog.get_logger(__name__)

#: An apply still running after this long is reported as `applying` (see _report_applying_if_slow).
APPLYING_REPORT_DELAY_SECONDS = 1.0


class DeployRunner:
    def __init__(
        self,
        config: AgentConfig,
        clients: Clients,
        policy: RetryPolicy,
        *,
        state: StateStore,
        reporter: StatusReporter,
        instance_id: str,
    ) -> None:
        self.config = config
        self.clients = clients
        self.policy = policy
        self.state = state
        self.reporter = reporter
        self.instance_id = instance_id
        self.layout = Layout(config.prefix)
        self.applier = Applier(
            s3=clients.s3, root_dir=config.root_dir, hook_timeout=config.hook_timeout_seconds, policy=policy
        )
        #: Set while an apply runs, so a shutdown knows to grant it a grace period.
        self.applying = threading.Event()

    def worth_retrying(self, deploy: Deploy) -> bool:
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

    def apply(self, deploy: Deploy) -> ComponentState:
        """Apply one deploy under the machine lock; record state and status. Returns the outcome."""
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
            with self._report_applying_if_slow(deploy):
                result = self.applier.apply(
                    manifest,
                    deploy.release_id,
                    self._hook_env(deploy),
                    on_milestone=lambda milestone: self._record_progress(deploy, milestone),
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
            self._report(deploy, state, error=str(exc), output_tail=getattr(exc, "output_tail", "") or None)
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
        self.state.mark(deploy, DeployStatus.COMPLETED, Milestone.POST_HOOKS_DONE)
        log.info(
            "apply_succeeded",
            release_id=deploy.release_id,
            reused=reused,
            duration_s=round(time.monotonic() - started, 3),
        )
        self._report(deploy, ComponentState.OK, output_tail=output_tail or None)
        return ComponentState.OK

    def _report(self, deploy: Deploy, state: ComponentState, *, error: str | None = None, **extra: Any) -> None:
        """This deploy's component status: its state, and which deploy that state is about."""
        self.reporter.update(
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

    def _record_progress(self, deploy: Deploy, milestone: Milestone) -> None:
        # Only POST_HOOKS_DONE changes what a resume does (it skips the finished hooks); the other
        # milestones are not worth an fsync'd write on every deploy's critical path.
        if milestone is Milestone.POST_HOOKS_DONE:
            self.state.mark(deploy, DeployStatus.IN_PROGRESS, milestone)

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
        self.applying.set()
        try:
            yield
        finally:
            self.applying.clear()


def _is_permanent(exc: DeployerError) -> bool:
    """Input that can never succeed however often it is retried."""
    return isinstance(exc, InvalidMessage | ManifestError | ArtifactError)
