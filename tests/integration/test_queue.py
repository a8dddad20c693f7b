"""The instance queue adapter against the emulator: idempotent setup, attributes, DLQ path."""

from __future__ import annotations

import json
import time

from deployer.agent.config import config_from_dict
from deployer.agent.queue import DLQ_RETENTION_SECONDS, Received, SqsQueue
from deployer.protocol.deploy import unwrap_body
from tests.support import BUCKET, Fleet


def make_queue(fleet: Fleet, instance: str = "i-0queue") -> SqsQueue:
    config = config_from_dict(
        {"stage": "prod", "role": "web", "components": ["api"], "bucket": BUCKET, "topic_arn": fleet.topic_arn}
    )
    return SqsQueue(fleet.clients.sqs, fleet.clients.sns, config, instance)


def test_ensure_is_idempotent_and_sets_redrive_policy_and_source_arn(fleet: Fleet) -> None:
    first = make_queue(fleet).ensure()
    second = make_queue(fleet).ensure()
    assert first == second
    attrs = fleet.clients.sqs.get_queue_attributes(QueueUrl=first.url, AttributeNames=["All"])["Attributes"]
    assert json.loads(attrs["RedrivePolicy"]) == {"deadLetterTargetArn": first.dlq_arn, "maxReceiveCount": 5}
    statement = json.loads(attrs["Policy"])["Statement"][0]
    assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": fleet.topic_arn}}
    assert statement["Principal"] == {"Service": "sns.amazonaws.com"}
    subs = fleet.clients.sns.list_subscriptions_by_topic(TopicArn=fleet.topic_arn)["Subscriptions"]
    assert len(subs) == 1
    sub_attrs = fleet.clients.sns.get_subscription_attributes(SubscriptionArn=first.subscription_arn)["Attributes"]
    assert sub_attrs["RawMessageDelivery"] == "true"
    assert "FilterPolicy" not in sub_attrs  # SNS allows 200 per topic: the agent filters, not SNS


def test_boot_is_idempotent_when_the_queues_attributes_drifted(fleet: Fleet) -> None:
    handle = make_queue(fleet).ensure()
    # An operator (or an older release) changed them; CreateQueue with attributes would now be refused.
    fleet.clients.sqs.set_queue_attributes(QueueUrl=handle.dlq_url, Attributes={"MessageRetentionPeriod": "60"})
    fleet.clients.sqs.set_queue_attributes(QueueUrl=handle.url, Attributes={"VisibilityTimeout": "7"})
    assert make_queue(fleet).ensure() == handle
    dlq = fleet.clients.sqs.get_queue_attributes(QueueUrl=handle.dlq_url, AttributeNames=["All"])["Attributes"]
    queue = fleet.clients.sqs.get_queue_attributes(QueueUrl=handle.url, AttributeNames=["All"])["Attributes"]
    assert dlq["MessageRetentionPeriod"] == str(DLQ_RETENTION_SECONDS)
    assert queue["VisibilityTimeout"] == "600"


def test_every_deploy_reaches_every_queue_and_the_agent_does_the_filtering(fleet: Fleet) -> None:
    queue = make_queue(fleet)
    queue.ensure()
    for stage in ("dev", "prod"):
        fleet.clients.sns.publish(
            TopicArn=fleet.topic_arn,
            Message=json.dumps({"stage": stage}),
            MessageAttributes={
                "stage": {"DataType": "String", "StringValue": stage},
                "role": {"DataType": "String", "StringValue": "web"},
                "component": {"DataType": "String", "StringValue": "api"},
            },
        )
    # SNS delivers asynchronously (AWS, LocalStack; moto before Publish returns): a receive may see one.
    bodies: list[str] = []
    deadline = time.monotonic() + 10
    while len(bodies) < 2 and time.monotonic() < deadline:
        bodies += [json.loads(m.body)["stage"] for m in queue.receive(1)]
    assert sorted(bodies) == ["dev", "prod"]


def test_dead_letter_copies_to_the_dlq_with_the_reason_and_deletes_the_original(fleet: Fleet) -> None:
    queue = make_queue(fleet)
    handle = queue.ensure()
    fleet.clients.sqs.send_message(QueueUrl=handle.url, MessageBody="garbage")
    [message] = queue.receive(1)
    queue.dead_letter(message, "deploy document is not JSON")
    dlq = fleet.clients.sqs.receive_message(QueueUrl=handle.dlq_url, MessageAttributeNames=["All"], WaitTimeSeconds=1)
    [moved] = dlq["Messages"]
    assert moved["Body"] == "garbage"
    assert moved["MessageAttributes"]["deployer_rejection"]["StringValue"] == "deploy document is not JSON"
    assert queue.receive(0) == []


def test_an_sns_envelope_is_unwrapped_to_the_deploy_document() -> None:
    envelope = json.dumps({"Type": "Notification", "TopicArn": "arn", "Message": '{"v":1}'})
    assert unwrap_body(envelope) == '{"v":1}'
    assert unwrap_body('{"v":1}') == '{"v":1}'
    assert unwrap_body("not json") == "not json"


def test_received_carries_the_receive_count(fleet: Fleet) -> None:
    queue = make_queue(fleet)
    handle = queue.ensure()
    fleet.clients.sqs.send_message(QueueUrl=handle.url, MessageBody="x")
    [first] = queue.receive(1)
    queue.set_visibility(first.receipt_handle, 0)
    [second] = queue.receive(1)
    assert isinstance(second, Received)
    assert (first.receive_count, second.receive_count) == (1, 2)
