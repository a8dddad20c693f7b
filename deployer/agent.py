"""The instance agent: boot (queue first, then replay), then long-poll, decide, apply, report.

Boot order is the no-lost-deploy argument (DESIGN.md invariant 4): the queue and its
subscription exist before the pointers are read, so a deploy published before subscribing
is seen by the replay, one published after is delivered to the queue, and the seq check
removes the overlap. Periodic reconcile covers what SNS delays or drops.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import structlog

from deployer.aws import Clients
from deployer.config import AgentConfig
from deployer.decide import Decision, Incoming, Verdict, decide_batch, decide_one
from deployer.errors import InvalidMessage
from deployer.hooks import kill_running_hooks
from deployer.identity import resolve_instance_id
from deployer.layout import Layout
from deployer.lifecycle import autoscaling_client, deregister, finish_launch
from deployer.memory import release_free_memory
from deployer.pointers import read_pointer
from deployer.protocol import parse_deploy
from deployer.queue import InstanceQueue, Received, unwrap_body
from deployer.retry import DEFAULT_POLICY, RetryPolicy
from deployer.runner import DeployRunner
from deployer.state import StateStore
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
        self.instance_id = ""
        self.queue: InstanceQueue | None = None
        self.reporter: StatusReporter | None = None
        self.runner: DeployRunner | None = None

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
        self.runner = DeployRunner(
            self.config,
            self.clients,
            self.policy,
            state=self.state,
            reporter=self.reporter,
            instance_id=self.instance_id,
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
        release_free_memory(freeze=True)  # boot parsed service models and applied releases; keep idle RSS low
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
            if not self._stop.is_set() and self.runner is not None and self.runner.applying.is_set():
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
        assert self.runner is not None
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
            if not self.runner.worth_retrying(deploy):
                continue
            log.info("reconcile_behind", channel=str(channel), seq=deploy.seq, reason=reason)
            self.runner.apply(deploy)

    # -- queue -----------------------------------------------------------------------------

    def poll_once(self) -> None:
        assert self.queue is not None
        assert self.runner is not None
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
                outcome = self.runner.apply(decision.incoming.deploy)
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
        if pending:
            release_free_memory()  # an apply's buffers (prefetch, tar, hooks' output) are garbage now

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
