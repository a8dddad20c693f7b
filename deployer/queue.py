"""This instance's SQS queue, its DLQ and its SNS subscription: thin boto3 adapters.

Everything here is idempotent so boot can run it on every start: CreateQueue returns the
existing queue, attributes are then set to what the config says, and Subscribe returns the
existing subscription.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from deployer.config import DLQ_SUFFIX, AgentConfig
from deployer.limits import MAX_RECEIVE_BATCH, MAX_VISIBILITY_TIMEOUT_SECONDS
from deployer.retry import DEFAULT_POLICY, RetryPolicy

if TYPE_CHECKING:
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient

log = structlog.get_logger(__name__)

#: Longest SQS retention, so a DLQ keeps evidence for the full 14 days.
DLQ_RETENTION_SECONDS = 14 * 24 * 3600
#: Deploy messages older than this are stale anyway; reconcile covers anything missed.
QUEUE_RETENTION_SECONDS = 4 * 24 * 3600


@dataclass(frozen=True)
class QueueHandle:
    url: str
    arn: str
    dlq_url: str
    dlq_arn: str
    subscription_arn: str


@dataclass(frozen=True)
class Received:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int


def queue_policy(queue_arn: str, topic_arn: str) -> str:
    """Only our topic may send to the queue (aws:SourceArn), nothing else."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "DeployerTopicOnly",
                    "Effect": "Allow",
                    "Principal": {"Service": "sns.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": queue_arn,
                    "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
                }
            ],
        },
        sort_keys=True,
    )


def filter_policy(config: AgentConfig) -> str:
    """An optimisation only: the agent re-checks stage/role/component on every message."""
    return json.dumps(
        {"stage": [config.stage], "role": [config.role], "component": sorted(config.components)}, sort_keys=True
    )


def unwrap_body(body: str) -> str:
    """The deploy document from a message body, also when SNS delivered its JSON envelope.

    Raw delivery is set right after subscribing, so a message published in between (or while
    SNS propagates the attribute) can still arrive wrapped.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        return str(doc["Message"])
    return body


class InstanceQueue:
    def __init__(
        self,
        sqs: SQSClient,
        sns: SNSClient,
        config: AgentConfig,
        instance_id: str,
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.sqs = sqs
        self.sns = sns
        self.config = config
        self.name = config.queue_name(instance_id)
        self.policy = policy
        self.handle: QueueHandle | None = None

    def ensure(self) -> QueueHandle:
        """Create or update the DLQ, the queue and the raw-delivery subscription. Safe to repeat."""
        dlq_url = self._create(self.name + DLQ_SUFFIX, {"MessageRetentionPeriod": str(DLQ_RETENTION_SECONDS)})
        dlq_arn = self._arn(dlq_url)
        url = self._create(self.name, {})
        arn = self._arn(url)
        self.policy.call(
            self.sqs.set_queue_attributes,
            QueueUrl=url,
            Attributes={
                "VisibilityTimeout": str(self.config.visibility_timeout_seconds),
                "MessageRetentionPeriod": str(QUEUE_RETENTION_SECONDS),
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": self.config.max_receive_count}
                ),
                "Policy": queue_policy(arn, self.config.topic_arn),
            },
        )
        subscription_arn = self.policy.call(
            self.sns.subscribe,
            TopicArn=self.config.topic_arn,
            Protocol="sqs",
            Endpoint=arn,
            ReturnSubscriptionArn=True,
        )["SubscriptionArn"]
        for name, value in (("RawMessageDelivery", "true"), ("FilterPolicy", filter_policy(self.config))):
            self.policy.call(
                self.sns.set_subscription_attributes,
                SubscriptionArn=subscription_arn,
                AttributeName=name,
                AttributeValue=value,
            )
        self.handle = QueueHandle(url, arn, dlq_url, dlq_arn, subscription_arn)
        log.info("queue_ready", queue=self.name, queue_url=url, subscription_arn=subscription_arn)
        return self.handle

    def _create(self, name: str, attributes: Mapping[str, str]) -> str:
        response = self.policy.call(self.sqs.create_queue, QueueName=name, Attributes=dict(attributes))
        return response["QueueUrl"]

    def _arn(self, url: str) -> str:
        attrs = self.policy.call(self.sqs.get_queue_attributes, QueueUrl=url, AttributeNames=["QueueArn"])
        return attrs["Attributes"]["QueueArn"]

    @property
    def _handle(self) -> QueueHandle:
        if self.handle is None:
            raise RuntimeError("InstanceQueue.ensure() must run before the queue is used")
        return self.handle

    def receive(self, wait_seconds: int) -> list[Received]:
        response: Mapping[str, Any] = self.policy.call(
            self.sqs.receive_message,
            QueueUrl=self._handle.url,
            MaxNumberOfMessages=MAX_RECEIVE_BATCH,
            WaitTimeSeconds=wait_seconds,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        return [
            Received(
                message_id=m["MessageId"],
                receipt_handle=m["ReceiptHandle"],
                body=m.get("Body", ""),
                receive_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1")),
            )
            for m in response.get("Messages", [])
        ]

    def delete(self, receipt_handle: str) -> None:
        self.policy.call(self.sqs.delete_message, QueueUrl=self._handle.url, ReceiptHandle=receipt_handle)

    def set_visibility(self, receipt_handle: str, seconds: int) -> None:
        seconds = max(0, min(seconds, MAX_VISIBILITY_TIMEOUT_SECONDS))
        self.policy.call(
            self.sqs.change_message_visibility,
            QueueUrl=self._handle.url,
            ReceiptHandle=receipt_handle,
            VisibilityTimeout=seconds,
        )

    def dead_letter(self, message: Received, reason: str) -> None:
        """Move a message that can never succeed to the DLQ now, instead of after maxReceiveCount tries.

        Copy first, then delete: a crash in between leaves a duplicate in the DLQ, never a loss.
        """
        self.policy.call(
            self.sqs.send_message,
            QueueUrl=self._handle.dlq_url,
            MessageBody=message.body or "(empty body)",
            MessageAttributes={
                "deployer_rejection": {"DataType": "String", "StringValue": reason[:1000]},
                "deployer_source_message_id": {"DataType": "String", "StringValue": message.message_id},
            },
        )
        self.delete(message.receipt_handle)
