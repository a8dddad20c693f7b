"""This instance's queue: the port the agent loop talks to, and its SQS adapter.

The port (`InstanceQueue`) is `ensure` plus four operations on received messages; the loop
never sees SQS. `SqsQueue` implements it over an injected client: `ensure` creates (at boot, or
again when the queue was deleted) the queue, its DLQ and the raw-delivery SNS subscription, and
a call on a queue that no longer exists leaves as `QueueMissing`, so the loop can heal it.
`deployer.agent.queue_stub.MemoryQueue` implements the port in memory for unit tests.

Everything in `SqsQueue.ensure` is idempotent so boot can run it on every start: CreateQueue
(without attributes) returns the existing queue, attributes are then set to what the config
says, and Subscribe returns the existing subscription.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from deployer.agent.config import AgentConfig
from deployer.aws.registration import is_missing_queue
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import AwsError, QueueMissing
from deployer.protocol.limits import MAX_RECEIVE_BATCH, MAX_SQS_MESSAGE_BYTES, MAX_VISIBILITY_TIMEOUT_SECONDS
from deployer.protocol.names import DLQ_SUFFIX, OWNER_TAG

if TYPE_CHECKING:
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient

log = structlog.get_logger(__name__)
T = TypeVar("T")

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
#: Appended to the reason when the DLQ copy's body had to be cut to fit (the widest numbers are reserved).
TRUNCATION_NOTE = " [body cut to {n} of {of} bytes to fit SQS's size limit]"


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

    def ensure(self) -> object:
        """Create (or re-create) the queue, its DLQ and subscription; safe to repeat."""
        ...

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


#: No queue may name this one as its dead-letter queue. SQS's default is `allowAll`: any queue
#: of the account and region may, and SQS then moves its messages in past this queue's policy,
#: so another instance could fill this instance's queue by redriving its own into it.
#: https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SetQueueAttributes.html
REDRIVE_DENY_ALL = json.dumps({"redrivePermission": "denyAll"})


def redrive_allow_only(source_queue_arn: str) -> str:
    """A DLQ's RedriveAllowPolicy: only its own instance's queue may dead-letter into it."""
    return json.dumps({"redrivePermission": "byQueue", "sourceQueueArns": [source_queue_arn]})


def attribute_bytes(attributes: Mapping[str, Mapping[str, str]]) -> int:
    """What message attributes add to a message's size: each name, data type and value, in UTF-8."""
    return sum(
        len(name.encode()) + len(value["DataType"].encode()) + len(value.get("StringValue", "").encode())
        for name, value in attributes.items()
    )


def fit_body(body: str, attributes: Mapping[str, Mapping[str, str]], limit: int = MAX_SQS_MESSAGE_BYTES) -> str:
    """Pure: `body` cut (on a character boundary) so that it and `attributes` fit in `limit` bytes.

    Attributes count toward the SQS size limit, so a body that arrived at the limit cannot be
    copied to the DLQ with its rejection reason attached unless it is cut.
    """
    room = limit - attribute_bytes(attributes)
    data = body.encode()
    return body if len(data) <= room else data[: max(room, 0)].decode(errors="ignore")


def dead_letter_copy(
    body: str, reason: str, message_id: str, limit: int = MAX_SQS_MESSAGE_BYTES
) -> tuple[str, dict[str, dict[str, str]]]:
    """Pure: the DLQ copy of a message (body, attributes) that fits in `limit` bytes, attributes included.

    When the body must be cut, the reason says so and by how much; room is made for the widest
    note first, so the final attributes never push the copy over the limit.
    """

    def attributes(why: str) -> dict[str, dict[str, str]]:
        return {
            REJECTION_ATTRIBUTE: {"DataType": "String", "StringValue": why},
            SOURCE_ID_ATTRIBUTE: {"DataType": "String", "StringValue": message_id},
        }

    reason = reason[:MAX_REJECTION_REASON_CHARS]
    size = len(body.encode())
    if size + attribute_bytes(attributes(reason)) <= limit:
        return body, attributes(reason)
    kept = fit_body(body, attributes(reason + TRUNCATION_NOTE.format(n=limit, of=size)), limit)
    return kept, attributes(reason + TRUNCATION_NOTE.format(n=len(kept.encode()), of=size))


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
        dlq_url = self._create(self.name + DLQ_SUFFIX)
        dlq_arn = self._arn(dlq_url)
        self._set(
            dlq_url,
            {
                "MessageRetentionPeriod": str(DLQ_RETENTION_SECONDS),
                "MaximumMessageSize": str(MAX_SQS_MESSAGE_BYTES),
                "Policy": dlq_policy(dlq_arn, self.owner_userid),
                "RedriveAllowPolicy": redrive_allow_only(dlq_arn.removesuffix(DLQ_SUFFIX)),
            },
        )
        url = self._create(self.name)
        arn = self._arn(url)
        self._set(
            url,
            {
                "VisibilityTimeout": str(self.config.visibility_timeout_seconds),
                "MessageRetentionPeriod": str(QUEUE_RETENTION_SECONDS),
                "MaximumMessageSize": str(MAX_SQS_MESSAGE_BYTES),
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": self.config.max_receive_count}
                ),
                "Policy": queue_policy(arn, self.config.topic_arn),
                "RedriveAllowPolicy": REDRIVE_DENY_ALL,
            },
        )
        subscription_arn = self.policy.call(
            self.sns.subscribe,
            TopicArn=self.config.topic_arn,
            Protocol="sqs",
            Endpoint=arn,
            # No FilterPolicy: SNS allows 200 per topic, and every message is re-checked here anyway
            # (docs/design.md, "Scale"). Subscribe only compares the attributes it is given, so a
            # subscription an older agent made with a filter is returned as it is.
            Attributes={"RawMessageDelivery": "true"},
            ReturnSubscriptionArn=True,
        )["SubscriptionArn"]
        self._handle = QueueHandle(url, arn, dlq_url, dlq_arn, subscription_arn)
        log.info("queue_ready", queue=self.name, queue_url=url, subscription_arn=subscription_arn)
        return self._handle

    def _create(self, name: str) -> str:
        """CreateQueue without attributes: with them, SQS refuses (`QueueAlreadyExists`) as soon as one
        differs from the existing queue's, so a drifted DLQ or a changed default would stop boot.
        The attributes are set right after, by `_set`, whatever the queue had."""
        response = self.policy.call(self.sqs.create_queue, QueueName=name, tags={OWNER_TAG: self.owner_userid})
        return response["QueueUrl"]

    def _set(self, url: str, attributes: Mapping[str, str]) -> None:
        self.policy.call(self.sqs.set_queue_attributes, QueueUrl=url, Attributes=dict(attributes))

    def _arn(self, url: str) -> str:
        attrs = self.policy.call(self.sqs.get_queue_attributes, QueueUrl=url, AttributeNames=["QueueArn"])
        return attrs["Attributes"]["QueueArn"]

    def _call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        """A call on an existing queue: a queue deleted under us leaves as QueueMissing."""
        try:
            return self.policy.call(fn, **kwargs)
        except AwsError as exc:
            if is_missing_queue(exc):
                raise QueueMissing(f"queue {self.name} (or its DLQ) no longer exists: {exc}") from exc
            raise

    def receive(self, wait_seconds: int, /) -> list[Received]:
        response: Mapping[str, Any] = self._call(
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
        self._call(self.sqs.delete_message, QueueUrl=self.handle.url, ReceiptHandle=receipt_handle)

    def set_visibility(self, receipt_handle: str, seconds: int) -> None:
        self._call(
            self.sqs.change_message_visibility,
            QueueUrl=self.handle.url,
            ReceiptHandle=receipt_handle,
            VisibilityTimeout=clamp_visibility(seconds),
        )

    def dead_letter(self, message: Received, reason: str) -> None:
        """Move a message that can never succeed to the DLQ now, instead of after maxReceiveCount tries.

        Copy first, then delete: a crash in between leaves a duplicate in the DLQ, never a loss.
        The copy carries the reason as attributes, which count toward the size limit, so a body
        that arrived near the limit is cut to fit and the reason says so.
        """
        body, attributes = dead_letter_copy(message.body or "(empty body)", reason, message.message_id)
        self._call(self.sqs.send_message, QueueUrl=self.handle.dlq_url, MessageBody=body, MessageAttributes=attributes)
        self.delete(message.receipt_handle)
