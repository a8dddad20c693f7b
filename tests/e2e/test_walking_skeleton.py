"""The four end-to-end properties of the walking skeleton, with agents as real subprocesses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from deployer.protocol.deploy import Deploy
from tests.support import BUCKET, AgentProcess, Fleet, cli, make_tree, wait_until


def test_a_publish_from_the_cli_reaches_every_instance(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent() for _ in range(3)]
    build = make_tree(tmp_path / "build", {"index.html": "hello from CI"})
    result = cli(
        "publish", "--stage", "prod", "--role", "web", "--component", "api", "--artifact", str(build),
        env={"DEPLOYER_BUCKET": BUCKET, "DEPLOYER_TOPIC_ARN": fleet.topic_arn},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "as seq 1" in result.stdout
    wait_until(lambda: all(a.on_seq(1) for a in agents), "all agents on seq 1")
    # One deploy's lines join up across CI and every instance by OpenTelemetry's deployment attributes.
    deploy_ids = set()
    for agent in agents:
        assert agent.served() == "hello from CI"
        [done] = agent.events("apply_succeeded")
        assert done["seq"] == 1
        assert (done["deployment.name"], done["deployment.environment.name"]) == ("prod/web/api", "prod")
        assert done["deployment.status"] == "succeeded"
        deploy_ids.add(done["deployment.id"])
    assert len(deploy_ids) == 1
    assert f"(deploy {deploy_ids.pop()})" in result.stdout  # the id CI printed


def test_status_shows_every_instance_on_the_new_seq(
    start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agents = [start_agent() for _ in range(2)]
    publish()
    second = publish()
    wait_until(lambda: all(a.on_seq(second.seq) for a in agents), "all agents on seq 2")
    result = cli("status", "--bucket", BUCKET, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {row["instance_id"] for row in report["instances"]} == {a.instance_id for a in agents}
    assert all(row["seq"] == 2 and row["state"] == "ok" for row in report["instances"])
    assert report["summary"] == ["prod/web/api: 2/2 on seq 2, 0 failed"]
    table = cli("status", "--bucket", BUCKET)
    assert "prod/web/api: 2/2 on seq 2, 0 failed" in table.stdout
    assert second.release_id in table.stdout


def test_an_agent_started_after_the_publish_converges_by_boot_replay_alone(
    start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    publish()
    latest = publish("the latest")
    agent = start_agent()
    wait_until(lambda: agent.on_seq(latest.seq), "the late agent on seq 2")
    assert agent.served() == "the latest"
    # Replay applies the pointer, not the history: seq 1 was never installed.
    assert agent.hook_runs() == [latest.deploy_id]
    assert agent.events("reconcile_behind")[0]["reason"] == "boot"


def test_boot_one_shot_converges_and_exits_zero(fleet: Fleet, tmp_path: Path, publish: Callable[..., Deploy]) -> None:
    latest = publish("booted")
    agent = AgentProcess(fleet, tmp_path / "oneshot", "i-oneshot00000001")
    result = agent.run_once("boot")
    assert result.returncode == 0, result.stderr
    assert agent.served() == "booted"
    assert agent.on_seq(latest.seq)
    # The queue exists and is subscribed, ready for the long-running agent to take over.
    subs = fleet.clients.sns.list_subscriptions_by_topic(TopicArn=fleet.topic_arn)["Subscriptions"]
    assert len(subs) == 1


def test_duplicated_and_older_messages_are_not_applied_again(
    fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent()
    first = publish("one")
    second = publish("two")
    wait_until(lambda: agent.on_seq(2), "seq 2")
    runs_before = agent.hook_runs()
    queue = agent.queue_url()
    for deploy in (second, first, second, first):
        fleet.clients.sqs.send_message(QueueUrl=queue, MessageBody=deploy.to_json())
    wait_until(
        lambda: len(agent.events("message_duplicate")) + len(agent.events("message_stale")) >= 4,
        "the agent to acknowledge the copies",
    )
    assert len(agent.events("message_stale")) >= 2
    assert agent.hook_runs() == runs_before
    assert agent.hook_runs().count(second.deploy_id) == 1
    assert agent.served() == "two"
    assert agent.on_seq(2)
    # Acknowledged means deleted: nothing is left to be redelivered.
    attrs = fleet.clients.sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
