"""Figure 7: what a staged rollout costs — extra requests per agent and per rollout for 5 waves — and
how fast an automatic rollback puts the admitted instances back on the stable release."""

from __future__ import annotations

import time
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
from deployer.protocol.manifest import Commands, Hook, Manifest, SyncStrategy
from deployer.protocol.names import Channel
from deployer.protocol.rollout import STABLE_SUFFIX
from publisher.publish import Publisher
from publisher.rollout import Driver, Gates, RolloutEnd, Staging, prepare
from tests.awsproxy import AwsProxy, aws_proxy

PLAIN = Manifest(dest="/opt/api/current", sync_strategy=SyncStrategy.SYMLINK)
N = 10
WAVES = ("1", "10%", "25%", "50%", "100%")


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
        "(failures over the budget) to the last admitted instance running the stable release again."
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
    ]
    return Section("rollout", "7. Staged rollouts", meaning, [table], targets)


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
