"""This instance's queue: the port the agent loop talks to, and its SQS adapter.

The port (`InstanceQueue`) is four operations on received messages; the loop never sees SQS.
`SqsQueue` implements it over an injected client and also creates, at boot, the queue, its
DLQ and the raw-delivery SNS subscription. `deployer.agent.queue_stub.MemoryQueue` implements
it in memory for unit tests.

Everything in `SqsQueue.ensure` is idempotent so boot can run it on every start: CreateQueue
returns the existing queue, attributes are then set to what the config says, and Subscribe
returns the existing subscription.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from deployer.agent.config import AgentConfig
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.limits import MAX_RECEIVE_BATCH, MAX_VISIBILITY_TIMEOUT_SECONDS
from deployer.protocol.names import DLQ_SUFFIX, OWNER_TAG

if TYPE_CHECKING:
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient

log = structlog.get_logger(__name__)

#: Longest SQS retention, so a DLQ keeps evidence for the full 14 days.
#: https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SetQueueAttributes.html
DLQ_RETENTION_SECONDS = 14 * 24 * 3600
#: Deploy messages older than this are stale anyway; reconcile covers anything missed.
QUEUE_RETENTION_SECONDS = 4 * 24 * 3600
#: Message attribute naming why a message was dead-lettered (and the id it had).
REJECTION_ATTRIBUTE = "deployer_rejection"
SOURCE_ID_ATTRIBUTE = "deployer_source_message_id"
#: Bound on the rejection reason carried as an attribute.
MAX_REJECTION_REASON_CHARS = 1000


@dataclass(frozen=True)
class Received:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int


class InstanceQueue(Protocol):
    """The port: what the agent loop does with its queue."""

    @property
    def name(self) -> str: ...

    def receive(self, wait_seconds: int, /) -> list[Received]: ...

    def delete(self, receipt_handle: str) -> None: ...

    def set_visibility(self, receipt_handle: str, seconds: int) -> None: ...

    def dead_letter(self, message: Received, reason: str) -> None: ...


@dataclass(frozen=True)
class QueueHandle:
    url: str
    arn: str
    dlq_url: str
    dlq_arn: str
    subscription_arn: str


def clamp_visibility(seconds: int) -> int:
    return max(0, min(seconds, MAX_VISIBILITY_TIMEOUT_SECONDS))


def queue_policy(queue_arn: str, topic_arn: str) -> str:
    """Only our topic may send to the queue.

    Within one account an Allow in either the identity or the resource policy is enough, so an
    allow-only queue policy would stop nobody with `sqs:SendMessage` in their own policy: the
    explicit Deny does. `ArnNotEquals` on a missing `aws:SourceArn` (a direct SendMessage)
    matches, so everything that is not SNS delivering from the topic is refused.
    https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html
    """
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
                },
                {
                    "Sid": "NothingElseSends",
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "sqs:SendMessage",
                    "Resource": queue_arn,
                    "Condition": {"ArnNotEquals": {"aws:SourceArn": topic_arn}},
                },
            ],
        },
        sort_keys=True,
    )


def dlq_policy(dlq_arn: str, owner_userid: str) -> str:
    """Only the owning agent may put a message into its DLQ (SQS's own redrive needs no permission)."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "OnlyTheOwnerDeadLetters",
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "sqs:SendMessage",
                    "Resource": dlq_arn,
                    "Condition": {"StringNotEquals": {"aws:userid": owner_userid}},
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


class SqsQueue:
    """The SQS adapter of the port, plus the boot-time setup of queue, DLQ and subscription."""

    def __init__(
        self,
        sqs: SQSClient,
        sns: SNSClient,
        config: AgentConfig,
        instance_id: str,
        policy: RetryPolicy = DEFAULT_POLICY,
        owner_userid: str | None = None,
    ) -> None:
        """`owner_userid` is the creating principal's `aws:userid`: the queues are tagged with it, and
        the instance role may only use queues that carry its own (SQS attribute-based access control)."""
        self.sqs = sqs
        self.sns = sns
        self.config = config
        self._name = config.queue_name(instance_id)
        self.policy = policy
        self.owner_userid = owner_userid or instance_id
        self._handle: QueueHandle | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def handle(self) -> QueueHandle:
        if self._handle is None:
            raise RuntimeError("SqsQueue.ensure() must run before the queue is used")
        return self._handle

    def ensure(self) -> QueueHandle:
        """Create or update the DLQ, the queue and the raw-delivery subscription. Safe to repeat.

        Every attribute goes in with the Subscribe and SetQueueAttributes calls the instance role
        is allowed: it has no `sns:SetSubscriptionAttributes`, so no instance can re-point or
        re-filter another instance's subscription.
        """
        dlq_url = self._create(self.name + DLQ_SUFFIX, {"MessageRetentionPeriod": str(DLQ_RETENTION_SECONDS)})
        dlq_arn = self._arn(dlq_url)
        self._set(dlq_url, {"Policy": dlq_policy(dlq_arn, self.owner_userid)})
        url = self._create(self.name, {})
        arn = self._arn(url)
        self._set(
            url,
            {
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
            Attributes={"RawMessageDelivery": "true", "FilterPolicy": filter_policy(self.config)},
            ReturnSubscriptionArn=True,
        )["SubscriptionArn"]
        self._handle = QueueHandle(url, arn, dlq_url, dlq_arn, subscription_arn)
        log.info("queue_ready", queue=self.name, queue_url=url, subscription_arn=subscription_arn)
        return self._handle

    def _create(self, name: str, attributes: Mapping[str, str]) -> str:
        response = self.policy.call(
            self.sqs.create_queue,
            QueueName=name,
            Attributes=dict(attributes),
            tags={OWNER_TAG: self.owner_userid},
        )
        return response["QueueUrl"]

    def _set(self, url: str, attributes: Mapping[str, str]) -> None:
        self.policy.call(self.sqs.set_queue_attributes, QueueUrl=url, Attributes=dict(attributes))

    def _arn(self, url: str) -> str:
        attrs = self.policy.call(self.sqs.get_queue_attributes, QueueUrl=url, AttributeNames=["QueueArn"])
        return attrs["Attributes"]["QueueArn"]

    def receive(self, wait_seconds: int, /) -> list[Received]:
        response: Mapping[str, Any] = self.policy.call(
            self.sqs.receive_message,
            QueueUrl=self.handle.url,
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
        self.policy.call(self.sqs.delete_message, QueueUrl=self.handle.url, ReceiptHandle=receipt_handle)

    def set_visibility(self, receipt_handle: str, seconds: int) -> None:
        self.policy.call(
            self.sqs.change_message_visibility,
            QueueUrl=self.handle.url,
            ReceiptHandle=receipt_handle,
            VisibilityTimeout=clamp_visibility(seconds),
        )

    def dead_letter(self, message: Received, reason: str) -> None:
        """Move a message that can never succeed to the DLQ now, instead of after maxReceiveCount tries.

        Copy first, then delete: a crash in between leaves a duplicate in the DLQ, never a loss.
        """
        self.policy.call(
            self.sqs.send_message,
            QueueUrl=self.handle.dlq_url,
            MessageBody=message.body or "(empty body)",
            MessageAttributes={
                REJECTION_ATTRIBUTE: {"DataType": "String", "StringValue": reason[:MAX_REJECTION_REASON_CHARS]},
                SOURCE_ID_ATTRIBUTE: {"DataType": "String", "StringValue": message.message_id},
            },
        )
        self.delete(message.receipt_handle)
