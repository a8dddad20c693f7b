"""`deployer init`: create the bucket and the SNS topic, idempotently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from deployer.errors import AwsError
from deployer.pointers import error_code
from deployer.retry import DEFAULT_POLICY, RetryPolicy

if TYPE_CHECKING:
    from deployer.aws import Clients


@dataclass(frozen=True)
class InitResult:
    bucket: str
    bucket_created: bool
    topic_arn: str


def init_resources(clients: Clients, bucket: str, topic_name: str, policy: RetryPolicy = DEFAULT_POLICY) -> InitResult:
    # us-east-1 answers CreateBucket on a bucket you already own with 200, so ask first.
    created = not _bucket_exists(clients, bucket, policy)
    if created:
        _create_bucket(clients, bucket, policy)
    # CreateTopic is idempotent: it returns the existing topic's ARN.
    topic_arn = policy.call(clients.sns.create_topic, Name=topic_name)["TopicArn"]
    return InitResult(bucket=bucket, bucket_created=created, topic_arn=topic_arn)


def _create_bucket(clients: Clients, bucket: str, policy: RetryPolicy) -> None:
    region = clients.s3.meta.region_name
    kwargs: dict[str, object] = {"Bucket": bucket}
    if region != "us-east-1":
        # us-east-1 is the one region that rejects an explicit LocationConstraint.
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        policy.call(clients.s3.create_bucket, **kwargs)
    except ClientError as exc:
        raise AwsError(f"cannot create bucket {bucket}: {error_code(exc) or exc}") from None


def _bucket_exists(clients: Clients, bucket: str, policy: RetryPolicy) -> bool:
    try:
        policy.call(clients.s3.head_bucket, Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise AwsError(f"cannot check bucket {bucket}: {error_code(exc) or exc}") from None
    return True
