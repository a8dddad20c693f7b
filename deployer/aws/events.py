"""EventBridge adapter: put one deploy event, and route the fleet's events to a target.

PutEvents answers 200 even when it refused an entry: the refusal is in `FailedEntryCount` and
the entry's `ErrorCode`. A throttled or internally failed entry is retried like a throttled
call (it becomes a ClientError the one retry policy knows as transient); any other refusal is
final and leaves as an AwsError naming the code.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.events import EVENT_SOURCE, FLEET_RULE, INSTANCE_RULE, DeployEvent, EventType
from deployer.protocol.layout import Layout
from deployer.protocol.rollout import MAX_ABORT_AFTER

if TYPE_CHECKING:
    from mypy_boto3_events import EventBridgeClient
    from mypy_boto3_s3 import S3Client

#: The rules' target id (one target per rule).
TARGET_ID = "deployer"


def put_event(events: EventBridgeClient, bus: str, event: DeployEvent, policy: RetryPolicy = DEFAULT_POLICY) -> str:
    """Send one event; its EventBridge event id."""

    def attempt() -> str:
        answer = events.put_events(Entries=[event.entry(bus)])  # type: ignore[list-item]
        entry = answer["Entries"][0] if answer.get("Entries") else {}
        if answer.get("FailedEntryCount", 0) or "EventId" not in entry:
            code = str(entry.get("ErrorCode", "InternalFailure"))
            message = str(entry.get("ErrorMessage", "entry refused"))
            # As a ClientError, a throttled entry is retried like a throttled call.
            raise ClientError({"Error": {"Code": code, "Message": message}}, "PutEvents")
        return str(entry["EventId"])

    return policy.call(attempt)


def failed_instances(
    s3: S3Client,
    bucket: str,
    layout: Layout,
    stage: str,
    role: str,
    deploy_id: str,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> frozenset[str]:
    """The instances that told that `deploy_id` failed on them, from their markers' keys (one LIST
    of at most MAX_ABORT_AFTER keys: enough to know whether a plan's limit is reached). A key is
    named by its writer, whom IAM confines to its own name; a key that does not parse counts for
    nobody."""
    prefix = layout.event_prefix(EventType.INSTANCE_DEPLOY_FAILED.slug, stage, role, deploy_id)
    answer = policy.call(s3.list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=MAX_ABORT_AFTER)
    found = set()
    for stored in answer.get("Contents", []):
        parsed = layout.event_object(stored["Key"])
        if parsed is not None and parsed[2] == deploy_id:
            found.add(parsed[1].instance_id)
    return frozenset(found)


def fleet_pattern() -> dict[str, Any]:
    """The CLI's own events on the bus."""
    return {"source": [EVENT_SOURCE]}


def instance_pattern(bucket: str, events_prefix: str) -> dict[str, Any]:
    """S3's `Object Created` for the objects agents write under `events/` in this bucket."""
    return {
        "source": ["aws.s3"],
        "detail-type": ["Object Created"],
        "detail": {"bucket": {"name": [bucket]}, "object": {"key": [{"prefix": events_prefix}]}},
    }


def route_events(
    events: EventBridgeClient,
    s3: S3Client,
    bucket: str,
    events_prefix: str,
    target_arn: str,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> None:
    """Idempotent: the bucket sends its object events to EventBridge, and two rules on the
    default bus deliver the fleet's and the instances' events to `target_arn` (an SQS queue, an
    SNS topic or a CloudWatch log group; its resource policy must let events.amazonaws.com in).

    The notification configuration is read and written back with EventBridge switched on, so
    the bucket's other notifications (queues, topics, functions) are kept: PutBucketNotificationConfiguration
    replaces the whole configuration. https://docs.aws.amazon.com/AmazonS3/latest/userguide/enable-event-notifications-eventbridge.html
    """
    current = policy.call(s3.get_bucket_notification_configuration, Bucket=bucket)
    if "EventBridgeConfiguration" not in current:
        kept = {
            k: current[k]
            for k in ("TopicConfigurations", "QueueConfigurations", "LambdaFunctionConfigurations")
            if k in current
        }
        policy.call(
            s3.put_bucket_notification_configuration,
            Bucket=bucket,
            NotificationConfiguration={**kept, "EventBridgeConfiguration": {}},
        )
    for rule, pattern in ((FLEET_RULE, fleet_pattern()), (INSTANCE_RULE, instance_pattern(bucket, events_prefix))):
        policy.call(
            events.put_rule,
            Name=rule,
            EventPattern=json.dumps(pattern),
            State="ENABLED",
            Description="fleet-deployer: deploy events to the operators' target",
        )
        policy.call(events.put_targets, Rule=rule, Targets=[{"Id": TARGET_ID, "Arn": target_arn}])
