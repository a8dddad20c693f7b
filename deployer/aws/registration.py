"""Removing an instance's registration: shared by an agent leaving cleanly and by `deployer gc`.

The order is the argument: subscription first (a subscription to a deleted queue breaks
publishing on the local emulator and is an error source on AWS), then the queue and its DLQ,
then the status report last, so an interrupted removal is still seen as this instance and
finished by the next `gc`. Every step is idempotent: a missing piece is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from deployer.aws.clients import Clients
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import AwsError
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.names import DLQ_SUFFIX

log = structlog.get_logger(__name__)

#: What SQS answers for a queue that does not exist (JSON protocol, and the older query protocol).
MISSING_QUEUE_CODES = frozenset({"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"})
MISSING_SUBSCRIPTION_CODES = frozenset({"NotFound", "NotFoundException"})


@dataclass(frozen=True)
class Removal:
    """What removing one instance's registration did (or would do, in a dry run)."""

    instance_id: str
    stage: str
    role: str
    subscriptions: tuple[str, ...]
    queues: tuple[str, ...]
    status_key: str
    dry_run: bool


def is_missing_queue(exc: AwsError) -> bool:
    return exc.code in MISSING_QUEUE_CODES or "NonExistentQueue" in exc.code


def subscriptions_by_endpoint(
    clients: Clients, topic_arn: str, policy: RetryPolicy = DEFAULT_POLICY
) -> dict[str, list[str]]:
    """Every confirmed SQS subscription of the topic, by queue ARN (one call per 100 subscriptions)."""
    found: dict[str, list[str]] = {}
    token: str | None = None
    while True:
        kwargs = {"TopicArn": topic_arn, **({"NextToken": token} if token else {})}
        page = policy.call(clients.sns.list_subscriptions_by_topic, **kwargs)
        for sub in page.get("Subscriptions", []):
            if sub.get("Protocol") == "sqs" and sub.get("SubscriptionArn", "").startswith("arn:"):
                found.setdefault(sub["Endpoint"], []).append(sub["SubscriptionArn"])
        token = page.get("NextToken")
        if not token:
            return found


def queue_url(clients: Clients, name: str, policy: RetryPolicy = DEFAULT_POLICY) -> str | None:
    try:
        return str(policy.call(clients.sqs.get_queue_url, QueueName=name)["QueueUrl"])
    except AwsError as exc:
        if is_missing_queue(exc):
            return None
        raise


def remove_registration(
    clients: Clients,
    *,
    bucket: str,
    layout: Layout,
    who: ReportKey,
    queue_name: str,
    subscription_arns: Iterable[str],
    dry_run: bool = False,
    keep_report: bool = False,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Removal:
    """Unsubscribe, delete queue + DLQ, delete the status report (unless `keep_report`: an agent
    leaving through its terminate hook writes a last report saying so). Idempotent: missing
    pieces are skipped."""
    subscriptions = tuple(subscription_arns)
    queues = tuple(name for name in (queue_name, queue_name + DLQ_SUFFIX) if queue_url(clients, name, policy))
    status_key = layout.status_key(who)
    removal = Removal(who.instance_id, who.stage, who.role, subscriptions, queues, status_key, dry_run)
    if dry_run:
        return removal
    for arn in subscriptions:
        try:
            policy.call(clients.sns.unsubscribe, SubscriptionArn=arn)
        except AwsError as exc:
            if exc.code not in MISSING_SUBSCRIPTION_CODES:
                raise
    for name in queues:
        url = queue_url(clients, name, policy)
        if url:
            try:
                policy.call(clients.sqs.delete_queue, QueueUrl=url)
            except AwsError as exc:
                if not is_missing_queue(exc):
                    raise
    if not keep_report:
        policy.call(clients.s3.delete_object, Bucket=bucket, Key=status_key)
    log.info(
        "instance_deregistered",
        instance_id=who.instance_id,
        stage=who.stage,
        role=who.role,
        subscriptions=len(subscriptions),
        queues=list(queues),
    )
    return removal
