"""Deploy events and notifications against the emulator's EventBridge, SNS, SQS and S3, and a real
webhook on loopback: what arrives at a rule's target, a throttled entry, an outage, hostile text."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import structlog

from deployer.agent.reporter import StatusReporter
from deployer.aws.clients import events_client
from deployer.aws.events import fleet_pattern, route_events
from deployer.aws.retry import RetryPolicy
from deployer.protocol.events import (
    FLEET_RULE,
    INSTANCE_RULE,
    MAX_EVENT_ENTRY_BYTES,
    EventType,
    deploy_event,
    entry_bytes,
    parse_event,
)
from deployer.protocol.layout import ReportKey
from publisher.notify import NOTIFY_POLICY, Herald, Topic, Webhook
from tests.awsproxy import aws_proxy
from tests.limits import Throttle
from tests.support import FAST_POLICY, REGION, Fleet, loopback_server, make_deploy, wait_until

pytestmark = pytest.mark.moto_only("EventBridge rules and targets (LocalStack's run here has no events service)")

DEPLOY = make_deploy()


def target_queue(fleet: Fleet, name: str) -> tuple[str, str]:
    """An SQS queue as a rule's target: (url, arn)."""
    url = fleet.clients.sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = fleet.clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def received(fleet: Fleet, url: str, count: int) -> list[dict[str, Any]]:
    """At least `count` EventBridge events delivered to the queue, in arrival order."""
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        answer = fleet.clients.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        found.extend(json.loads(m["Body"]) for m in answer.get("Messages", []))
        return len(found) >= count

    wait_until(enough, f"{count} event(s) at the rule's target")
    return found


def herald(fleet: Fleet, endpoint: str | None = None, **kwargs: Any) -> Herald:
    url = endpoint or fleet.endpoint_url
    return Herald(
        **{"bus": "default", "events_client": lambda: events_client(REGION, url), "policy": FAST_POLICY, **kwargs}
    )


class Hook(BaseHTTPRequestHandler):
    """A chat webhook on loopback: records each POST's JSON body; answers `status`."""

    status = 200
    bodies: list[dict[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, type[Hook]]]:
    handler: type[Hook] = type("Recorded", (Hook,), {"bodies": []})
    with loopback_server(handler) as url:
        yield f"{url}/services/T0/B0/secret", handler


def test_a_fleet_event_reaches_a_real_rule_target_whole_and_parses_back(fleet: Fleet) -> None:
    url, arn = target_queue(fleet, "events-target")
    events = events_client(REGION, fleet.endpoint_url)
    events.put_rule(Name=FLEET_RULE, EventPattern=json.dumps(fleet_pattern()))
    events.put_targets(Rule=FLEET_RULE, Targets=[{"Id": "t", "Arn": arn}])
    sent = deploy_event(EventType.WAVE_PASSED, DEPLOY, wave=0, counts={"admitted": 1, "ok": 1})
    herald(fleet, by="ci-job-7").emit(sent)
    [event] = received(fleet, url, 1)
    assert (event["source"], event["detail-type"]) == ("deployer", "Wave Passed")
    got = parse_event(json.dumps(event["detail"]))
    assert got.event_id == sent.event_id
    assert got.counts == {"admitted": 1, "ok": 1}
    assert got.by == "ci-job-7"


def test_a_throttled_put_events_entry_is_retried_and_every_event_still_arrives_in_order(fleet: Fleet) -> None:
    url, arn = target_queue(fleet, "events-throttled")
    events = events_client(REGION, fleet.endpoint_url)
    events.put_rule(Name=FLEET_RULE, EventPattern=json.dumps(fleet_pattern()))
    events.put_targets(Rule=FLEET_RULE, Targets=[{"Id": "t", "Arn": arn}])
    throttle = Throttle("events", frozenset({"PutEvents"}), rate=4.0, burst=1.0)
    patient = RetryPolicy(max_attempts=8, base_seconds=0.1, cap_seconds=0.5, deadline_seconds=10)
    with aws_proxy(fleet.endpoint_url, throttle) as proxy:
        sender = herald(fleet, proxy.url, policy=patient)
        for wave in range(3):
            sender.emit(deploy_event(EventType.WAVE_STARTED, DEPLOY, wave=wave))
    assert throttle.throttled >= 1
    steps = [e["detail"]["step"] for e in received(fleet, url, 3)]
    assert steps == [2, 5, 8]


def test_an_eventbridge_outage_and_a_failing_webhook_never_fail_the_deploy_and_are_logged(
    closed_port: int, hook: tuple[str, type[Hook]]
) -> None:
    webhook, handler = hook
    handler.status = 500
    sender = Herald(
        bus="default",
        targets=[Webhook(webhook)],
        events_client=lambda: events_client(REGION, f"http://127.0.0.1:{closed_port}"),
        policy=NOTIFY_POLICY,
    )
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        sender.emit(deploy_event(EventType.ROLLOUT_ROLLED_BACK, DEPLOY, wave=1, reason="2 failed, 0 tolerated"))
    elapsed = time.monotonic() - started
    assert elapsed < 2 * NOTIFY_POLICY.deadline_seconds + 5
    assert len(handler.bodies) == NOTIFY_POLICY.max_attempts  # a 5xx is retried, a bounded number of times
    lost = [e for e in logs if e["event"] == "event_not_delivered"]
    assert {e["sink"] for e in lost} == {"EventBridge bus default", str(Webhook(webhook))}
    assert all(e["next"] and "secret" not in json.dumps(e) for e in lost)


def test_a_webhook_gets_one_slack_compatible_line_with_hostile_text_escaped_and_cut(
    hook: tuple[str, type[Hook]],
) -> None:
    webhook, handler = hook
    hostile = "<!channel> <script>alert(1)</script>\x1b[2J\x00" + "x" * (10 * 1024 * 1024)
    event = deploy_event(EventType.DEPLOY_FAILED, DEPLOY, reason=hostile)
    Herald(targets=[Webhook(webhook)], policy=FAST_POLICY).emit(event)
    [body] = handler.bodies
    assert list(body) == ["text"]
    text = body["text"]
    assert text.startswith(f"[deployer] Deploy Failed: prod/web/api seq {DEPLOY.seq}")
    assert "<!channel>" not in text
    assert "&lt;script&gt;" in text
    assert "\x1b" not in text
    assert "\x00" not in text
    assert len(text) < 1000
    assert entry_bytes(event.fitted()) <= MAX_EVENT_ENTRY_BYTES


def test_an_sns_notify_target_is_told_on_rollback_and_not_on_a_wave_start(fleet: Fleet) -> None:
    topic = fleet.clients.sns.create_topic(Name="deploys-chat")["TopicArn"]
    url, arn = target_queue(fleet, "chat-subscriber")
    fleet.clients.sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"})
    sender = Herald(targets=[Topic(topic)], sns=fleet.clients.sns, policy=FAST_POLICY)
    sender.emit(deploy_event(EventType.WAVE_STARTED, DEPLOY, wave=0))
    sender.emit(deploy_event(EventType.ROLLOUT_ROLLED_BACK, DEPLOY, wave=0, reason="alarm(s) in ALARM: 5xx"))
    messages = fleet.clients.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
    assert [m["Body"] for m in messages] == [
        f"[deployer] Rollout Rolled Back: prod/web/api seq {DEPLOY.seq} ({DEPLOY.release_id}) - wave 0 - "
        "alarm(s) in ALARM: 5xx"
    ]


def test_an_instance_s_event_object_reaches_the_rule_target_through_the_bucket_s_notification(fleet: Fleet) -> None:
    url, arn = target_queue(fleet, "instance-events")
    _, other = target_queue(fleet, "someone-elses-notification")
    fleet.clients.s3.put_bucket_notification_configuration(
        Bucket=fleet.bucket,
        NotificationConfiguration={"QueueConfigurations": [{"QueueArn": other, "Events": ["s3:ObjectRemoved:*"]}]},
    )
    events = events_client(REGION, fleet.endpoint_url)
    for _ in range(2):  # idempotent, and the bucket's other notifications are kept
        route_events(events, fleet.clients.s3, fleet.bucket, fleet.layout.events_prefix(), arn, FAST_POLICY)
    # moto leaves EventBridgeConfiguration out of its answer (AWS includes it); the event arriving
    # below is what proves it is on.
    config = fleet.clients.s3.get_bucket_notification_configuration(Bucket=fleet.bucket)
    assert [q["QueueArn"] for q in config["QueueConfigurations"]] == [other]
    assert {r["Name"] for r in events.list_rules()["Rules"]} == {FLEET_RULE, INSTANCE_RULE}

    who = ReportKey("prod", "web", "i-0abc", "AROAEXAMPLEROLEID0001")
    reporter = StatusReporter(fleet.clients.s3, fleet.bucket, fleet.layout, who, ("api",), FAST_POLICY)
    failed = deploy_event(EventType.INSTANCE_DEPLOY_FAILED, DEPLOY, instance="i-0abc", reason="hook post exited 3")
    reporter.tell(failed)
    reporter.tell(failed)  # a retried deploy failing again is the same event: written once
    reporter.write()  # a status report is no event
    [event] = received(fleet, url, 1)
    assert (event["source"], event["detail-type"]) == ("aws.s3", "Object Created")
    key = event["detail"]["object"]["key"]
    assert fleet.layout.event_object(key) == ("instance-deploy-failed", who, DEPLOY.deploy_id)
    body = fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=key)["Body"].read()
    assert parse_event(body) == failed
    time.sleep(0.5)
    assert not fleet.clients.sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages")
