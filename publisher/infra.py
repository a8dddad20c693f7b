"""`deployer init`: create the bucket and the SNS topic, idempotently."""

from __future__ import annotations

from dataclasses import dataclass

from deployer.aws.clients import Clients
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import bucket_exists, create_bucket


@dataclass(frozen=True)
class InitResult:
    bucket: str
    bucket_created: bool
    topic_arn: str


def init_resources(clients: Clients, bucket: str, topic_name: str, policy: RetryPolicy = DEFAULT_POLICY) -> InitResult:
    # us-east-1 answers CreateBucket on a bucket you already own with 200, so ask first.
    created = not bucket_exists(clients.s3, bucket, policy)
    if created:
        create_bucket(clients.s3, bucket, policy)
    # CreateTopic is idempotent: it returns the existing topic's ARN.
    topic_arn = policy.call(clients.sns.create_topic, Name=topic_name)["TopicArn"]
    return InitResult(bucket=bucket, bucket_created=created, topic_arn=topic_arn)
