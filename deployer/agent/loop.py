"""The instance agent: boot (queue first, then replay), then long-poll, decide, apply, report.

Boot order is the no-lost-deploy argument (docs/design.md, "No deploy lost across boot"): the
queue and its subscription exist before the pointers are read, so a deploy published before
subscribing is seen by the replay, one published after is delivered to the queue, and the seq
check removes the overlap. Periodic reconcile covers what SNS delays or drops.

`boot` wires the real parts (SQS, S3, the ledger, the runner) into an `Agent`; the `Agent`
itself only sees ports (`InstanceQueue`, `Runner`, `Reporter`, a pointer reader), so unit tests
drive it with `MemoryQueue` and small fakes.
"""

from __future__ import annotations

import functools
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Protocol

import structlog

from deployer.agent.config import AgentConfig
from deployer.agent.decide import (
    HAND_BACK,
    Action,
    Decision,
    Disposition,
    Incoming,
    Outcome,
    Verdict,
    candidates,
    decide_batch,
    decide_one,
    dispose,
)
from deployer.agent.identity import resolve_instance_id, resolve_zone
from deployer.agent.launch import finish_launch
from deployer.agent.ledger import Ledger
from deployer.agent.lifecycle import LifecycleWatch, Step, is_warmed, read_state
from deployer.agent.memory import release_free_memory
from deployer.agent.metrics import Metrics
from deployer.agent.protection import ScaleInProtection
from deployer.agent.queue import InstanceQueue, Received, SqsQueue
from deployer.agent.reporter import StatusReporter
from deployer.agent.runner import DeployRunner
from deployer.agent.shutdown import Shutdown
from deployer.agent.termination import TerminateHook, apply_grace, keep_alive, left_marker, mark_left
from deployer.agent.traffic import gate_for
from deployer.agent.trust_store import NO_TRUST, TRUST_CACHE_NAME, TrustStore, load_trust_file
from deployer.apply.lock import ApplyLock
from deployer.aws.autoscaling import DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
from deployer.aws.clients import Clients, autoscaling_client, caller_userid
from deployer.aws.registration import remove_registration
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import get_document, read_pointer
from deployer.backoff import backoff_seconds
from deployer.protocol.deploy import Deploy, unwrap_body
from deployer.protocol.errors import Interrupted, QueueMissing, RejectedInput
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.limits import QUEUE_RECREATE_DELAY_SECONDS
from deployer.protocol.names import Channel, Owner
from deployer.protocol.report import ComponentState, ComponentStatus, Lifecycle
from deployer.protocol.trust import DeployVerifier

log = structlog.get_logger(__name__)

#: Reconcile runs at interval × (1 ± this), so a fleet started together does not read S3 in lockstep.
RECONCILE_JITTER = 0.1
#: Pause between polls after repeated failures (each already retried by the policy): 2 s, 4 s, … this,
#: which is SQS's re-create delay, so an agent healing a deleted queue tries again just after it.
POLL_FAILURE_PAUSE_BASE_SECONDS = 2.0
POLL_FAILURE_PAUSE_CAP_SECONDS = float(QUEUE_RECREATE_DELAY_SECONDS)
#: Pause between boot attempts: 5 s, 10 s, … 5 min, half-jittered so a fleet does not retry in step.
BOOT_RETRY_BASE_SECONDS = 5.0
BOOT_RETRY_CAP_SECONDS = 300.0
#: Log event per verdict for messages acknowledged without applying.
SKIP_EVENTS = {
    Verdict.DUPLICATE: "message_duplicate",
    Verdict.STALE: "message_stale",
    Verdict.SUPERSEDED: "message_superseded",
    Verdict.NOT_MINE: "message_not_mine",
}


class Trusts(Protocol):
    """What the loop needs of `TrustStore`: how to open deploy documents now, and moving trust forward."""

    def verifier(self) -> DeployVerifier: ...

    def refresh(self) -> object: ...

    def staleness(self, channel: Channel, since: str | None = None) -> str | None: ...


class Runner(Protocol):
    """What the loop needs of `DeployRunner` (the port unit tests fake)."""

    def apply(self, deploy: Deploy) -> tuple[Outcome, str]: ...

    def worth_retrying(self, deploy: Deploy) -> bool: ...

    def repair(self, channel: Channel) -> bool: ...


class Reporter(Protocol):
    """What the loop needs of `StatusReporter`."""

    def write(self) -> None: ...

    def flush(self) -> None: ...

    def reject_message(self, message_id: str, reason: str) -> None: ...

    def vouched(self, component: str, stale_since: str | None) -> None: ...

    def stale_since(self, component: str) -> str | None: ...


#: What a failed step of the loop leads to, for its log line.
_NEXT_AFTER_FAILURE = {
    "poll": "polling again after a pause",
    "reconcile": "reconciling again at the next interval; deploys still arrive through the queue",
    "heartbeat": "writing the report again at the next heartbeat",
}


class Agent:
    """The long-poll loop over ports: receive, decide, apply, settle; reconcile and heartbeat on timers."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        queue: InstanceQueue,
        runner: Runner,
        reporter: Reporter,
        ledger: Ledger,
        pointer: Callable[[Channel], Deploy | None],
        stop: threading.Event,
        trust: Trusts = NO_TRUST,
    ) -> None:
        self.config = config
        self.queue = queue
        self.runner = runner
        self.reporter = reporter
        self.ledger = ledger
        self.pointer = pointer
        self.stop = stop
        self.trust = trust
        #: Set when SQS said the queue is gone; `heal` clears it once queue and subscription exist again.
        self.queue_missing = False

    # -- serving ---------------------------------------------------------------------------

    def serve(self) -> None:
        """Poll until the stop flag is set; reconcile and heartbeat on their timers.

        One exception boundary for every step of a pass (`_guarded`): whatever a poll, a heal, a
        periodic reconcile or a heartbeat raises — a busy apply lock, a corrupt ledger, AWS
        failing during a repair — is logged with what happens next, and the loop goes on.
        Only a shutdown ends it. A failed step does not skip the others: reconcile and the
        heartbeat still run on their timers while SQS is down.
        """
        next_reconcile = _next(self.config.reconcile_interval_seconds)
        next_heartbeat = _next(self.config.heartbeat_interval_seconds, jitter=0.0)
        release_free_memory(freeze=True)  # boot parsed service models and applied releases; keep idle RSS low
        log.info("agent_serving", queue=self.queue.name)
        failures = 0
        while not self.stop.is_set():
            polled = self._guarded("poll", self._poll)
            if polled is False:
                failures += 1
                pause = backoff_seconds(
                    failures, base=POLL_FAILURE_PAUSE_BASE_SECONDS, cap=POLL_FAILURE_PAUSE_CAP_SECONDS, jitter=0.5
                )
                log.info("poll_paused", pause_s=round(pause, 2), next="polling again after the pause")
                self.stop.wait(pause)
            elif polled is True:
                failures = 0
            now = time.monotonic()
            if not self.stop.is_set() and now >= next_reconcile:
                self._guarded("reconcile", lambda: self.reconcile(reason="periodic"))
                next_reconcile = _next(self.config.reconcile_interval_seconds)
            if now >= next_heartbeat:
                self._guarded("heartbeat", self.reporter.write)
                next_heartbeat = _next(self.config.heartbeat_interval_seconds, jitter=0.0)

    def _poll(self) -> None:
        if self.queue_missing:
            self.heal()
        self.poll_once()

    def _guarded(self, step: str, run: Callable[[], object]) -> bool | None:
        """Run one step of a pass: True if it finished, False if it failed, None if the queue is gone.

        A shutdown during the step stops the loop (the flag is set); a deleted queue is marked
        for `heal`; anything else is logged and the loop carries on.
        """
        try:
            run()
            return True
        except Interrupted:
            self.stop.set()
            return True
        except QueueMissing as exc:
            log.error(
                "queue_missing", queue=self.queue.name, error=str(exc), next="re-creating queue, DLQ and subscription"
            )
            self.queue_missing = True
            return None  # straight to heal(): no pause
        except Exception as exc:  # noqa: BLE001 - the agent outlives any one failed step
            log.error(
                "queue_recreate_failed" if step == "poll" and self.queue_missing else f"{step}_failed",
                error=f"{type(exc).__name__}: {exc}",
                next=_NEXT_AFTER_FAILURE[step]
                if not (step == "poll" and self.queue_missing)
                else "re-creating again after a pause (SQS refuses a deleted queue's name for 60 s)",
            )
            return False

    def heal(self) -> None:
        """Re-create queue, DLQ and subscription, then say so and catch up.

        Whatever was published while the queue was gone was never delivered: the report (gc may
        have deleted it too) is rewritten and the pointers are read, as at boot. A failure here
        (SQS refuses a deleted queue's name for 60 s) leaves `queue_missing` set; `serve` pauses
        with backoff and comes back, heartbeating and reconciling on its timers meanwhile.
        """
        self.queue.ensure()
        self.queue_missing = False
        log.info(
            "queue_recreated", queue=self.queue.name, next="reporting, then reconciling what was published meanwhile"
        )
        self.reporter.write()
        self.reconcile(reason="queue_recreated")

    # -- reconcile -------------------------------------------------------------------------

    def reconcile(self, reason: str) -> None:
        """Take any newer trust, then read every component's pointer (in boot order) and apply
        whatever we are behind on."""
        self._refresh_trust()
        for channel in self.config.channels:
            if self.stop.is_set():
                return
            try:
                # Before the pointer: a timestamp read now raises the floor this pointer is held to.
                stale = self.trust.staleness(channel, since=self.reporter.stale_since(channel.component))
                self.reporter.vouched(channel.component, stale)
                deploy = self.pointer(channel)
            except RejectedInput as exc:  # malformed, or not signed as the trust requires
                log.error(
                    "pointer_rejected",
                    channel=str(channel),
                    error=str(exc),
                    next="ignored until CI rewrites it; the running release stays",
                )
                continue
            except Interrupted:
                return
            except Exception as exc:  # noqa: BLE001 - one unreadable channel must not stop the others
                log.warning(
                    "pointer_unreadable", channel=str(channel), error=str(exc), next="retried at the next reconcile"
                )
                continue
            if deploy is None:
                log.info("pointer_absent", channel=str(channel), reason=reason)
                continue
            self._catch_up(channel, deploy, reason)
        self.reporter.flush()  # what reconcile learnt without applying anything (a timestamp's verdict)

    def _catch_up(self, channel: Channel, deploy: Deploy, reason: str) -> None:
        """Apply the channel's pointer if this instance is behind it (or a rollout's cursor moved)."""
        verdict = self._verdict(deploy)
        if verdict in (Verdict.STALE, Verdict.REJECTED) and self.runner.repair(channel):
            # What was applied is not in history (a forgery trusted before, a tampered state file).
            verdict = self._verdict(deploy)
        if verdict is not Verdict.APPLY:
            log.debug("reconcile_up_to_date", channel=str(channel), seq=deploy.seq, verdict=verdict.value)
            return
        if not self.runner.worth_retrying(deploy):
            return
        applied = self.ledger.load().applied().get(channel)
        if applied is None or deploy.seq > applied[0]:
            log.info("reconcile_behind", channel=str(channel), seq=deploy.seq, reason=reason)
        else:
            log.debug("reconcile_rollout_check", channel=str(channel), seq=deploy.seq, reason=reason)
        self.runner.apply(deploy)
        self.reporter.flush()

    def _refresh_trust(self) -> None:
        try:
            self.trust.refresh()
        except Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - the trust held stays in force; retried at the next reconcile
            log.warning(
                "trust_refresh_failed", error=f"{type(exc).__name__}: {exc}", next="retried at the next reconcile"
            )

    def _parse(self, message: Received) -> Incoming:
        """A message as the decision sees it: the deploy it carries, verified as the trust says, or why not."""
        try:
            deploy = self.trust.verifier().open(unwrap_body(message.body))
        except RejectedInput as exc:
            return Incoming(message.message_id, message.receipt_handle, None, str(exc))
        return Incoming(message.message_id, message.receipt_handle, deploy)

    def _verdict(self, deploy: Deploy) -> Verdict:
        state = self.ledger.load()
        return decide_one(deploy, state.applied(), self.config.channels, state.seen)[0]

    # -- queue -----------------------------------------------------------------------------

    def poll_once(self) -> None:
        """One receive: settle what needs no apply, then apply the rest in boot order, one channel at a time."""
        messages = self.queue.receive(self.config.poll_wait_seconds)
        if not messages:
            return
        by_receipt = {m.receipt_handle: m for m in messages}
        state = self.ledger.load()
        decisions = decide_batch([self._parse(m) for m in messages], state.applied(), self.config.channels, state.seen)
        tried = candidates(decisions)
        queued = {id(d) for listed in tried.values() for d in listed}
        # Acknowledge and log everything that needs no apply first: it is cheap and final.
        for decision in decisions:
            if id(decision) not in queued:
                self._settle_unapplied(by_receipt[decision.incoming.receipt_handle], decision)
        order = {c: i for i, c in enumerate(self.config.components)}
        channels = sorted(tried, key=lambda channel: order[channel.component])
        for index, channel in enumerate(channels):
            if self.stop.is_set():
                later = [by_receipt[d.incoming.receipt_handle] for c in channels[index:] for d in tried[c]]
                self._hand_back(later)
                return
            self._apply_channel(tried[channel], by_receipt)
        if channels:
            release_free_memory()  # an apply's buffers (prefetch, tar, hooks' output) are garbage now

    def _apply_channel(self, tried: list[Decision], by_receipt: Mapping[str, Received]) -> None:
        """Apply the channel's newest deploy; if it proves unauthentic, the next newest, and so on.

        Once one is settled, the older ones in the batch are acknowledged as superseded (or handed
        back with it, if a shutdown interrupted it). The outcome's status report is written after
        its message is settled: the acknowledgement is on the deploy's critical path, the report not.
        """
        pending = list(tried)
        outcome = Outcome.UNAUTHENTIC
        while pending and outcome is Outcome.UNAUTHENTIC:
            decision = pending.pop(0)
            message = by_receipt[decision.incoming.receipt_handle]
            if self.stop.is_set():
                self._hand_back([message, *(by_receipt[d.incoming.receipt_handle] for d in pending)])
                return
            assert decision.incoming.deploy is not None
            with self._visibility_heartbeat(message.receipt_handle):
                outcome, reason = self.runner.apply(decision.incoming.deploy)
            self._settle(message, dispose(outcome, message.receive_count), reason)
            if outcome is Outcome.UNAUTHENTIC:
                self.reporter.reject_message(message.message_id, reason)
            self.reporter.flush()
        rest = [by_receipt[d.incoming.receipt_handle] for d in pending]
        if outcome is Outcome.INTERRUPTED:
            self._hand_back(rest)
            return
        for decision, message in zip(pending, rest, strict=True):
            superseded = Decision(decision.incoming, Verdict.SUPERSEDED, "a newer seq of its channel was settled")
            self._settle_unapplied(message, superseded)

    def _hand_back(self, messages: Sequence[Received]) -> None:
        for message in messages:
            self._settle(message, HAND_BACK, "not started: shutting down")
        if messages:
            log.info("messages_handed_back", count=len(messages), next="SQS delivers them again at once")

    def _settle(self, message: Received, disposition: Disposition, reason: str) -> None:
        if disposition.action is Action.ACK:
            self._settle_alone(message, "delete", lambda: self.queue.delete(message.receipt_handle))
        elif disposition.action is Action.DEAD_LETTER:
            self._settle_alone(message, "dead_letter", lambda: self.queue.dead_letter(message, reason))
        else:
            if not self._settle_alone(
                message,
                "set_visibility",
                lambda: self.queue.set_visibility(message.receipt_handle, disposition.delay_s),
            ):
                return
            if disposition.delay_s:
                log.warning(
                    "message_kept_for_retry",
                    message_id=message.message_id,
                    receive_count=message.receive_count,
                    retry_in_s=disposition.delay_s,
                    next="SQS redelivers it after retry_in_s; the DLQ after maxReceiveCount",
                )

    def _settle_unapplied(self, message: Received, decision: Decision) -> None:
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
            self._settle_alone(message, "dead_letter", lambda: self.queue.dead_letter(message, decision.reason))
            self.reporter.reject_message(message.message_id, decision.reason)
            return
        log.info(SKIP_EVENTS[decision.verdict], **fields, next="acknowledged without applying")
        self._settle_alone(message, "delete", lambda: self.queue.delete(message.receipt_handle))

    def _settle_alone(self, message: Received, action: str, settle: Callable[[], None]) -> bool:
        """Settle one message on its own: its failure (retries spent) leaves it to SQS, not the batch.

        A message left unsettled comes back after its visibility timeout and is judged again (a
        duplicate is acknowledged then); after maxReceiveCount receives SQS redrives it to the
        DLQ itself. A stop or a vanished queue is not one message's problem and goes up.
        """
        try:
            settle()
        except (Interrupted, QueueMissing):
            raise
        except Exception as exc:  # noqa: BLE001 - the rest of the batch must still be settled
            log.error(
                "message_settle_failed",
                message_id=message.message_id,
                action=action,
                error=f"{type(exc).__name__}: {exc}",
                next="left in the queue: SQS delivers it again after its visibility timeout, "
                "and redrives it to the DLQ after maxReceiveCount receives",
            )
            return False
        return True

    @contextmanager
    def _visibility_heartbeat(self, receipt_handle: str) -> Iterator[None]:
        """Keep extending the message's visibility while it is being applied, so SQS never hands it
        to anyone again mid-apply however long the hooks take."""
        queue = self.queue
        timeout = self.config.visibility_timeout_seconds
        done = threading.Event()

        def beat() -> None:
            while not done.wait(timeout / 3):
                try:
                    queue.set_visibility(receipt_handle, timeout)
                except Exception as exc:  # noqa: BLE001 - a missed beat only risks a duplicate, which is harmless
                    log.warning("visibility_extend_failed", error=str(exc), next="extended again at the next beat")

        thread = threading.Thread(target=beat, name="visibility-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


@dataclass(frozen=True)
class Booted:
    """What boot built: the loop and the parts a clean shutdown needs. No optional parts."""

    agent: Agent
    instance_id: str
    queue: SqsQueue
    reporter: StatusReporter
    runner: DeployRunner


def boot(
    config: AgentConfig,
    clients: Clients,
    shutdown: Shutdown,
    policy: RetryPolicy = DEFAULT_POLICY,
    *,
    warmed: bool = False,
    first: bool = True,
) -> Booted:
    """One attempt: identity, queue + subscription FIRST, then replay the pointers in component order.

    Once the identity is known, a failure is written into the status report (`boot_error`)
    before it goes up, so an instance that cannot join is seen, not merely absent; the `first`
    attempt's failure is also told as an `Instance Boot Failed` event. `warmed`: launched into
    a warm pool (deployer.agent.lifecycle): every report says so from the first.
    """
    stoppable = policy.interruptible(shutdown.stop)
    metrics = Metrics(config.stage, config.role, config.metrics_textfile)
    instance_id = resolve_instance_id(config.instance_id, config.metadata_endpoint)
    zone = resolve_zone(config.availability_zone, config.instance_id, config.metadata_endpoint)
    structlog.contextvars.bind_contextvars(instance_id=instance_id)
    userid = caller_userid(config.region, config.endpoint_url, stoppable)
    owner = Owner.from_userid(userid, instance_id)
    if not owner.confined:
        log.warning(
            "owner_unconfined",
            userid=userid,
            next="status key and queue owner name the instance alone: IAM can only confine an EC2 instance-role session",
        )
    layout = Layout(config.prefix)
    ledger = Ledger(config.state_dir)
    reporter = StatusReporter(
        clients.s3,
        config.bucket,
        layout,
        ReportKey(config.stage, config.role, instance_id, owner.role_id),
        config.components,
        stoppable,
        zone=zone,
    )
    for channel, record in ledger.load().channels.items():
        if channel in config.channels:
            reporter.seed(
                channel.component,
                ComponentStatus(
                    state=ComponentState.OK, release_id=record.release_id, seq=record.seq, deploy_id=record.deploy_id
                ),
            )
    if warmed:
        reporter.lifecycle = Lifecycle.WARMED
    queue = SqsQueue(clients.sqs, clients.sns, config, instance_id, stoppable, owner_userid=userid)
    try:
        queue.ensure()
    except Interrupted:
        raise
    except Exception as exc:
        reporter.boot_failed(f"{type(exc).__name__}: {exc}", tell=first)
        raise
    reporter.write()
    trust = trust_store(config, clients, layout, stoppable)
    runner = build_runner(config, clients, shutdown, stoppable, ledger, reporter, trust, metrics)

    def pointer(channel: Channel) -> Deploy | None:
        found = read_pointer(clients.s3, config.bucket, layout, channel, stoppable, trust.verifier())
        return found.deploy if found else None

    agent = Agent(
        config,
        queue=queue,
        runner=runner,
        reporter=reporter,
        ledger=ledger,
        pointer=pointer,
        stop=shutdown.stop,
        trust=trust,
    )
    agent.reconcile(reason="boot")
    metrics.converged()
    # After the replay: a resumed apply rejoins by itself; what a kill left out of service (or
    # protected from scale-in) and nothing resumed is put right here.
    runner.recover()
    if config.lifecycle_hook_name and not shutdown.stop.is_set():
        # Enter service only on the current release: CONTINUE, or ABANDON if a component failed.
        finish_launch(
            autoscaling_client(config.region, config.endpoint_url),
            config,
            instance_id,
            reporter.states(),
            stoppable,
        )
    return Booted(agent, instance_id, queue, reporter, runner)


def trust_store(config: AgentConfig, clients: Clients, layout: Layout, policy: RetryPolicy) -> Trusts:
    """The trust this agent verifies with: none without `trust_file`, else the baked file moved
    forward by the signed updates in the bucket (`deployer.agent.trust_store`)."""
    if config.trust_file is None:
        return NO_TRUST

    def fetch(version: int) -> bytes | None:
        found = get_document(clients.s3, config.bucket, layout.trust_key(version), policy)
        return found[0] if found else None

    def fetch_timestamp(channel: Channel) -> bytes | None:
        found = get_document(clients.s3, config.bucket, layout.timestamp_key(channel), policy)
        return found[0] if found else None

    baked = load_trust_file(config.trust_file)
    return TrustStore(
        baked,
        required=config.require_signatures,
        cache=config.state_dir / TRUST_CACHE_NAME,
        fetch=fetch,
        fetch_timestamp=fetch_timestamp,
    )


def boot_until_ready(
    config: AgentConfig,
    clients: Clients,
    shutdown: Shutdown,
    policy: RetryPolicy = DEFAULT_POLICY,
    *,
    warmed: bool = False,
) -> Booted | None:
    """`boot`, retried with backoff until it succeeds or a stop is requested (then None).

    An agent that exits on a failed boot crash-loops under systemd and is invisible; one that
    retries keeps its report saying `boot_error` (heartbeating with each attempt) and joins by
    itself once the cause is gone (IAM fixed, throttling over, network back). A launch hook it
    never completes times out to the hook's DefaultResult, so Auto Scaling still decides.
    """
    attempt = 0
    while True:
        try:
            return boot(config, clients, shutdown, policy, warmed=warmed, first=attempt == 0)
        except Interrupted:
            return None
        except Exception as exc:  # noqa: BLE001 - whatever failed, the next attempt may succeed
            attempt += 1
            pause = backoff_seconds(attempt, base=BOOT_RETRY_BASE_SECONDS, cap=BOOT_RETRY_CAP_SECONDS, jitter=0.5)
            log.error(
                "boot_failed",
                error=f"{type(exc).__name__}: {exc}",
                attempt=attempt,
                retry_in_s=round(pause, 1),
                next="boot is retried after retry_in_s; the status report says boot_error meanwhile",
            )
            if shutdown.stop.wait(pause):
                return None


def run(config: AgentConfig, clients: Clients, policy: RetryPolicy = DEFAULT_POLICY) -> None:
    """`deployer agent`: boot (retried until it succeeds), then serve until SIGTERM/SIGINT.
    Returns normally on a requested stop."""
    shutdown = Shutdown(config.shutdown_grace_seconds)
    #: A signal, as opposed to the terminate hook's stop: what ends an agent that left its fleet.
    signalled = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info(
            "shutdown_requested",
            signal=signal.Signals(signum).name,
            next="finishing the current step, handing back unprocessed messages",
        )
        signalled.set()
        shutdown.request()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if config.terminate_hook_name and left_marker(config).exists():
        # Left through the terminate hook, then restarted (systemd): booting would re-create the queue.
        log.warning("agent_already_left", next="idle until the instance stops the agent")
        signalled.wait()
        return
    watched = bool(config.lifecycle_hook_name or config.terminate_hook_name)
    first = read_state(config.metadata_endpoint) if watched else None
    booted = boot_until_ready(config, clients, shutdown, policy, warmed=is_warmed(first))
    if booted is None:
        log.info("agent_stopped", next="exit 0 (stopped before boot completed)")
        return
    leaving = Leaving(config, booted, shutdown, policy) if config.terminate_hook_name else None
    if watched:
        act = functools.partial(_lifecycle_step, config, booted, leaving, shutdown, policy)
        LifecycleWatch(config.metadata_endpoint, config.lifecycle_poll_seconds, act, shutdown.stop, first).start()
    booted.agent.serve()
    if leaving is not None and leaving.begun.is_set():
        leaving.finish(clients)
        log.info("agent_left_fleet", next="idle until the instance stops the agent")
        signalled.wait()
    elif config.deregister_on_shutdown and booted.reporter.lifecycle is not Lifecycle.WARMED:
        # A warm pool stops its instances: one that is only going to sleep keeps its queue.
        _deregister(config, clients, booted, policy)  # the stop flag is set; this must still retry
    log.info("agent_stopped", next="exit 0")


def _lifecycle_step(
    config: AgentConfig,
    booted: Booted,
    leaving: Leaving | None,
    shutdown: Shutdown,
    policy: RetryPolicy,
    step: Step,
    _state: str,
) -> None:
    """What a change of the instance's target lifecycle state makes the agent do (on the watch's thread)."""
    if step is Step.TERMINATING and leaving is not None:
        leaving.begin()
    elif step is Step.WARMED:
        booted.reporter.entered(Lifecycle.WARMED)
    elif step is Step.ENTERED_SERVICE:
        booted.reporter.entered(None)
        if config.lifecycle_hook_name:
            # Under the apply lock: a running apply finishes first, so the hook is never completed
            # (and the instance never registered) mid-apply.
            with ApplyLock(config.state_dir, interrupt=shutdown.stop):
                finish_launch(
                    autoscaling_client(config.region, config.endpoint_url),
                    config,
                    booted.instance_id,
                    booted.reporter.states(),
                    policy,
                )


def refresh(config: AgentConfig, clients: Clients, policy: RetryPolicy = DEFAULT_POLICY) -> list[Channel]:
    """`deployer agent --refresh-secrets`: the running releases again, with fresh secret values.

    Beside a running agent: the apply lock orders the two. No queue, no report: this is not an
    agent, only the runner's hooks and the load-balancer gate.
    """
    shutdown = Shutdown(config.shutdown_grace_seconds)
    instance_id = resolve_instance_id(config.instance_id, config.metadata_endpoint)
    layout = Layout(config.prefix)
    ledger = Ledger(config.state_dir)
    # The runner wants a reporter; a refresh records nothing and never writes it, so its key
    # needs no owner (no GetCallerIdentity).
    reporter = StatusReporter(
        clients.s3, config.bucket, layout, ReportKey(config.stage, config.role, instance_id), config.components, policy
    )
    trust = trust_store(config, clients, layout, policy)
    trust.refresh()
    return build_runner(config, clients, shutdown, policy, ledger, reporter, trust).refresh_secrets()


def build_runner(
    config: AgentConfig,
    clients: Clients,
    shutdown: Shutdown,
    policy: RetryPolicy,
    ledger: Ledger,
    reporter: StatusReporter,
    trust: Trusts,
    metrics: Metrics | None = None,
) -> DeployRunner:
    """The runner with what the config asks around it: the load-balancer gate, scale-in protection."""
    instance_id = reporter.who.instance_id
    protection = None
    if config.scale_in_protection:
        autoscaling = autoscaling_client(config.region, config.endpoint_url)
        protection = ScaleInProtection(autoscaling, instance_id, config.state_dir, policy, config.lifecycle_asg_name)
    return DeployRunner(
        config,
        clients.s3,
        policy,
        ledger=ledger,
        reporter=reporter,
        instance_id=instance_id,
        shutdown=shutdown,
        verifier=trust.verifier,
        traffic=gate_for(config, instance_id, policy.interruptible(shutdown.abandon), shutdown.abandon),
        protection=protection,
        metrics=metrics,
    )


def _deregister(
    config: AgentConfig, clients: Clients, booted: Booted, policy: RetryPolicy, *, keep_report: bool = False
) -> None:
    """An agent leaving the fleet on clean shutdown (opt-in: `deregister_on_shutdown`), or through
    its terminate hook (`keep_report`: its last report says so)."""
    try:
        remove_registration(
            clients,
            bucket=config.bucket,
            layout=Layout(config.prefix),
            who=booted.reporter.who,
            queue_name=booted.queue.name,
            subscription_arns=[booted.queue.handle.subscription_arn],
            keep_report=keep_report,
            policy=policy,
        )
    except Exception as exc:  # noqa: BLE001 - whatever is left, `deployer gc` removes after its TTL
        log.error("deregister_failed", error=str(exc), next="deployer gc removes the rest after its TTL")


class Leaving:
    """An agent whose instance is terminating (`deployer.agent.termination`): `begin` when IMDS says
    so (stop taking deploys, heartbeat the hook while an apply finishes), `finish` once the loop
    ended (out of the load balancer, queues removed, last report, action completed)."""

    def __init__(self, config: AgentConfig, booted: Booted, shutdown: Shutdown, policy: RetryPolicy) -> None:
        assert config.terminate_hook_name is not None
        self.config = config
        self.booted = booted
        self.shutdown = shutdown
        self.policy = policy
        self.hook = TerminateHook(
            autoscaling_client(config.region, config.endpoint_url),
            config.terminate_hook_name,
            booted.instance_id,
            policy,
            config.lifecycle_asg_name,
        )
        self.begun = threading.Event()
        self.done = threading.Event()

    def begin(self) -> None:
        self.begun.set()
        try:
            timeout = self.hook.heartbeat_timeout() or DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
        except Exception as exc:  # noqa: BLE001 - the default timeout is the safe guess
            log.warning("lifecycle_hook_unreadable", error=str(exc), next="assuming the default heartbeat timeout")
            timeout = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
        grace = apply_grace(timeout)
        log.warning(
            "instance_terminating",
            hook=self.hook.hook,
            apply_grace_s=grace,
            next="no more deploys; a running apply finishes (heartbeating the hook), then the agent leaves",
        )
        beat = threading.Thread(
            target=keep_alive,
            args=(self.hook, timeout / 3, self.shutdown.applying, self.done),
            name="lifecycle-heartbeat",
            daemon=True,
        )
        beat.start()
        self.shutdown.request(grace)

    def finish(self, clients: Clients) -> None:
        self.done.set()
        gate = self.booted.runner.traffic
        if gate is not None:
            try:
                gate.leave()
            except Exception as exc:  # noqa: BLE001 - Auto Scaling deregisters a terminating instance too
                log.error("traffic_leave_failed", error=str(exc), next="leaving the fleet anyway")
        _deregister(self.config, clients, self.booted, self.policy, keep_report=True)
        self.booted.reporter.entered(Lifecycle.TERMINATED)
        mark_left(self.config, self.booted.instance_id)
        try:
            completed = self.hook.complete()
        except Exception as exc:  # noqa: BLE001 - the hook's DefaultResult ends it at its timeout
            log.error("lifecycle_action_failed", error=str(exc), next="the hook's DefaultResult applies at its timeout")
            return
        log.info("lifecycle_action_completed", hook=self.hook.hook, result="CONTINUE", completed=completed)


def _next(interval: float, jitter: float = RECONCILE_JITTER) -> float:
    return time.monotonic() + interval * random.uniform(1 - jitter, 1 + jitter)
