"""Figure 7: what a staged rollout costs — extra requests per agent and per rollout for 5 waves — and
how fast an automatic rollback puts the admitted instances back on the stable release: the driver's,
and the pre-authorised one (`--abort-after K`) the fleet carries out with the driver dead."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    BUCKET,
    ROLE,
    STAGE,
    AgentProc,
    Bench,
    event_time,
    ms,
    small_artifact,
    stop_all,
    wait_for,
)
from bench.report import Section, Table, Target
from deployer.aws.clients import make_clients
from deployer.aws.reports import ReportReader
from deployer.protocol.deploy import Deploy
from deployer.protocol.events import EventType
from deployer.protocol.layout import Layout
from deployer.protocol.manifest import Commands, Hook, Manifest, SyncStrategy
from deployer.protocol.names import Channel
from deployer.protocol.rollout import STABLE_SUFFIX, RolloutState
from publisher.publish import Publisher
from publisher.rollout import Driver, Gates, RolloutEnd, Staging, prepare, read_cursor
from tests.awsproxy import Answer, AwsProxy, Call, aws_proxy

PLAIN = Manifest(dest="/opt/api/current", sync_strategy=SyncStrategy.SYMLINK)
N = 10
WAVES = ("1", "10%", "25%", "50%", "100%")

#: The pre-authorised abort with the driver dead: agents of their own (another component, so the
#: first part's agents are not in its waves) that reconcile every RECONCILE_S (± 10 %), checked
#: after each POLL_S long poll, and heartbeat every 2 s.
DEAD_N = 10
DEAD_COMPONENT = "svc"
RECONCILE_S = 2.0
POLL_S = 1
ABORT_AFTER = 2
DEAD_WAVES = ("1", "50%", "100%")
#: A quiet stretch at wave 0 (no message, no driver) in which a reconcile's requests are counted:
#: about two reconciles per agent.
COUNT_WINDOW_S = 4.5
#: The proxy's name for the rule's LIST (see `_kind`).
MARKER_LIST = "S3 LIST failure markers"
POINTER_GET = "S3 GET pointer"


def run(bench: Bench) -> Section:
    bench.fresh()
    channel = Channel(STAGE, ROLE, "api")
    artifact = small_artifact(bench.workdir)
    home = bench.dir("rollout")
    with aws_proxy(bench.emulator.url) as agents_proxy, aws_proxy(bench.emulator.url) as ci_proxy:
        clients = make_clients("us-east-1", ci_proxy.url)
        publisher = Publisher(clients, BUCKET, bench.topic_arn, bench.layout)
        reader = ReportReader(clients.s3, BUCKET, bench.layout, STAGE, ROLE)
        agents = [
            AgentProc(
                bench,
                home / f"a{i:02d}",
                f"i-roll{i:013d}",
                ["api"],
                endpoint_url=agents_proxy.url,
                heartbeat_interval_seconds=2,
            )
            for i in range(N)
        ]
        try:
            for agent in agents:
                agent.start()
            wait_for(lambda: all(a.watcher.find("agent_serving") for a in agents), f"{N} agents to boot", 120, agents)
            plain = _deploy(publisher, channel, artifact, "roll-1")
            wait_for(lambda: _all_on(agents, plain), "the first release", 60, agents)
            agents_proxy.reset_counts()
            ci_proxy.reset_counts()
            second = _deploy(publisher, channel, artifact, "roll-2")
            wait_for(lambda: _all_on(agents, second), "a plain deploy", 60, agents)
            time.sleep(0.5)
            plain_agent, plain_ci = _requests(agents_proxy), _requests(ci_proxy)

            gates = Gates(WAVES, heartbeat_ttl_s=600, poll_s=0.3)
            staging = prepare(publisher, channel, gates, {w.instance_id: e for w, e in reader.refresh().items()})
            agents_proxy.reset_counts()
            ci_proxy.reset_counts()
            staged = _deploy(publisher, channel, artifact, "roll-3", staged=staging)
            t0 = time.perf_counter()
            verdict = Driver(publisher, reader, gates, staged, driver=staging.driver, echo=lambda _line: None).drive()
            rollout_s = time.perf_counter() - t0
            time.sleep(0.5)
            staged_agent, staged_ci = _requests(agents_proxy), _requests(ci_proxy)

            failing = Manifest(
                dest="/opt/api/current", sync_strategy=SyncStrategy.SYMLINK, commands=Commands(post=(Hook("exit 3"),))
            )
            halves = Gates(("50%", "100%"), heartbeat_ttl_s=600, poll_s=0.2)
            staging = prepare(publisher, channel, halves, {w.instance_id: e for w, e in reader.refresh().items()})
            bad = _deploy(publisher, channel, artifact, "roll-4", staged=staging, template=failing)
            driver = Driver(publisher, reader, halves, bad, driver=staging.driver, echo=lambda _line: None)
            aborted_at: list[float] = []
            original = driver.abort

            def timed_abort(reason: str) -> RolloutEnd:
                aborted_at.append(datetime.now(UTC).timestamp())
                return original(reason)

            driver.abort = timed_abort  # type: ignore[method-assign]
            rolled = driver.drive()
            assert bad.rollout is not None
            admitted = [a for a in agents if bad.rollout.admits(bad.deploy_id, a.instance_id, 0)]
            stable_id = bad.deploy_id + STABLE_SUFFIX
            wait_for(
                lambda: all(
                    a.watcher.find("apply_succeeded", deploy_id=stable_id)
                    or a.watcher.find("rollout_holding_stable", deploy_id=stable_id)
                    for a in admitted
                ),
                "admitted instances back on stable",
                60,
                agents,
            )
            back = max(
                event_time(
                    a.watcher.find("apply_succeeded", deploy_id=stable_id)
                    or a.watcher.find("rollout_holding_stable", deploy_id=stable_id)
                    or {}
                )
                for a in admitted
            )
            for agent in agents:
                agent.terminate()  # each finishes its 20 s long poll while the next part runs
            dead = _driver_dead(bench, publisher, reader, artifact, home)
        finally:
            stop_all(agents)
    recovery = back - aborted_at[0] if aborted_at else float("nan")
    extra_per_agent = (staged_agent - plain_agent) / N
    table = Table(
        ["deploy", "agent requests (all N)", "per agent", "CI requests", "wall"],
        [
            ["plain (everyone at once)", str(plain_agent), f"{plain_agent / N:.1f}", str(plain_ci), ""],
            [
                f"staged, {len(WAVES)} waves ({', '.join(WAVES)}), no bake",
                str(staged_agent),
                f"{staged_agent / N:.1f}",
                str(staged_ci),
                f"{rollout_s:.1f} s ({verdict.value})",
            ],
        ],
        caption=f"{N} real agents (no heartbeat during the figure: every request is the deploy's), requests "
        "counted by a proxy in front of the emulator from the publish to the last agent done, long polls left "
        "out; CI's are the publisher's and the driver's (a poll every 0.3 s).",
    )
    meaning = (
        "A staged rollout adds, per agent, one cursor GET each time the deploy is announced (once per wave) "
        "and the history and cursor reads of switching sides; the driver adds a LIST per poll of the status "
        "reports (plus a GET per changed report), a pointer GET per poll to notice a newer publish, and a "
        "cursor PUT and an SNS publish per wave. The rollback figure is the time from the driver's decision "
        "(failures over the budget) to the last admitted instance running the stable release again. "
        f"With the driver dead, a plan's pre-authorised abort (`--abort-after {ABORT_AFTER}`) is carried out by "
        "the agents themselves: each counts the failure markers at its next reconcile and goes back to stable. "
        "Its bound is one reconcile interval (± 10 % jitter) plus the poll wait (a reconcile that falls due "
        "during a long poll runs when the poll returns) plus the switch itself: here "
        f"{RECONCILE_S:g} s × 1.1 + {POLL_S} s + the switch, at the defaults (300 s, a 20 s long poll) up to "
        "about 5.8 min + the switch. While such a rollout is rolling, the rule costs each agent one LIST of "
        "the failure markers per reconcile."
    )
    targets = [
        Target(
            "automatic rollback: decision → every admitted instance on stable",
            None,
            f"{ms(recovery)} for {len(admitted)} admitted instance(s) ({rolled.value})",
        ),
        Target(
            "extra requests per agent for a 5-wave rollout",
            None,
            f"{extra_per_agent:.1f} (plain deploy {plain_agent / N:.1f})",
        ),
        *dead.targets(),
    ]
    return Section("rollout", "7. Staged rollouts", meaning, [table, dead.table(), dead.reconcile_table()], targets)


def _deploy(
    publisher: Publisher,
    channel: Channel,
    artifact: Path,
    release: str,
    *,
    staged: Staging | None = None,
    template: Manifest = PLAIN,
) -> Deploy:
    return publisher.publish(channel, artifact, template=template, release_id=release, staged=staged).deploy


def _all_on(agents: list[AgentProc], deploy: Deploy) -> bool:
    return all(a.watcher.find("apply_succeeded", deploy_id=deploy.deploy_id) for a in agents)


def _requests(proxy: AwsProxy) -> int:
    """Everything but the long polls (which an idle fleet makes anyway)."""
    return sum(n for (service, action), n in proxy.calls.items() if action != "ReceiveMessage")


# -- the pre-authorised abort, with the driver dead -----------------------------------------------


class DriverKilled(Exception):
    """Raised when the figure's driver dies, as a CI job killed mid-rollout would."""


class _KilledOnceAdmitted(Driver):
    """A driver whose job is killed the instant it has admitted wave 1 and announced it: it never
    polls that wave, so it never sees the failures and never aborts. Nothing drives the rollout
    from then on."""

    def _watch(self, wave: int) -> RolloutEnd | None:
        if wave >= 1:
            raise DriverKilled(f"killed with wave {wave} admitted")
        return super()._watch(wave)


@dataclass
class Tally:
    """A proxy rule that answers nothing: counts the agents' requests by what they touch, and
    stamps when each failure marker came to exist (the emulator's answer to its PUT). S3 keeps a
    LastModified of whole seconds only, so the marker's own timestamp cannot time a 2 s bound."""

    layout: Layout
    channel: Channel
    kinds: Counter[str] = field(default_factory=Counter)
    #: Failure marker key → epoch seconds its PUT was answered 200 (a 412 is a marker written before).
    told: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def before(self, call: Call) -> Answer | None:
        with self._lock:
            self.kinds[_kind(call, self.layout, self.channel)] += 1
        return None

    def after(self, call: Call, answer: Answer) -> None:
        key = _key(call)
        if call.method == "PUT" and answer.status == 200 and key.startswith(_markers(self.layout)):
            with self._lock:
                self.told.setdefault(key, time.time())

    def markers(self, prefix: str) -> list[tuple[float, str]]:
        """(when it existed, key) of the failure markers under `prefix`, oldest first."""
        with self._lock:
            return sorted((at, key) for key, at in self.told.items() if key.startswith(prefix))

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.kinds)

    def reset(self) -> None:
        with self._lock:
            self.kinds.clear()


def _markers(layout: Layout) -> str:
    """Every failure marker, of any deploy."""
    return layout.events_prefix() + EventType.INSTANCE_DEPLOY_FAILED.slug + "/"


def _key(call: Call) -> str:
    """An S3 call's object key (path-style addressing: `/<bucket>/<key>`); "" for anything else."""
    if call.service != "s3":
        return ""
    return urllib.parse.unquote(urllib.parse.urlsplit(call.path).path.lstrip("/").partition("/")[2])


def _kind(call: Call, layout: Layout, channel: Channel) -> str:
    """What a request is for: `S3 GET pointer`, `S3 GET cursor`, `S3 LIST failure markers`, …"""
    if call.service != "s3":
        return f"{call.service.upper()} {call.action}"
    if call.action == "LIST":
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(call.path).query)
        prefix = query.get("prefix", [""])[0]
        return MARKER_LIST if prefix.startswith(_markers(layout)) else f"S3 LIST {prefix}"
    key = _key(call)
    named = {
        layout.pointer_key(channel): "pointer",
        layout.timestamp_key(channel): "timestamp",
    }
    if key in named:
        return f"S3 {call.action} {named[key]}"
    for prefix, what in (
        (layout.cursor_key(channel, "x").rpartition("/")[0] + "/", "cursor"),
        (layout.history_prefix(channel), "history"),
        (layout.status_prefix(), "status (heartbeat)"),
        (layout.events_prefix(), "event"),
        (layout.releases_prefix(), "release"),
    ):
        if key.startswith(prefix):
            return f"S3 {call.action} {what}"
    return f"S3 {call.action} {key.split('/', 1)[0]}/"


@dataclass(frozen=True)
class Back:
    """One admitted instance that ran the candidate, timed from the K-th failure marker."""

    instance_id: str
    wave: int
    #: Its reconcile that counted K markers (`rollout_aborted_by_its_plan`), and its `apply_succeeded`
    #: on the stable release, in seconds after the K-th marker existed.
    noticed_s: float
    on_stable_s: float


@dataclass(frozen=True)
class DriverDead:
    """What the driver-dead part measured."""

    back: list[Back]
    failing: list[str]
    admitted: int
    #: The K-th failure's `apply_failed` log line came this long before its marker existed.
    logged_before_s: float
    #: Requests of every agent in the quiet window at wave 0, by kind; reconciles = pointer GETs.
    window: Counter[str]

    @property
    def worst(self) -> float:
        return max(b.on_stable_s for b in self.back)

    @property
    def reconciles(self) -> int:
        return self.window[POINTER_GET]

    def table(self) -> Table:
        rows = [
            [
                b.instance_id,
                str(b.wave),
                ms(b.noticed_s),
                ms(b.on_stable_s - b.noticed_s),
                ms(b.on_stable_s),
            ]
            for b in sorted(self.back, key=lambda b: b.on_stable_s)
        ]
        return Table(
            ["instance back from the candidate", "wave", "K-th marker → its reconcile counts K", "switch", "total"],
            rows,
            caption=f"The pre-authorised abort with the driver dead: {DEAD_N} more real agents (their own "
            f"component, reconcile every {RECONCILE_S:g} s ± 10 % checked after each {POLL_S} s long poll, "
            f"heartbeat every 2 s) on a stable release, then a staged one with waves {', '.join(DEAD_WAVES)} "
            f"and `--abort-after {ABORT_AFTER}` whose post hook fails on {len(self.failing)} instances of wave 1 "
            f"(a flag file); the driver (in-process `Driver`) dies the instant it has admitted and announced "
            f"wave 1 ({self.admitted} instances admitted), and nothing drives the rollout after. Timed from the "
            f"moment the {ABORT_AFTER}nd failure marker existed (the emulator's answer to its PUT, stamped by "
            f"the agents' proxy; that failure's `apply_failed` was logged {ms(self.logged_before_s)} earlier) "
            "to each instance that ran the candidate logging `rollout_aborted_by_its_plan` and then "
            "`apply_succeeded` on the `:stable` deploy id. The failing instances were back on stable already "
            "(a failed post hook re-activates the previous release).",
        )

    def reconcile_table(self) -> Table:
        per = max(1, self.reconciles)
        rows = [
            [f"`{kind}`" + (" (the rule's)" if kind == MARKER_LIST else ""), str(n), f"{n / per:.2f}"]
            for kind, n in sorted(self.window.items(), key=lambda item: (-item[1], item[0]))
            if kind.startswith("S3 ")
        ]
        return Table(
            ["agent request", f"{DEAD_N} agents in {COUNT_WINDOW_S:g} s", "per reconcile"],
            rows,
            caption=f"What a reconcile costs while a rollout with `--abort-after` is rolling: the same agents "
            f"at wave 0, no message and no driver, over {COUNT_WINDOW_S:g} s ({self.reconciles} reconciles, one "
            "pointer GET each), counted by the proxy in front of them; S3 only (SQS's long polls, and the last "
            "acknowledgements of the publish's message, left out). A heartbeat's status PUT is on its own timer.",
        )

    def targets(self) -> list[Target]:
        slowest = max(self.back, key=lambda b: b.on_stable_s)
        return [
            Target(
                f"pre-authorised abort, driver dead: K-th failure → every admitted instance on stable "
                f"(reconcile every {RECONCILE_S:g} s)",
                None,
                f"{ms(self.worst)} for {len(self.back)} instance(s) back from the candidate, K = {ABORT_AFTER} "
                f"(bound {RECONCILE_S * 1.1 + POLL_S:.1f} s + the switch; the slowest counted K "
                f"{ms(slowest.noticed_s)} after and switched in {ms(slowest.on_stable_s - slowest.noticed_s)})",
            ),
            Target(
                "extra requests per agent per reconcile while a rollout with `--abort-after` is rolling",
                None,
                f"{self.window[MARKER_LIST] / max(1, self.reconciles):.2f}: one LIST of the failure markers "
                f"({self.window[MARKER_LIST]} in {self.reconciles} reconciles of {DEAD_N} agents)",
            ),
        ]


def _driver_dead(bench: Bench, publisher: Publisher, reader: ReportReader, artifact: Path, home: Path) -> DriverDead:
    """Stage a rollout with `--abort-after 2`, kill its driver once wave 1 is admitted, and time
    the fleet's own way back to stable after the 2nd failure."""
    channel = Channel(STAGE, ROLE, DEAD_COMPONENT)
    dest = f"/opt/{DEAD_COMPONENT}/current"
    flags = home / "flags"
    flags.mkdir()
    tally = Tally(bench.layout, channel)
    with aws_proxy(bench.emulator.url, tally) as proxy:
        agents = [
            AgentProc(
                bench, home / f"d{i:02d}", f"i-dead{i:013d}", [DEAD_COMPONENT], endpoint_url=proxy.url,
                poll_wait_seconds=POLL_S, reconcile_interval_seconds=RECONCILE_S, heartbeat_interval_seconds=2,
            )
            for i in range(DEAD_N)
        ]  # fmt: skip
        try:
            for agent in agents:
                agent.start()
            wait_for(lambda: all(a.watcher.find("agent_serving") for a in agents), "the agents to boot", 120, agents)
            plain = Manifest(dest=dest, sync_strategy=SyncStrategy.SYMLINK)
            stable = publisher.publish(channel, artifact, template=plain, release_id="dead-1").deploy
            wait_for(lambda: _all_on(agents, stable), "the stable release", 60, agents)

            # Fails only where its instance's flag exists: chosen once the plan says who is in wave 1.
            hooked = Manifest(
                dest=dest,
                sync_strategy=SyncStrategy.SYMLINK,
                commands=Commands(post=(Hook(f'test ! -e "{flags}/fail-$DEPLOYER_INSTANCE_ID"'),)),
            )
            gates = Gates(DEAD_WAVES, heartbeat_ttl_s=600, poll_s=0.2, abort_after=ABORT_AFTER)
            staging = prepare(publisher, channel, gates, {w.instance_id: e for w, e in reader.refresh().items()})
            bad = publisher.publish(channel, artifact, template=hooked, release_id="dead-2", staged=staging).deploy
            plan = bad.rollout
            assert plan is not None
            waves = {a.instance_id: plan.wave_of(bad.deploy_id, a.instance_id) for a in agents}
            failing = sorted(i for i, w in waves.items() if w == 1)[:ABORT_AFTER]
            if len(failing) < ABORT_AFTER:
                raise RuntimeError(f"wave 1 holds {failing}: fewer than {ABORT_AFTER} instances to fail")
            for instance in failing:
                (flags / f"fail-{instance}").touch()
            stable_id = bad.deploy_id + STABLE_SUFFIX
            wait_for(
                lambda: all(
                    a.watcher.find("apply_succeeded", deploy_id=bad.deploy_id)
                    if waves[a.instance_id] == 0
                    else a.watcher.find("rollout_holding_stable", deploy_id=stable_id)
                    for a in agents
                ),
                "wave 0 on the candidate, the others holding stable",
                60,
                agents,
            )

            tally.reset()
            time.sleep(COUNT_WINDOW_S)
            window = tally.snapshot()

            driver = _KilledOnceAdmitted(publisher, reader, gates, bad, driver=staging.driver, echo=lambda _line: None)
            with contextlib.suppress(DriverKilled):
                end = driver.drive()
                raise RuntimeError(f"the driver ended ({end.value}) before it admitted wave 1")
            _expect_rolling(bench, channel, bad, "with the driver dead")

            markers = bench.layout.event_prefix(EventType.INSTANCE_DEPLOY_FAILED.slug, STAGE, ROLE, bad.deploy_id)
            ran = [a for a in agents if waves[a.instance_id] <= 1 and a.instance_id not in failing]
            wait_for(
                lambda: len(tally.markers(markers)) >= ABORT_AFTER,
                "the failures to be told",
                60,
                agents,
            )
            wait_for(
                lambda: all(a.watcher.find("apply_succeeded", deploy_id=stable_id) for a in ran),
                "the admitted instances back on stable, with no driver",
                60,
                agents,
            )
            _expect_rolling(bench, channel, bad, "after the fleet went back by itself")  # agents never write it
        finally:
            stop_all(agents)
    kth, kth_key = tally.markers(markers)[ABORT_AFTER - 1]
    parsed = bench.layout.event_object(kth_key)
    assert parsed is not None
    teller = next(a for a in agents if a.instance_id == parsed[1].instance_id)
    logged = teller.watcher.find("apply_failed", deploy_id=bad.deploy_id)
    assert logged is not None
    back = []
    for agent in ran:
        noticed = agent.watcher.find("rollout_aborted_by_its_plan")
        on_stable = agent.watcher.find("apply_succeeded", deploy_id=stable_id)
        assert noticed is not None
        assert on_stable is not None
        back.append(
            Back(agent.instance_id, waves[agent.instance_id], event_time(noticed) - kth, event_time(on_stable) - kth)
        )
    admitted = sum(1 for w in waves.values() if w <= 1)
    return DriverDead(back, failing, admitted, kth - event_time(logged), window)


def _expect_rolling(bench: Bench, channel: Channel, deploy: Deploy, when: str) -> None:
    """The cursor as CI left it, wave 1 rolling: else the figure measured something else."""
    found = read_cursor(bench.clients.s3, BUCKET, bench.layout, channel, deploy.deploy_id)
    if found is None or found[0].wave != 1 or found[0].state is not RolloutState.ROLLING:
        raise RuntimeError(f"the cursor {when} is {found[0] if found else None}, not wave 1 rolling")
