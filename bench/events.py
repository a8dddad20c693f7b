"""Figure 9: what deploy events and `status --metrics` add — requests (and US$) per instance-day at
steady state, per deploy and per run — and how long an event takes from its decision to the rule's target.

Every request is counted by the test suite's proxy (`tests/awsproxy.py`). Each agent has a proxy
of its own whose rule notes the kind of every call in order, so an agent's requests can be cut at
its long polls: both idle windows hold the same number of whole loop passes of the same agents,
one before and one after the bucket's events are routed, and the difference between them is not
blurred by where a window happened to start in an agent's poll.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    BUCKET,
    PYTHON,
    REGION,
    REPO,
    ROLE,
    STAGE,
    AgentProc,
    Bench,
    aws_env,
    event_time,
    median,
    ms,
    percentile,
    run_child,
    small_artifact,
    stop_all,
    wait_for,
)
from bench.report import Section, Table, Target
from deployer.aws.clients import cloudwatch_client, events_client
from deployer.aws.cloudwatch import Gauge, Unit, put_gauges
from deployer.aws.events import route_events
from deployer.aws.s3 import read_pointer
from deployer.protocol.deploy import Deploy
from deployer.protocol.events import EventType, deploy_event
from deployer.protocol.limits import MAX_WAIT_TIME_SECONDS
from deployer.protocol.manifest import Commands, Hook, Manifest, SyncStrategy
from deployer.protocol.names import DEFAULT_METRICS_NAMESPACE, Channel
from publisher.fleet import DIMENSIONS
from publisher.notify import Herald
from publisher.publish import Publisher
from tests.awsproxy import Answer, Call, aws_proxy

if TYPE_CHECKING:
    pass

N, QUICK_N = 10, 4
#: Whole loop passes per agent in each idle window.
PASSES, QUICK_PASSES = 5, 3
#: The idle agents poll for 2 s and their reconcile and heartbeat are due after every poll, so every
#: pass makes one request of each steady-state kind (long poll, pointer GET, status PUT). At the
#: defaults a pass is one 20 s long poll, and only every 15th reconciles and every 45th heartbeats.
POLL_WAIT_S = 2
TIMER_S = 1.0
#: Loop passes in an idle agent's day at the defaults: one 20 s long poll each.
DEFAULT_PASSES_PER_DAY = 86_400 / MAX_WAIT_TIME_SECONDS
RECEIVE = "SQS ReceiveMessage"
#: An agent telling of a failure: the event object it writes.
EVENT_PUT = "S3 PUT events/"
#: Figure 7's waves; with the quick run's 4 agents 10 % would be no instance, which `--waves` refuses.
WAVES, QUICK_WAVES = ("1", "10%", "25%", "50%", "100%"), ("1", "50%", "100%")
#: Fleet events sent per Herald for the latency, and failing deploys (each fails on every agent).
EMITS, QUICK_EMITS = 20, 8
FAILING, QUICK_FAILING = 2, 1
#: Gauges put in one `put_gauges` to count its batching (6 per channel: ~417 channels).
SYNTHETIC_GAUGES = 2_500

#: The fleet the per instance-day figures are for (the figure's text states them).
FLEET = 10_000
DEPLOYS_PER_DAY = 20
METRICS_EVERY_S = 300
CHANNELS = 100
#: The issue's target.
TARGET_PER_INSTANCE_DAY = 2.0

#: Public prices, us-east-1, free tiers ignored. EventBridge: custom events $1.00 per million (each
#: 64 KB of an entry is one; ours are a few KB), AWS service events such as S3's free
#: (https://aws.amazon.com/eventbridge/pricing/). CloudWatch: PutMetricData $0.01 per 1,000
#: requests, a custom metric $0.30 a month for the first 10,000 (https://aws.amazon.com/cloudwatch/pricing/).
PUT_EVENTS_USD = 1.00 / 1e6
PUT_METRIC_DATA_USD = 0.01 / 1000
METRIC_MONTH_USD = 0.30
DAYS_PER_MONTH = 730 / 24

FAILING_HOOK = Manifest(
    dest="/opt/api/current", sync_strategy=SyncStrategy.SYMLINK, commands=Commands(post=(Hook("exit 3"),))
)
PLAIN = Manifest(dest="/opt/api/current", sync_strategy=SyncStrategy.SYMLINK)
_PUT_LINE = re.compile(r"^put (\d+) metric\(s\) for (\d+) channel\(s\)")


@dataclass
class Recorder:
    """A proxy rule that answers nothing and notes the kind of every call, in the order they come."""

    prefix: str
    kinds: list[str] = field(default_factory=list)
    #: Event objects S3 refused to write again (412: If-None-Match, the event is written once).
    refused: int = 0

    def before(self, call: Call) -> Answer | None:
        self.kinds.append(kind_of(call, self.prefix))
        return None

    def after(self, call: Call, answer: Answer) -> None:
        if answer.status == 412 and kind_of(call, self.prefix) == EVENT_PUT:
            self.refused += 1

    def window(self, start: int, passes: int) -> list[str] | None:
        """The calls of `passes` whole loop passes after index `start`: from the start of the first
        long poll to the start of the one after the last. None until there are that many."""
        kinds = list(self.kinds)
        polls = [i for i in range(start, len(kinds)) if kinds[i] == RECEIVE]
        return kinds[polls[0] : polls[passes]] if len(polls) > passes else None


def kind_of(call: Call, prefix: str) -> str:
    """`S3 PUT status/`, `SQS ReceiveMessage`, `CloudWatch PutMetricData`, `EventBridge PutEvents`."""
    if call.service == "s3":
        key = urllib.parse.urlsplit(call.path).path.lstrip("/").partition("/")[2]
        return f"S3 {call.action} {key.removeprefix(prefix).split('/', 1)[0]}/"
    names = {"sqs": "SQS", "sns": "SNS", "events": "EventBridge", "monitoring": "CloudWatch"}
    return f"{names.get(call.service, call.service)} {call.action}"


@dataclass
class RuleTarget:
    """The rule's target: an SQS queue, read with each message's SentTimestamp (when it became receivable)."""

    bench: Bench
    url: str = ""
    arn: str = ""

    def __post_init__(self) -> None:
        sqs = self.bench.clients.sqs
        self.url = sqs.create_queue(QueueName="deploy-events")["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])["Attributes"]
        self.arn = attributes["QueueArn"]

    def drain(self, wait_s: int = 0) -> list[tuple[float, dict[str, Any]]]:
        """(epoch seconds the message was enqueued, the EventBridge event) for every message there now."""
        sqs = self.bench.clients.sqs
        found: list[tuple[float, dict[str, Any]]] = []
        while answer := sqs.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait_s,
            MessageSystemAttributeNames=["SentTimestamp"],
        ).get("Messages"):
            for message in answer:
                found.append((int(message["Attributes"]["SentTimestamp"]) / 1000, json.loads(message["Body"])))
                sqs.delete_message(QueueUrl=self.url, ReceiptHandle=message["ReceiptHandle"])
            wait_s = 0
        return found


def idle_window(recorders: Sequence[Recorder], agents: Sequence[AgentProc], passes: int) -> Counter[str]:
    """Every agent's next `passes` whole loop passes, counted by kind over all of them."""
    starts = [len(r.kinds) for r in recorders]
    found: list[list[str] | None] = [None] * len(recorders)

    def complete() -> bool:
        for i, recorder in enumerate(recorders):
            found[i] = found[i] or recorder.window(starts[i], passes)
        return all(f is not None for f in found)

    wait_for(complete, f"{passes} idle loop passes of every agent", 30 + 3 * POLL_WAIT_S * passes, agents)
    return Counter(kind for calls in found for kind in calls or ())


@dataclass(frozen=True)
class CiCounts:
    waves: tuple[str, ...]
    put_events: int
    other_ci: int
    arrived: int
    metrics_gauges: int
    metrics_channels: int
    metrics_puts: int
    synthetic_puts: int
    #: The instance side, filled in once the agents stopped: event PUTs, those refused as repeats,
    #: and the failed applies (first failures and the reconcile's retries) that made them.
    event_puts: int = 0
    event_refused: int = 0
    failed_applies: int = 0


def ci_counts(bench: Bench, target: RuleTarget, artifact: Path, waves: Sequence[str]) -> tuple[CiCounts, Deploy]:
    """A staged deploy through the CLI with `--event-bus`, a `status --metrics` run, one big `put_gauges`."""
    with aws_proxy(bench.emulator.url) as proxy:
        env = {**os.environ, **aws_env(proxy.url)}
        publish = [PYTHON, "-m", "deployer", "publish", "--bucket", BUCKET, "--topic-arn", bench.topic_arn,
                   "--stage", STAGE, "--role", ROLE, "--component", "api", "--artifact", str(artifact),
                   "--release-id", "events-staged", "--waves", ",".join(waves), "--wait", "--heartbeat-ttl", "30",
                   "--poll-interval", "0.3", "--timeout", "60", "--event-bus", "default"]  # fmt: skip
        run_child(publish, env=env, cwd=REPO)
        put_events, other = proxy.count("events", "PutEvents"), sum(proxy.calls.values()) - proxy.count("events")
        proxy.reset_counts()
        status = run_child([PYTHON, "-m", "deployer", "status", "--bucket", BUCKET, "--metrics"], env=env, cwd=REPO)
        metrics_puts = proxy.count("monitoring", "PutMetricData")
        put = next(m for line in status.stdout.splitlines() if (m := _PUT_LINE.match(line)))
        proxy.reset_counts()
        put_gauges(cloudwatch_client(REGION, proxy.url), DEFAULT_METRICS_NAMESPACE, synthetic_gauges())
        synthetic_puts = proxy.count("monitoring", "PutMetricData")
    arrived = sum(1 for _, event in target.drain(wait_s=1) if event.get("source") == "deployer")
    pointer = read_pointer(bench.clients.s3, BUCKET, bench.layout, Channel(STAGE, ROLE, "api"))
    assert pointer is not None
    counts = CiCounts(
        tuple(waves), put_events, other, arrived, int(put.group(1)), int(put.group(2)), metrics_puts, synthetic_puts
    )
    return counts, pointer.deploy


def synthetic_gauges() -> list[Gauge]:
    now = datetime.now(UTC)
    return [
        Gauge(f"Gauge{i % 6}", 1.0, Unit.COUNT, tuple(zip(DIMENSIONS, (STAGE, ROLE, f"c{i // 6}"), strict=True)), now)
        for i in range(SYNTHETIC_GAUGES)
    ]


@dataclass(frozen=True)
class Latency:
    emit: list[float]
    receivable: list[float]


def fleet_latency(target: RuleTarget, deploy: Deploy, herald: Herald, first_wave: int, reps: int) -> Latency:
    """`Herald.emit` of a fleet event (the driver's decision) → the message enqueued at the rule's target."""
    emit: list[float] = []
    receivable: list[float] = []
    for wave in range(first_wave, first_wave + reps):
        event = deploy_event(EventType.ROLLOUT_HELD, deploy, wave=wave, reason="bench: a held wave")
        decided = time.time()
        herald.emit(event)
        emit.append(time.time() - decided)
        sent = _arrival(target, event.event_id)
        receivable.append(sent - decided)
    return Latency(emit, receivable)


def _arrival(target: RuleTarget, event_id: str, timeout: float = 10.0) -> float:
    """When the fleet event `event_id` was enqueued at the target (other messages are dropped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for sent, event in target.drain(wait_s=1):
            if event.get("detail", {}).get("id") == event_id:
                return sent
    raise RuntimeError(f"timed out waiting for event {event_id} at the rule's target")


def _count(agent: AgentProc, name: str) -> int:
    agent.watcher.poll()
    return sum(1 for event in agent.watcher.events if event.get("event") == name)


def _all_failed(agents: Sequence[AgentProc], deploy_id: str) -> bool:
    return all(a.watcher.find("apply_failed", deploy_id=deploy_id) for a in agents)


def instance_latency(
    bench: Bench, target: RuleTarget, publisher: Publisher, artifact: Path, agents: Sequence[AgentProc], deploys: int
) -> list[float]:
    """A failing hook on every agent: its `apply_failed` log line → S3's Object Created at the target."""
    samples: list[float] = []
    for k in range(deploys):
        bad = publisher.publish(
            Channel(STAGE, ROLE, "api"), artifact, template=FAILING_HOOK, release_id=f"events-bad-{k}"
        ).deploy
        wait_for(functools.partial(_all_failed, agents, bad.deploy_id), "every agent's failure", 60, agents)
        sent: dict[str, float] = {}
        deadline = time.monotonic() + 30
        while len(sent) < len(agents) and time.monotonic() < deadline:
            for at, event in target.drain(wait_s=1):
                told = bench.layout.event_object(str(event.get("detail", {}).get("object", {}).get("key", "")))
                if told is not None and told[2] == bad.deploy_id:
                    sent[told[1].instance_id] = at
        for agent in agents:
            failed = agent.watcher.find("apply_failed", deploy_id=bad.deploy_id)
            assert failed is not None
            if agent.instance_id not in sent:
                raise RuntimeError(f"no instance event from {agent.instance_id} at the rule's target")
            samples.append(sent[agent.instance_id] - event_time(failed))
    return samples


def run(bench: Bench) -> Section:
    bench.fresh()
    n, passes = (QUICK_N, QUICK_PASSES) if bench.quick else (N, PASSES)
    target = RuleTarget(bench)
    artifact = small_artifact(bench.workdir)
    home = bench.dir("events")
    publisher = Publisher(bench.clients, BUCKET, bench.topic_arn, bench.layout)
    recorders = [Recorder(bench.layout.key() + "/") for _ in range(n)]
    with contextlib.ExitStack() as stack:
        proxies = [stack.enter_context(aws_proxy(bench.emulator.url, r)) for r in recorders]
        agents = [
            AgentProc(
                bench, home / f"a{i:02d}", f"i-evts{i:013d}", ["api"], endpoint_url=proxies[i].url,
                poll_wait_seconds=POLL_WAIT_S, reconcile_interval_seconds=TIMER_S, heartbeat_interval_seconds=TIMER_S,
            )
            for i in range(n)
        ]  # fmt: skip
        try:
            for agent in agents:
                agent.start()
            wait_for(lambda: all(a.watcher.find("agent_serving") for a in agents), f"{n} agents to boot", 120, agents)
            first = publisher.publish(Channel(STAGE, ROLE, "api"), artifact, template=PLAIN, release_id="events-1")
            wait_for(
                lambda: all(a.watcher.find("apply_succeeded", deploy_id=first.deploy.deploy_id) for a in agents),
                "the first release",
                60,
                agents,
            )
            without = idle_window(recorders, agents, passes)
            route_events(
                events_client(REGION, bench.emulator.url),
                bench.clients.s3,
                BUCKET,
                bench.layout.events_prefix(),
                target.arn,
            )
            routed = idle_window(recorders, agents, passes)
            idle_told = len(target.drain())
            ci, deploy = ci_counts(bench, target, artifact, QUICK_WAVES if bench.quick else WAVES)
            made_per_event = Herald(
                bus="default", events_client=functools.partial(events_client, REGION, bench.emulator.url)
            )
            client = events_client(REGION, bench.emulator.url)
            kept = Herald(bus="default", events_client=lambda: client)
            reps = QUICK_EMITS if bench.quick else EMITS
            as_cli = fleet_latency(target, deploy, made_per_event, 100, reps)
            one_client = fleet_latency(target, deploy, kept, 200, reps)
            failing = instance_latency(
                bench, target, publisher, artifact, agents, QUICK_FAILING if bench.quick else FAILING
            )
        finally:
            stop_all(agents)
    ci = dataclasses.replace(
        ci,
        event_puts=sum(r.kinds.count(EVENT_PUT) for r in recorders),
        event_refused=sum(r.refused for r in recorders),
        failed_applies=sum(_count(a, "apply_failed") for a in agents),
    )
    return _section(n, passes, without, routed, idle_told, ci, as_cli, one_client, failing)


@dataclass(frozen=True)
class PerDay:
    """The figure's arithmetic: measured counts carried to a day of the assumed fleet."""

    instance: float  # added requests per instance-day from the agents (an upper bound, see the text)
    put_events: float  # per day, the whole fleet
    metric_puts: float
    metrics: int  # custom metrics stored (per channel gauges × channels)

    @property
    def ci_per_instance(self) -> float:
        return (self.put_events + self.metric_puts) / FLEET

    @property
    def per_instance(self) -> float:
        return self.instance + self.ci_per_instance

    def usd(self) -> dict[str, float]:
        """US$ per day for the whole fleet, by line."""
        return {
            "PutEvents": self.put_events * PUT_EVENTS_USD,
            "PutMetricData": self.metric_puts * PUT_METRIC_DATA_USD,
            "custom metrics": self.metrics * METRIC_MONTH_USD / DAYS_PER_MONTH,
        }


def per_day(n: int, passes: int, without: Counter[str], routed: Counter[str], ci: CiCounts) -> PerDay:
    added = sum(routed.values()) - sum(without.values())
    gauges_per_channel = ci.metrics_gauges // max(1, ci.metrics_channels)
    runs = 86_400 / METRICS_EVERY_S
    return PerDay(
        instance=added / n / passes * DEFAULT_PASSES_PER_DAY,
        put_events=DEPLOYS_PER_DAY * ci.put_events,
        metric_puts=runs * math.ceil(CHANNELS * gauges_per_channel / 1000),
        metrics=CHANNELS * gauges_per_channel,
    )


def _idle_table(n: int, passes: int, without: Counter[str], routed: Counter[str], told: int) -> Table:
    rows = [
        [f"`{kind}`", f"{without[kind] / n:g}", f"{routed[kind] / n:g}", f"{(routed[kind] - without[kind]) / n:+g}"]
        for kind in sorted(set(without) | set(routed))
    ]
    total_without, total_routed = sum(without.values()), sum(routed.values())
    rows.append(
        ["**all**", f"{total_without / n:g}", f"{total_routed / n:g}", f"**{(total_routed - total_without) / n:+g}**"]
    )
    return Table(
        ["request (agents, through their proxies)", "per agent, events off", "per agent, events routed", "added"],
        rows,
        caption=f"{n} real agents idle on one release, {passes} whole loop passes each per window (a {POLL_WAIT_S} s "
        f"long poll, then the reconcile and the heartbeat, both due: every steady-state kind of request in every "
        f"pass). Then `route_events` switched the bucket's EventBridge notification and both rules on (to an SQS "
        f"queue) and the same agents did {passes} more passes. Messages at the rule's target from that window: "
        f"{told} (each heartbeat's Object Created reaches the default bus; no rule matches `status/`).",
    )


def _ci_table(ci: CiCounts) -> Table:
    expected = 2 * len(ci.waves) + 2
    return Table(
        ["per deploy or run", "added requests", "expected", "notes"],
        [
            [
                f"`publish --waves {','.join(ci.waves)} --wait --event-bus default` ({len(ci.waves)} waves)",
                f"{ci.put_events} PutEvents",
                f"2W + 2 = {expected}",
                f"{ci.arrived} arrived at the rule's target; the run's other requests: {ci.other_ci}",
            ],
            [
                f"`status --metrics` ({ci.metrics_channels} channel, {ci.metrics_gauges} gauges)",
                f"{ci.metrics_puts} PutMetricData",
                f"⌈{ci.metrics_gauges} / 1,000⌉ = {math.ceil(ci.metrics_gauges / 1000)}",
                "the status read itself (LIST + GETs) is today's",
            ],
            [
                f"a deploy failing on an instance ({ci.failed_applies} failed applies of the agents below)",
                f"{ci.event_puts} S3 PUT `events/`",
                "1 per failed apply",
                f"{ci.event_puts - ci.event_refused} events written; {ci.event_refused} PUTs by retries of a deploy "
                "that had failed there already, refused by If-None-Match (one event per deploy and instance)",
            ],
            [
                f"`put_gauges` of {SYNTHETIC_GAUGES:,} gauges",
                f"{ci.synthetic_puts} PutMetricData",
                f"⌈{SYNTHETIC_GAUGES:,} / 1,000⌉ = {math.ceil(SYNTHETIC_GAUGES / 1000)}",
                "what `status --metrics` does for ~417 channels",
            ],
        ],
        caption="Not steady state: what a deploy and a `status --metrics` run add, counted by a proxy in front of the CLI "
        "(a child process), of `put_gauges` and of each agent.",
    )


def _day_table(day: PerDay, ci: CiCounts) -> Table:
    usd = day.usd()
    runs = 86_400 / METRICS_EVERY_S
    per_run = day.metric_puts / runs
    rows = [
        ["instances at steady state (measured above)", f"{day.instance * FLEET:g}", f"{day.instance:g}", "$0"],
        [
            f"PutEvents: {DEPLOYS_PER_DAY} deploys × {ci.put_events}",
            f"{day.put_events:,.0f}",
            f"{day.put_events / FLEET:.3f}",
            f"${usd['PutEvents']:.5f}",
        ],
        [
            f"PutMetricData: {runs:.0f} `status --metrics` runs × {per_run:.0f}",
            f"{day.metric_puts:,.0f}",
            f"{day.metric_puts / FLEET:.3f}",
            f"${usd['PutMetricData']:.5f}",
        ],
        [f"custom metrics stored: {day.metrics} (not requests)", "", "", f"${usd['custom metrics']:.2f}"],
        [
            "**total**",
            f"**{day.per_instance * FLEET:,.0f}**",
            f"**{day.per_instance:.3f}**",
            f"**${sum(usd.values()):.2f}** = ${sum(usd.values()) / FLEET:.6f} per instance-day",
        ],
    ]
    return Table(
        ["added by events and metrics", f"requests per day ({FLEET:,} instances)", "per instance-day", "US$ per day"],
        rows,
        caption=f"Carried to a fleet of {FLEET:,} instances in {CHANNELS} channels (stage/role/component), "
        f"{DEPLOYS_PER_DAY} deploys a day each of {len(ci.waves)} waves, `status --metrics` every {METRICS_EVERY_S // 60} "
        f"minutes; {ci.metrics_gauges // max(1, ci.metrics_channels)} gauges per channel as measured. Prices: "
        "EventBridge custom events $1.00 per million, S3's events to the default bus free "
        "(https://aws.amazon.com/eventbridge/pricing/); PutMetricData $0.01 per 1,000 requests, a custom metric "
        "$0.30 a month (https://aws.amazon.com/cloudwatch/pricing/); us-east-1, free tiers ignored.",
    )


def _latency_table(as_cli: Latency, one_client: Latency, failing: list[float]) -> Table:
    def row(what: str, values: list[float]) -> list[str]:
        return [what, ms(median(values)), ms(percentile(values, 90)), str(len(values))]

    return Table(
        ["from → to", "median", "p90", "samples"],
        [
            row("fleet event: `Herald.emit` → enqueued at the target (Herald as the CLI builds it)", as_cli.receivable),
            row("the same `emit` call, until it returns (PutEvents; delivered within it)", as_cli.emit),
            row("fleet event, Herald handed a client made beforehand: `emit` → enqueued", one_client.receivable),
            row("instance event: `apply_failed` logged → S3's Object Created enqueued at the target", failing),
        ],
        caption="Enqueued = the message's SentTimestamp at the rule's SQS target (ms; when it became receivable); "
        "the decision is the clock read just before `Herald.emit`, the failure the agent's `apply_failed` log "
        "timestamp. Same machine, same clock.",
    )


def _section(
    n: int,
    passes: int,
    without: Counter[str],
    routed: Counter[str],
    told: int,
    ci: CiCounts,
    as_cli: Latency,
    one_client: Latency,
    failing: list[float],
) -> Section:
    day = per_day(n, passes, without, routed, ci)
    added = sum(routed.values()) - sum(without.values())
    meaning = (
        "What deploy events and `status --metrics` add to the bill, and how long an event takes to reach the "
        "operators' rule target. Instances send nothing new at steady state: they write an event object only "
        "when a deploy fails or is rejected on them (one write-once PUT), and the bucket's EventBridge "
        "notification carries it. CI adds one PutEvents per fleet event (published, each wave started and "
        "passed, the outcome: 2W + 2 for W waves) and `status --metrics` one PutMetricData per 1,000 gauges "
        "per run; neither grows with the fleet."
    )
    notes = [
        f"Instance-day extrapolation: requests added per agent per pass × {DEFAULT_PASSES_PER_DAY:,.0f} passes a day "
        f"(one 20 s long poll each at the defaults). Every pass here also reconciles and heartbeats, which at the "
        f"defaults only every 15th and 45th pass do, so this over-counts anything tied to those timers; "
        f"{added:+d} requests were added in {n} × {passes} passes.",
        "Latency: on the emulator delivery is synchronous — moto matches the rule and puts the message on the "
        "target queue inside the PutEvents call (for the instance event, inside the agent's PutObject) — so "
        "these figures are the product's own share: building the event and the request (and, at a command's "
        "first event, its EventBridge client), and for the instance event the status PUT the agent writes "
        "first, each agent's request also passing its counting "
        "proxy. On AWS, EventBridge's own ingestion and delivery to the target come on top, which this run "
        "cannot measure; for the instance event so does S3's notification step, which S3's documentation says "
        'of its event notifications in general are "typically delivered in seconds but can sometimes take a '
        'minute or longer" (https://docs.aws.amazon.com/AmazonS3/latest/userguide/EventNotifications.html).',
        "`News.herald` gives the Herald a client factory, which the Herald calls once, at the command's first "
        "event, and keeps the client for the events after it: only that first event pays a boto3 session and "
        f"EventBridge client before its PutEvents ({ms(as_cli.receivable[0])} to the target here, against the "
        f"row's median of {ms(median(as_cli.receivable))}), so the first and third rows differ by that one event "
        f"alone, which neither the median nor the p90 of {len(as_cli.receivable)} shows.",
    ]
    targets = [
        Target(
            "≤ 2 requests per instance-day beyond today's at steady state",
            day.per_instance <= TARGET_PER_INSTANCE_DAY,
            f"{day.per_instance:.3f}: instances {day.instance:g} ({added:+d} requests in {n} agents × {passes} "
            f"passes, events off → routed), CI {day.ci_per_instance:.3f} ({DEPLOYS_PER_DAY} deploys × "
            f"{ci.put_events} PutEvents + {86_400 // METRICS_EVERY_S} `status --metrics` × "
            f"{day.metric_puts / (86_400 / METRICS_EVERY_S):.0f} PutMetricData a day over {FLEET:,} instances)",
        ),
        Target(
            "US$ per instance-day added by events and metrics",
            None,
            f"${sum(day.usd().values()) / FLEET:.6f} ({FLEET:,} instances, {CHANNELS} channels: "
            f"{day.metrics} custom metrics are ${day.usd()['custom metrics']:.3f} of the fleet's "
            f"${sum(day.usd().values()):.3f} a day, the requests the rest)",
        ),
        Target(
            "fleet event: decision (`Herald.emit`) → receivable at the rule's SQS target, emulator",
            None,
            f"median {ms(median(as_cli.receivable))}, p90 {ms(percentile(as_cli.receivable, 90))} "
            f"({len(as_cli.receivable)} events; synchronous delivery: the product's own share)",
        ),
        Target(
            "instance event: `apply_failed` → S3 Object Created at the rule's SQS target, emulator",
            None,
            f"median {ms(median(failing))}, p90 {ms(percentile(failing, 90))} ({len(failing)} failures; "
            "synchronous delivery: the product's own share)",
        ),
    ]
    moves = (
        "Requests: nothing on the instances to move; on the CI side the number of waves (2 PutEvents each) and how "
        "often `status --metrics` runs. Cost: the custom metrics, 6 per channel, not the requests. Latency: on the "
        "emulator little is left of the product's share (one PutEvents; the client is made once per command, at "
        "its first event); on AWS, EventBridge's delivery and for instance events S3's notification step, which "
        "the product does not control."
    )
    tables = [
        _idle_table(n, passes, without, routed, told),
        _ci_table(ci),
        _day_table(day, ci),
        _latency_table(as_cli, one_client, failing),
    ]
    return Section("events", "9. Events and metrics", meaning, tables, targets, notes, moves)
