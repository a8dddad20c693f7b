"""Deploy events end to end: `init --events-target` routes them, the CLI and real agents send them,
and they arrive at a real rule target (an SQS queue) and a chat webhook on loopback."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from deployer.aws.s3 import read_pointer
from deployer.protocol.events import EventType, parse_event
from deployer.protocol.names import Channel
from publisher.rollout import EXIT_ROLLED_BACK
from tests.support import (
    BUCKET,
    FAST_AGENT,
    TOPIC,
    AgentProcess,
    Fleet,
    artifact,
    cli,
    loopback_server,
    publish_args,
    template_file,
    wait_until,
)

pytestmark = pytest.mark.moto_only("EventBridge rules and S3's EventBridge notifications")

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "events.schema.json").read_text())
FAST = ("--heartbeat-ttl", "8", "--poll-interval", "0.3", "--timeout", "60")


class Chat(BaseHTTPRequestHandler):
    texts: list[str]

    def do_POST(self) -> None:
        self.texts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def chat() -> Iterator[tuple[str, list[str]]]:
    handler: type[Chat] = type("Recorded", (Chat,), {"texts": []})
    with loopback_server(handler) as url:
        yield f"{url}/hook", handler.texts


def drain(fleet: Fleet, url: str) -> list[dict[str, Any]]:
    found = []
    while answer := fleet.clients.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages"):
        found += [json.loads(m["Body"]) for m in answer]
        for message in answer:
            fleet.clients.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return found


def test_a_rollout_s_events_and_an_instance_s_failure_arrive_at_the_rule_target_and_the_chat(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess], chat: tuple[str, list[str]]
) -> None:
    webhook, texts = chat
    url = fleet.clients.sqs.create_queue(QueueName="deploy-events")["QueueUrl"]
    arn = fleet.clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    routed = cli("init", "--bucket", BUCKET, "--topic-name", TOPIC, "--events-target", arn)
    assert routed.returncode == 0, routed.stderr
    assert "deployer-fleet-events and deployer-instance-events" in routed.stdout
    agents = [start_agent(**FAST_AGENT) for _ in range(3)]
    news = ("--event-bus", "default", "--notify", webhook)

    first = cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", *FAST, *news))
    assert first.returncode == 0, first.stdout + first.stderr
    broken = template_file(tmp_path / "broken.yml", "exit 3")
    args = ("--manifest", str(broken), "--waves", "1,100%", "--max-failed", "0", "--wait", *FAST, *news)
    bad = cli(*publish_args(fleet, artifact(tmp_path, "v2", "v2"), *args))
    assert bad.returncode == EXIT_ROLLED_BACK, bad.stdout + bad.stderr
    pointer = read_pointer(fleet.clients.s3, fleet.bucket, fleet.layout, Channel("prod", "web", "api"))
    assert pointer is not None
    assert pointer.deploy.rollout is not None
    canary = pointer.deploy.rollout.first

    found: list[dict[str, Any]] = []

    def six_arrived() -> bool:
        found.extend(drain(fleet, url))
        return len(found) >= 6

    wait_until(six_arrived, "the deploy events at the rule target")
    ours = [e for e in found if e["source"] == "deployer"]
    for event in ours:
        jsonschema.validate(event["detail"], SCHEMA)
        assert event["detail-type"] == event["detail"]["type"]
    by_seq: dict[int, list[str]] = {}
    for detail in sorted((e["detail"] for e in ours), key=lambda d: (d["seq"], d["step"])):
        by_seq.setdefault(detail["seq"], []).append(detail["type"])
    assert by_seq == {
        1: ["Deploy Published", "Fleet Converged"],
        2: ["Deploy Published", "Wave Started", "Rollout Rolled Back"],
    }
    # The canary's failure, told by the agent itself as an object the bucket's notification delivers.
    [told] = [e for e in found if e["source"] == "aws.s3"]
    slug, who, deploy_id = fleet.layout.event_object(told["detail"]["object"]["key"]) or ("", None, "")
    assert (slug, deploy_id) == (EventType.INSTANCE_DEPLOY_FAILED.slug, pointer.deploy.deploy_id)
    assert who is not None
    assert (who.instance_id,) == canary
    body = fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=told["detail"]["object"]["key"])["Body"].read()
    failure = parse_event(body)
    assert failure.instance == who.instance_id
    assert "exited 3" in (failure.reason or "")

    assert [t.split(":")[0] for t in texts] == ["[deployer] Fleet Converged", "[deployer] Rollout Rolled Back"]
    assert all(a.served() == "v1" for a in agents)
