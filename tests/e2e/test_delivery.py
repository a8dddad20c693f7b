"""Delivery under duplicates, reordering, boot races, concurrent publishers and crashes (issue 4).

Agents are real subprocesses; the emulator is moto over HTTP. Messages are injected straight
into the instances' queues where a test needs control over copies and order.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployer.agent.config import config_from_dict
from deployer.agent.loop import Agent, boot
from deployer.agent.shutdown import Shutdown
from deployer.aws.clients import make_clients
from deployer.aws.s3 import read_pointer
from deployer.protocol.deploy import Deploy
from deployer.protocol.manifest import Hook
from deployer.protocol.names import Channel
from publisher.publish import Publisher
from tests.faultproxy import CUTS, Fault, FaultProxy, aws_operation, random_faults
from tests.support import (
    BUCKET,
    FAST_POLICY,
    REGION,
    AgentProcess,
    BrokenFanout,
    Fleet,
    agent_config,
    artifact,
    publish_on,
    release_template,
    silent_publisher,
    wait_until,
)

API = Channel("prod", "web", "api")
WORKER = Channel("prod", "web", "worker")
#: Agents behind the flaky network: a receive cut after SQS answered hides its messages for one
#: visibility timeout, so keep it at SQS's floor-ish 30 s rather than the production 600 s.
THROUGH_FAULTS = {"visibility_timeout_seconds": 30}


def inject(fleet: Fleet, queue_url: str, bodies: list[str]) -> None:
    for start in range(0, len(bodies), 10):
        entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies[start : start + 10])]
        fleet.clients.sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)  # type: ignore[arg-type]


def applied_seqs(agent: AgentProcess, component: str) -> list[int]:
    return [e["seq"] for e in agent.events("apply_succeeded") if e.get("component") == component]


def queue_drained(fleet: Fleet, agent: AgentProcess) -> bool:
    attrs = fleet.clients.sqs.get_queue_attributes(QueueUrl=agent.queue_url(), AttributeNames=["All"])["Attributes"]
    return attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


#: The suite's hang guard (120 s) must not fire before the test's own deadlines do: convergence
#: takes ~15 s, but draining ~500 duplicate copies through the faulty network takes a minute or
#: more (a cut receive hides its copies for the 30 s visibility timeout), and the verdict is the
#: deadlines below, 150 s to converge and 120 s to drain.
@pytest.mark.timeout(150 + 120)
def test_storm_of_duplicated_shuffled_deploys_converges_without_regressing_or_rerunning_hooks(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess], flaky: FaultProxy
) -> None:
    rng = random.Random(20261126)
    agents = [start_agent(components=["api", "worker"], endpoint_url=flaky.url, **THROUGH_FAULTS) for _ in range(5)]
    publisher = silent_publisher(fleet)
    path = artifact(tmp_path, "storm", "storm release")
    deploys = [publish_on(publisher, (API, WORKER)[i % 2], path, f"storm-{i}") for i in range(50)]
    last = {
        API: max(d.seq for d in deploys if d.channel == API),
        WORKER: max(d.seq for d in deploys if d.channel == WORKER),
    }
    assert last == {API: 25, WORKER: 25}

    for agent in agents:
        bodies = [d.to_json() for d in deploys for _ in range(rng.randint(1, 3))]
        rng.shuffle(bodies)
        inject(fleet, agent.queue_url(), bodies)

    wait_until(
        lambda: all(a.on_seq(25, "api") and a.on_seq(25, "worker") for a in agents), "every agent on seq 25 twice", 150
    )
    wait_until(lambda: all(queue_drained(fleet, a) for a in agents), "every copy to be acknowledged", 120)
    # The retry policy, not systemd, handled the network: no agent exited by itself.
    assert [a.instance_id for a in agents if not a.alive()] == []
    assert sum(len(a.events("transient_error_retrying")) for a in agents) > 0
    for agent in agents:
        for component in ("api", "worker"):
            seqs = applied_seqs(agent, component)
            assert seqs == sorted(set(seqs)), f"{agent.instance_id} regressed or repeated on {component}: {seqs}"
            runs = agent.hook_runs(component)
            assert len(runs) == len(set(runs)), f"a post hook ran twice on {agent.instance_id}/{component}"
            assert len(runs) == len(seqs)


def test_boot_race_a_deploy_published_before_the_agent_subscribes_is_replayed(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess], flaky: FaultProxy
) -> None:
    publisher = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)
    before = publish_on(publisher, API, artifact(tmp_path, "a", "before"), "before")
    agent = start_agent(endpoint_url=flaky.url, **THROUGH_FAULTS)
    wait_until(lambda: agent.on_seq(before.seq), "boot replay")
    assert agent.hook_runs() == [before.deploy_id]


def test_boot_race_b_a_deploy_published_between_subscription_and_replay_is_applied_once(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flaky: FaultProxy
) -> None:
    config = config_from_dict(agent_config(fleet, tmp_path, "i-bootrace0000000b"))
    publisher = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)
    replay = Agent.reconcile
    published: list[Deploy] = []

    def publish_then_replay(agent: Agent, reason: str) -> None:
        # The queue and subscription exist now; replay has not read the pointer yet.
        published.append(publish_on(publisher, API, artifact(tmp_path, "b", "between"), "between"))
        replay(agent, reason)

    monkeypatch.setattr(Agent, "reconcile", publish_then_replay)
    booted = boot(config, make_clients(REGION, flaky.url), Shutdown(60), FAST_POLICY)
    assert booted.agent.ledger.applied() == {API: (1, published[0].deploy_id)}  # applied by the replay
    for _ in range(3):
        booted.agent.poll_once()  # the same deploy also arrives through the queue: a duplicate
    hooks = (tmp_path / "root" / "opt" / "api" / "hooks.log").read_text().split()
    assert hooks == [published[0].deploy_id]
    attrs = fleet.clients.sqs.get_queue_attributes(QueueUrl=booted.queue.handle.url, AttributeNames=["All"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"


def test_boot_race_c_a_deploy_published_after_replay_arrives_through_the_queue(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess], flaky: FaultProxy
) -> None:
    agent = start_agent(endpoint_url=flaky.url, **THROUGH_FAULTS)
    publisher = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)
    after = publish_on(publisher, API, artifact(tmp_path, "c", "after"), "after")
    # A receive cut after SQS answered hides the message for one visibility timeout (30 s here).
    wait_until(lambda: agent.on_seq(after.seq), "delivery through the queue", 75)
    assert agent.events("reconcile_behind") == []  # not by reconcile: the queue delivered it


def test_boot_race_d_with_sns_suppressed_entirely_reconcile_converges(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess], flaky: FaultProxy
) -> None:
    agent = start_agent(endpoint_url=flaky.url, reconcile_interval_seconds=1)
    result = silent_publisher(fleet, BrokenFanout).publish(
        API, artifact(tmp_path, "d", "no sns"), template=release_template(), release_id="no-sns"
    )
    assert result.sns_error is not None
    assert "SNS unreachable" in result.sns_error
    pointer = read_pointer(fleet.clients.s3, BUCKET, fleet.layout, API)
    assert pointer is not None
    assert pointer.deploy == result.deploy  # the pointer moved before the fan-out failed
    wait_until(lambda: agent.on_seq(1), "reconcile to heal the lost fan-out")
    assert agent.events("reconcile_behind")[-1]["reason"] == "periodic"


def _publish_many(endpoint: str, topic_arn: str, path: str, worker: int, count: int, out: Any) -> None:
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    clients = make_clients(REGION, endpoint)
    publisher = Publisher(clients, BUCKET, topic_arn, Fleet(clients, BUCKET, topic_arn, endpoint).layout)
    for n in range(count):
        deploy = publish_on(publisher, API, Path(path), f"p{worker}-{n}")
        out.put((deploy.seq, deploy.deploy_id))


def test_concurrent_publisher_processes_produce_seqs_1_to_n_with_complete_history(fleet: Fleet, tmp_path: Path) -> None:
    path = artifact(tmp_path, "race", "race")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_publish_many, args=(fleet.endpoint_url, fleet.topic_arn, str(path), w, 10, results))
        for w in range(4)
    ]
    for process in workers:
        process.start()
    got = [results.get(timeout=120) for _ in range(40)]
    for process in workers:
        process.join(30)
        assert process.exitcode == 0
    assert sorted(seq for seq, _ in got) == list(range(1, 41))
    history = {}
    for seq in range(1, 41):
        body = fleet.clients.s3.get_object(Bucket=BUCKET, Key=fleet.layout.history_key(API, seq))["Body"].read()
        history[seq] = json.loads(body)["deploy_id"]
    assert history == dict(got)
    pointer = read_pointer(fleet.clients.s3, BUCKET, fleet.layout, API)
    assert pointer is not None
    assert pointer.deploy.seq == 40


def test_sigkill_between_received_and_applied_then_restart_runs_hooks_once(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent()
    marker = tmp_path / "pre-hook.pid"
    stall_once = Hook(f"if [ ! -f {marker} ]; then echo $$ > {marker}; sleep 60; fi")
    publisher = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)
    template = release_template()
    template = type(template)(
        **{**template.__dict__, "commands": type(template.commands)(pre=(stall_once,), post=template.commands.post)}
    )
    deploy = publisher.publish(API, artifact(tmp_path, "k1", "killed"), template=template, release_id="k1").deploy
    wait_until(lambda: marker.exists() and marker.read_text().strip() != "", "the pre hook to start")
    assert agent.process is not None
    agent.process.send_signal(signal.SIGKILL)
    agent.process.wait(10)
    os.killpg(int(marker.read_text()), signal.SIGKILL)  # the hook's own session outlives the agent
    assert agent.hook_runs() == []

    agent.start()
    wait_until(lambda: agent.on_seq(deploy.seq), "the restarted agent to converge")
    assert agent.hook_runs() == [deploy.deploy_id]
    assert agent.served() == "killed"


def test_sigkill_between_applied_and_message_deleted_then_restart_does_not_rerun_hooks(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    host, port = fleet.endpoint_url.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port)))
    proxy.rule = lambda head: Fault.RESET if "DeleteMessage" in aws_operation(head) else Fault.PASS
    proxy.start()
    try:
        agent = start_agent(endpoint_url=proxy.url, visibility_timeout_seconds=30)
        publisher = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)
        deploy = publish_on(publisher, API, artifact(tmp_path, "k2", "applied"), "k2")
        state_file = agent.home / "state" / "state.json"
        wait_until(lambda: state_file.exists() and '"completed"' in state_file.read_text(), "the deploy to complete")
        wait_until(lambda: proxy.counts[Fault.RESET] >= 1, "the agent to try deleting the message")
        assert agent.process is not None
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(10)
        proxy.rule = lambda _head: Fault.PASS
        agent.start()
        # The undeleted message comes back after its 30 s visibility timeout and is a duplicate.
        wait_until(lambda: agent.events("message_duplicate") != [], "the redelivered copy", 60)
        wait_until(lambda: queue_drained(fleet, agent), "the copy to be acknowledged")
        assert agent.hook_runs() == [deploy.deploy_id]
        assert agent.on_seq(deploy.seq)
    finally:
        proxy.close()


@pytest.mark.parametrize("seed", [7])
def test_network_faults_on_a_quarter_of_connections_lose_nothing(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess], seed: int
) -> None:
    rule = random_faults(0.27, seed, (Fault.RESET, *CUTS, Fault.STALL))
    proxy = FaultProxy.to(fleet.endpoint_url, rule=rule, stall_seconds=0.5)
    try:
        agents = [
            start_agent(components=["api", "worker"], endpoint_url=proxy.url, reconcile_interval_seconds=2)
            for _ in range(3)
        ]
        publisher = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)
        path = artifact(tmp_path, "net", "through the storm")
        deploys = [publish_on(publisher, (API, WORKER)[i % 2], path, f"net-{i}") for i in range(10)]
        wait_until(
            lambda: all(a.on_seq(5, "api") and a.on_seq(5, "worker") for a in agents), "convergence through faults", 120
        )
        total = sum(proxy.counts.values())
        faults = total - proxy.counts[Fault.PASS]
        assert faults / total >= 0.2, proxy.counts
        retried = sum(len(a.events("transient_error_retrying")) for a in agents)
        assert retried > 0
        for agent in agents:
            for component in ("api", "worker"):
                runs = agent.hook_runs(component)
                assert len(runs) == len(set(runs))
                assert set(runs) <= {d.deploy_id for d in deploys}
            assert agent.served("api") == "through the storm"
    finally:
        proxy.close()
