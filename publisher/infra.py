"""`deployer init`: create the bucket and the SNS topic, idempotently, and set the topic's policy.

The topic policy is `deployer iam-policy --for topic`'s: only the given CI principals may
publish, and only SQS endpoints of the deployer's queue-name pattern may subscribe. SNS's
default policy lets any principal of the account do both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from deployer.aws.clients import Clients
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import bucket_exists, create_bucket
from deployer.protocol.names import DEFAULT_QUEUE_PREFIX
from publisher.iam import Audience, Scope, policy_for


@dataclass(frozen=True)
class InitResult:
    bucket: str
    bucket_created: bool
    topic_arn: str
    publishers: tuple[str, ...]


def init_resources(
    clients: Clients,
    bucket: str,
    topic_name: str,
    *,
    publishers: tuple[str, ...] = (),
    queue_prefix: str = DEFAULT_QUEUE_PREFIX,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> InitResult:
    # us-east-1 answers CreateBucket on a bucket you already own with 200, so ask first.
    created = not bucket_exists(clients.s3, bucket, policy)
    if created:
        create_bucket(clients.s3, bucket, policy)
    # CreateTopic is idempotent: it returns the existing topic's ARN.
    topic_arn = policy.call(clients.sns.create_topic, Name=topic_name)["TopicArn"]
    scope = Scope(bucket=bucket, topic_arn=topic_arn, queue_prefix=queue_prefix, publishers=publishers)
    policy.call(
        clients.sns.set_topic_attributes,
        TopicArn=topic_arn,
        AttributeName="Policy",
        AttributeValue=json.dumps(policy_for(Audience.TOPIC, scope)),
    )
    return InitResult(bucket=bucket, bucket_created=created, topic_arn=topic_arn, publishers=publishers)
