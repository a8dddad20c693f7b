"""The agent loop against the in-memory queue: what happens to every message, without a subprocess."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from deployer.agent import loop
from deployer.agent.config import AgentConfig, config_from_dict
from deployer.agent.decide import Outcome
from deployer.agent.ledger import DeployStatus, Ledger
from deployer.agent.loop import Agent
from deployer.agent.queue_stub import MemoryQueue
from deployer.apply.engine import Milestone
from deployer.protocol.deploy import Deploy
from deployer.protocol.errors import AwsError, LockBusy
from deployer.protocol.names import Channel
from tests.support import make_deploy

TOPIC = "arn:aws:sns:us-east-1:123456789012:deployer-test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeRunner:
    """Applies nothing; answers each deploy with a scripted outcome and records the order."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    #: Deploy ids that are not what CI wrote to history (forged or replayed).
    forged: set[str] = field(default_factory=set)
    applied: list[tuple[str, int]] = field(default_factory=list)
    on_apply: list[threading.Event] = field(default_factory=list)  # set on the first apply
    repairs: list[Channel] = field(default_factory=list)

    def apply(self, deploy: Deploy) -> tuple[Outcome, str]:
        self.applied.append((deploy.component, deploy.seq))
        for event in self.on_apply:
            event.set()
        if deploy.deploy_id in self.forged:
            return Outcome.UNAUTHENTIC, f"seq {deploy.seq} is not in history"
        outcome = self.outcomes.get(deploy.component, Outcome.APPLIED)
        return outcome, f"scripted {outcome.value}"

    def worth_retrying(self, _deploy: Deploy) -> bool:
        return True

    def repair(self, channel: Channel) -> bool:
        self.repairs.append(channel)
        return False


@dataclass
class FakeReporter:
    writes: int = 0
    rejections: list[tuple[str, str]] = field(default_factory=list)
    #: Called on every flush (the runner notes an outcome, the loop flushes it).
    on_flush: Callable[[], None] = lambda: None
    #: What the loop said of each component's timestamp (None: vouched for, or no freshness).
    stale: dict[str, str | None] = field(default_factory=dict)

    def write(self) -> None:
        self.writes += 1

    def flush(self) -> None:
        self.on_flush()

    def reject_message(self, message_id: str, reason: str) -> None:
        self.rejections.append((message_id, reason))

    def vouched(self, component: str, stale_since: str | None) -> None:
        self.stale[component] = stale_since

    def stale_since(self, component: str) -> str | None:
        return self.stale.get(component)


@dataclass
class Rig:
    agent: Agent
    queue: MemoryQueue
    runner: FakeRunner
    reporter: FakeReporter
    ledger: Ledger
    clock: Clock
    stop: threading.Event

    def with_pointers(self, pointers: Mapping[Channel, Deploy | None], config: AgentConfig | None = None) -> Agent:
        """The rig's agent (with `config`, if given), reading these channel pointers at reconcile."""
        return Agent(
            config or self.agent.config,
            queue=self.queue,
            runner=self.runner,
            reporter=self.reporter,
            ledger=self.ledger,
            pointer=pointers.__getitem__,
            stop=self.stop,
        )


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    config: AgentConfig = config_from_dict(
        {
            "stage": "prod",
            "role": "web",
            "components": ["api", "worker"],
            "bucket": "deployer-test",
            "topic_arn": TOPIC,
            "instance_id": "i-loop",
            "state_dir": str(tmp_path),
            "poll_wait_seconds": 0,
        }
    )
    clock, stop = Clock(), threading.Event()
    queue, runner, reporter, ledger = MemoryQueue(clock), FakeRunner(), FakeReporter(), Ledger(tmp_path)
    agent = Agent(
        config, queue=queue, runner=runner, reporter=reporter, ledger=ledger, pointer=lambda _channel: None, stop=stop
    )
    return Rig(agent, queue, runner, reporter, ledger, clock, stop)


def deploy(component: str = "api", seq: int = 1) -> Deploy:
    return make_deploy(component=component, seq=seq, deploy_id=f"{component}-{seq}")


def test_only_the_highest_seq_per_channel_in_a_batch_is_applied_in_boot_order_and_everything_is_acknowledged(
    rig: Rig,
) -> None:
    for body in (deploy("worker", 1), deploy("api", 1), deploy("api", 3), deploy("api", 2)):
        rig.queue.send(body.to_json())
    rig.agent.poll_once()
    assert rig.runner.applied == [("api", 3), ("worker", 1)]  # api before worker, as the config lists them
    assert rig.queue.pending() == []


def test_an_outcome_is_reported_only_after_its_message_was_acknowledged(rig: Rig) -> None:
    in_queue_at_flush: list[list[str]] = []
    rig.reporter.on_flush = lambda: in_queue_at_flush.append(rig.queue.pending())
    rig.queue.send(deploy("api", 1).to_json())
    rig.agent.poll_once()
    assert rig.runner.applied == [("api", 1)]
    assert in_queue_at_flush == [[]]  # the report went out once, with the message already deleted


def test_duplicates_and_older_seqs_are_acknowledged_without_applying(rig: Rig) -> None:
    applied = deploy("api", 5)
    rig.ledger.mark(applied, DeployStatus.COMPLETED, Milestone.POST_HOOKS_DONE)
    rig.queue.send(applied.to_json())
    rig.queue.send(deploy("api", 3).to_json())
    rig.queue.send(
        replace(deploy("api", 1), stage="dev").to_json()
    )  # another stage's: every deploy reaches every queue
    rig.agent.poll_once()
    assert rig.runner.applied == []
    assert rig.queue.pending() == []
    assert rig.queue.dead_letters == []


def test_a_failed_apply_stays_in_the_queue_and_comes_back_after_30_60_then_120_seconds(rig: Rig) -> None:
    rig.runner.outcomes["api"] = Outcome.FAILED
    rig.queue.send(deploy("api", 1).to_json())
    delays = []
    for _ in range(3):
        rig.agent.poll_once()
        [(_, delay)] = rig.queue.visibility_changes[-1:]
        delays.append(delay)
        rig.agent.poll_once()  # invisible until the backoff ran out: nothing to receive
        assert len(rig.runner.applied) == len(delays)
        rig.clock.now += delay
    assert delays == [30, 60, 120]
    assert rig.queue.pending() == [deploy("api", 1).to_json()]  # SQS's redrive moves it to the DLQ, not us


def test_a_network_failure_is_retried_the_same_way_and_an_interrupted_apply_is_handed_back_at_once(rig: Rig) -> None:
    rig.runner.outcomes.update(api=Outcome.UNAVAILABLE, worker=Outcome.INTERRUPTED)
    rig.queue.send(deploy("api", 1).to_json())
    rig.queue.send(deploy("worker", 1).to_json())
    rig.agent.poll_once()
    assert dict(rig.queue.visibility_changes) == {"m-0": 30, "m-1": 0}
    assert len(rig.queue.pending()) == 2  # neither is deleted


def test_a_rejected_release_and_an_unparseable_message_go_to_the_dlq_with_their_reasons(rig: Rig) -> None:
    rig.runner.outcomes["api"] = Outcome.REJECTED
    rig.queue.send(deploy("api", 1).to_json())
    rig.queue.send("not json at all")
    rig.agent.poll_once()
    reasons = dict(rig.queue.dead_letters)
    assert reasons[deploy("api", 1).to_json()] == "scripted rejected"
    assert reasons["not json at all"].startswith("deploy document is not JSON")
    assert [message_id for message_id, _ in rig.reporter.rejections] == ["m-1"]  # only the poison message
    assert rig.queue.pending() == []


def test_on_stop_messages_not_yet_started_are_handed_back_with_visibility_zero(rig: Rig) -> None:
    rig.runner.on_apply.append(rig.stop)  # SIGTERM arrives while the first apply runs
    rig.queue.send(deploy("api", 1).to_json())
    rig.queue.send(deploy("worker", 1).to_json())
    rig.agent.poll_once()
    assert rig.runner.applied == [("api", 1)]
    assert rig.queue.visibility_changes == [("m-1", 0)]
    assert rig.queue.pending() == [deploy("worker", 1).to_json()]
    assert [m.body for m in rig.queue.receive(0)] == [deploy("worker", 1).to_json()]  # visible again at once


def test_serving_ends_when_the_stop_is_set_and_heartbeats_on_its_timer(rig: Rig) -> None:
    config = replace(rig.agent.config, heartbeat_interval_seconds=0.01)
    agent = Agent(
        config,
        queue=rig.queue,
        runner=rig.runner,
        reporter=rig.reporter,
        ledger=rig.ledger,
        pointer=lambda _channel: None,
        stop=rig.stop,
    )

    def stop_after_two_heartbeats() -> None:
        # Not a fixed delay: on a loaded machine one poll can outlast it, and the stop would end
        # serving before any timer came due, proving nothing.
        deadline = time.monotonic() + 10
        while rig.reporter.writes < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        rig.stop.set()

    threading.Thread(target=stop_after_two_heartbeats).start()
    agent.serve()
    assert rig.stop.is_set()
    assert rig.reporter.writes >= 2


def test_reconcile_applies_a_pointer_ahead_of_the_ledger_and_skips_one_that_is_not(rig: Rig) -> None:
    pointers = {Channel("prod", "web", "api"): deploy("api", 4), Channel("prod", "web", "worker"): deploy("worker", 2)}
    rig.ledger.mark(deploy("worker", 2), DeployStatus.COMPLETED, Milestone.POST_HOOKS_DONE)
    agent = rig.with_pointers(pointers)
    agent.reconcile(reason="test")
    assert rig.runner.applied == [("api", 4)]


def test_a_forged_message_with_a_higher_seq_does_not_silence_the_genuine_one_in_its_batch(rig: Rig) -> None:
    forged = replace(deploy("api", 999999), deploy_id="forged")
    rig.runner.forged.add("forged")
    rig.queue.send(deploy("api", 3).to_json())
    rig.queue.send(forged.to_json())
    rig.queue.send(deploy("api", 2).to_json())
    rig.agent.poll_once()
    assert rig.runner.applied == [("api", 999999), ("api", 3)]  # the forgery first, then the next newest
    assert [body for body, _ in rig.queue.dead_letters] == [forged.to_json()]
    assert rig.reporter.rejections == [("m-1", "seq 999999 is not in history")]
    assert rig.queue.pending() == []  # seq 2 acknowledged as superseded by the genuine seq 3


def test_two_deploys_claiming_one_seq_are_both_tried_until_history_says_which_is_real(rig: Rig) -> None:
    impostor = replace(deploy("api", 4), deploy_id="impostor", release_id="evil")
    rig.runner.forged.add("impostor")
    rig.queue.send(impostor.to_json())
    rig.queue.send(deploy("api", 4).to_json())
    rig.agent.poll_once()
    assert rig.runner.applied == [("api", 4), ("api", 4)]
    assert [body for body, _ in rig.queue.dead_letters] == [impostor.to_json()]
    assert rig.queue.pending() == []


def test_reconcile_asks_for_a_repair_when_the_pointer_looks_older_than_what_was_applied(rig: Rig) -> None:
    rig.ledger.mark(
        replace(deploy("api", 999999), deploy_id="forged"), DeployStatus.COMPLETED, Milestone.POST_HOOKS_DONE
    )
    pointers = {Channel("prod", "web", "api"): deploy("api", 4), Channel("prod", "web", "worker"): None}
    agent = rig.with_pointers(pointers)
    agent.reconcile(reason="test")
    assert rig.runner.repairs == [Channel("prod", "web", "api")]
    assert rig.runner.applied == []  # the fake confirms the record, so nothing to re-apply


def test_a_failed_dlq_copy_leaves_that_message_in_the_queue_and_the_rest_of_the_batch_is_settled(rig: Rig) -> None:
    def refuse(_message: object, _reason: str) -> None:
        raise AwsError("AWS SendMessage failed: AccessDenied", code="AccessDenied", status=403)

    rig.queue.dead_letter = refuse  # type: ignore[method-assign,assignment]
    rig.queue.send("poison")
    rig.queue.send(deploy("api", 1).to_json())
    rig.agent.poll_once()
    assert rig.runner.applied == [("api", 1)]
    assert rig.queue.pending() == ["poison"]  # SQS redrives it after maxReceiveCount
    assert [message_id for message_id, _ in rig.reporter.rejections] == ["m-0"]


def test_a_deleted_queue_is_recreated_after_sqs_stops_refusing_its_name_then_reported_and_reconciled(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "POLL_FAILURE_PAUSE_BASE_SECONDS", 0.001)
    pointers = {Channel("prod", "web", "api"): deploy("api", 2), Channel("prod", "web", "worker"): None}
    agent = rig.with_pointers(pointers)
    rig.queue.send(deploy("api", 1).to_json())
    rig.queue.delete_queue()  # gc, an operator: the queue and its messages are gone
    rig.queue.refuse_ensure = 2  # QueueDeletedRecently, twice
    serving = threading.Thread(target=agent.serve)
    serving.start()
    deadline = time.monotonic() + 10
    while not rig.runner.applied and time.monotonic() < deadline:
        time.sleep(0.01)
    rig.stop.set()
    serving.join()
    assert rig.queue.ensured == 1
    assert rig.runner.applied == [("api", 2)]  # what was published meanwhile, from the pointer
    assert rig.reporter.writes >= 1
    assert not agent.queue_missing


def test_a_deeply_nested_message_beside_a_genuine_one_is_dead_lettered_and_the_genuine_one_applied(rig: Rig) -> None:
    poison = "[" * 5_000 + "]" * 5_000  # under the size limit, past the interpreter's recursion limit
    rig.queue.send(poison)
    rig.queue.send(deploy("api", 1).to_json())
    rig.agent.poll_once()
    assert rig.runner.applied == [("api", 1)]
    [(body, reason)] = rig.queue.dead_letters
    assert body == poison
    assert "nests deeper than" in reason
    assert rig.queue.pending() == []


@pytest.mark.parametrize(
    "failure",
    [LockBusy("another apply held the lock for 3600 s"), ValueError("corrupt ledger"), AwsError("SlowDown")],
    ids=["the apply lock", "a corrupt ledger", "an AWS error during repair"],
)
def test_a_failure_in_the_periodic_reconcile_is_logged_and_serving_goes_on(
    rig: Rig, failure: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner raises out of a reconcile's catch-up (shown with the real runner for a lock held
    past its timeout): before one boundary covered every step, this ended `serve()`."""
    config = replace(rig.agent.config, reconcile_interval_seconds=0.01, heartbeat_interval_seconds=0.01)
    ahead = {Channel("prod", "web", "api"): deploy("api", 5), Channel("prod", "web", "worker"): None}
    calls: list[int] = []
    applying = rig.runner.apply

    def apply(received: Deploy) -> tuple[Outcome, str]:
        if received.seq == 5:
            calls.append(1)
            raise failure
        return applying(received)

    monkeypatch.setattr(rig.runner, "apply", apply)
    agent = rig.with_pointers(ahead, config)
    rig.queue.send(deploy("api", 1).to_json())

    def stop_after_two_reconciles() -> None:
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        rig.stop.set()

    threading.Thread(target=stop_after_two_reconciles).start()
    with capture_logs() as logs:
        agent.serve()  # returns only because of the stop
    assert len(calls) >= 2
    assert rig.runner.applied == [("api", 1)]  # the queue kept being served
    failed = [e for e in logs if e["event"] == "reconcile_failed"]
    assert failed
    assert failed[0]["next"].startswith("reconciling again at the next interval")
    assert type(failure).__name__ in failed[0]["error"]
