"""Fake AWS limits: what production enforces and moto does not, as `tests.awsproxy` rules.

Each rule enforces one limit with the error AWS gives for it (code, HTTP status, wire shape),
quoting the limit from `deployer.protocol.limits` where the deployer names it too. Each is a
fake, checked against moto's own state where it needs state (existing subscriptions, a
queue's MaximumMessageSize) rather than keeping a second copy of it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import boto3

from deployer.protocol.limits import QUEUE_RECREATE_DELAY_SECONDS, SNS_FILTER_POLICIES_PER_TOPIC
from tests.awsproxy import Answer, Call, s3_error, sns_error, sqs_error

REGION = "us-east-1"
SUBSCRIPTION_ARN = re.compile(rb"<SubscriptionArn>([^<]+)</SubscriptionArn>")


def _moto(service: str, upstream: str) -> Any:
    """A client straight to moto (never through the proxy), to read the state AWS would judge by."""
    session = boto3.session.Session(region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    return session.client(service, endpoint_url=upstream)  # type: ignore[call-overload]


def subscribe_attributes(params: Mapping[str, Any]) -> dict[str, str]:
    """`Attributes.entry.N.key/value` of a query-protocol Subscribe, as a dict."""
    found: dict[str, str] = {}
    for name, value in params.items():
        match = re.fullmatch(r"Attributes\.entry\.(\d+)\.key", name)
        if match:
            found[str(value)] = str(params.get(f"Attributes.entry.{match.group(1)}.value", ""))
    return found


def _same(name: str, wanted: str, existing: str | None) -> bool:
    if existing is None:
        return False
    if name == "FilterPolicy":
        return bool(json.loads(wanted) == json.loads(existing))
    return wanted.lower() == existing.lower() if wanted.lower() in ("true", "false") else wanted == existing


@dataclass
class FilterPolicyQuota:
    """SNS: `per_topic` subscription filter policies per topic (200 by default). A Subscribe or
    SetSubscriptionAttributes that would add one more fails with 403 FilterPolicyLimitExceeded;
    a subscription without a filter still succeeds."""

    per_topic: int = SNS_FILTER_POLICIES_PER_TOPIC
    #: topic ARN → endpoints whose subscription carries a filter policy
    filtered: dict[str, set[str]] = field(default_factory=dict)
    #: subscription ARN → (topic ARN, endpoint), learnt from Subscribe answers
    subscriptions: dict[str, tuple[str, str]] = field(default_factory=dict)

    def _over(self, topic: str, endpoint: str) -> Answer | None:
        held = self.filtered.get(topic, set())
        if endpoint not in held and len(held) >= self.per_topic:
            return sns_error(403, "FilterPolicyLimitExceeded", "Filter policy limit exceeded")
        return None

    def _target(self, call: Call) -> tuple[str, str] | None:
        if call.action == "Subscribe":
            return str(call.params.get("TopicArn")), str(call.params.get("Endpoint"))
        return self.subscriptions.get(str(call.params.get("SubscriptionArn")))

    def before(self, call: Call) -> Answer | None:
        if call.service != "sns":
            return None
        target = self._target(call)
        adds_filter = (call.action == "Subscribe" and "FilterPolicy" in subscribe_attributes(call.params)) or (
            call.action == "SetSubscriptionAttributes" and call.params.get("AttributeName") == "FilterPolicy"
        )
        return self._over(*target) if adds_filter and target else None

    def after(self, call: Call, answer: Answer) -> None:
        if call.service != "sns" or answer.status != 200:
            return
        if call.action == "Subscribe":
            found = SUBSCRIPTION_ARN.search(answer.body)
            if found:
                self.subscriptions[found.group(1).decode()] = (
                    str(call.params["TopicArn"]),
                    str(call.params["Endpoint"]),
                )
        target = self._target(call)
        if target is None:
            return
        topic, endpoint = target
        if call.action == "Unsubscribe":
            self.filtered.get(topic, set()).discard(endpoint)
        elif (call.action == "Subscribe" and "FilterPolicy" in subscribe_attributes(call.params)) or (
            call.action == "SetSubscriptionAttributes" and call.params.get("AttributeName") == "FilterPolicy"
        ):
            self.filtered.setdefault(topic, set()).add(endpoint)


@dataclass
class SubscribeComparesAttributes:
    """SNS: a Subscribe for an existing (topic, endpoint) whose given attributes differ from the
    subscription's fails with 400 InvalidParameter; attributes not given are not compared.
    (moto overwrites the subscription's attributes instead.)"""

    upstream: str

    def before(self, call: Call) -> Answer | None:
        if (call.service, call.action) != ("sns", "Subscribe"):
            return None
        wanted = subscribe_attributes(call.params)
        sns = _moto("sns", self.upstream)
        pages = sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=call.params["TopicArn"])
        for page in pages:
            for sub in page["Subscriptions"]:
                if sub["Endpoint"] != call.params.get("Endpoint"):
                    continue
                existing = sns.get_subscription_attributes(SubscriptionArn=sub["SubscriptionArn"])["Attributes"]
                if any(not _same(name, value, existing.get(name)) for name, value in wanted.items()):
                    return sns_error(
                        400,
                        "InvalidParameter",
                        "Invalid parameter: Attributes Reason: Subscription already exists with different attributes",
                    )
        return None


@dataclass
class QueueRecreateDelay:
    """SQS: a queue's name can be created again only `delay_s` after DeleteQueue (60 s); before
    that CreateQueue fails with 400 QueueDeletedRecently."""

    delay_s: float = QUEUE_RECREATE_DELAY_SECONDS
    deleted: dict[str, float] = field(default_factory=dict)

    def before(self, call: Call) -> Answer | None:
        if (call.service, call.action) != ("sqs", "CreateQueue"):
            return None
        since = self.deleted.get(str(call.params.get("QueueName")))
        if since is not None and time.monotonic() - since < self.delay_s:
            return sqs_error(
                "QueueDeletedRecently",
                f"You must wait {self.delay_s:g} seconds after deleting a queue before you can create "
                "another queue with the same name.",
                "AWS.SimpleQueueService.QueueDeletedRecently",
            )
        return None

    def after(self, call: Call, answer: Answer) -> None:
        if (call.service, call.action) == ("sqs", "DeleteQueue") and answer.status == 200:
            self.deleted[str(call.params["QueueUrl"]).rsplit("/", 1)[-1]] = time.monotonic()


def message_bytes(params: Mapping[str, Any]) -> int:
    """SendMessage's size as SQS counts it: the body plus each attribute's name, type and value."""
    size = len(str(params.get("MessageBody", "")).encode())
    for name, value in (params.get("MessageAttributes") or {}).items():
        size += len(name.encode()) + len(str(value.get("DataType", "")).encode())
        size += len(str(value.get("StringValue", "")).encode()) + len(str(value.get("BinaryValue", "")).encode())
    return size


@dataclass
class MessageSize:
    """SQS: a message whose body AND attributes exceed the queue's MaximumMessageSize fails with
    400 InvalidParameterValue. (moto compares the body alone.)"""

    upstream: str

    def before(self, call: Call) -> Answer | None:
        if (call.service, call.action) != ("sqs", "SendMessage"):
            return None
        attributes = _moto("sqs", self.upstream).get_queue_attributes(
            QueueUrl=call.params["QueueUrl"], AttributeNames=["MaximumMessageSize"]
        )["Attributes"]
        limit = int(attributes["MaximumMessageSize"])
        if message_bytes(call.params) > limit:
            return sqs_error(
                "InvalidParameterValue",
                f"One or more parameters are invalid. Reason: Message must be shorter than {limit} bytes.",
            )
        return None


#: How each service says "slow down".
THROTTLED: dict[str, Callable[[], Answer]] = {
    "sns": lambda: sns_error(400, "Throttling", "Rate exceeded"),
    "sqs": lambda: sqs_error("RequestThrottled", "Rate exceeded", "RequestThrottled"),
    "s3": lambda: s3_error(503, "SlowDown", "Please reduce your request rate."),
    # EventBridge refuses a throttled PutEvents entry inside a 200 answer: FailedEntryCount, and the
    # entry's ErrorCode `ThrottlingException` (retryable). One entry per request, as the deployer sends.
    # https://docs.aws.amazon.com/eventbridge/latest/APIReference/API_PutEvents.html
    # https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-quota.html (PutEvents transactions per second)
    "events": lambda: Answer(
        200,
        json.dumps(
            {"FailedEntryCount": 1, "Entries": [{"ErrorCode": "ThrottlingException", "ErrorMessage": "Rate exceeded"}]}
        ).encode(),
        {"Content-Type": "application/x-amz-json-1.1"},
    ),
}


@dataclass
class Throttle:
    """A token bucket over some actions of one service: `rate` calls per second, `burst` at once;
    past it, the service's throttling error (SNS 400 Throttling, SQS 400 RequestThrottled, S3 503 SlowDown,
    EventBridge a 200 whose one entry failed with ThrottlingException)."""

    service: str
    actions: frozenset[str]
    rate: float
    burst: float
    throttled: int = 0
    _tokens: float = -1.0
    _at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def before(self, call: Call) -> Answer | None:
        if call.service != self.service or (self.actions and call.action not in self.actions):
            return None
        with self._lock:
            now = time.monotonic()
            if self._tokens < 0:
                self._tokens, self._at = self.burst, now
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return None
            self.throttled += 1
        return THROTTLED[self.service]()


@dataclass
class Refuse:
    """Any call matching `when` is refused with `answer` (an IAM deny, a broken DLQ policy)."""

    when: Callable[[Call], bool]
    answer: Callable[[], Answer]
    refused: int = 0

    def before(self, call: Call) -> Answer | None:
        if self.when(call):
            self.refused += 1
            return self.answer()
        return None
