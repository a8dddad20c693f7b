"""boto3 client construction: one place that decides endpoints, timeouts and retries."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from deployer import __version__
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import ConfigError
from deployer.protocol.limits import MAX_WAIT_TIME_SECONDS

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient

#: A stalled TCP connect fails fast; the retry policy tries again.
CONNECT_TIMEOUT_SECONDS = 5
#: Must outlast the 20 s SQS long poll or every idle receive would time out.
READ_TIMEOUT_SECONDS = MAX_WAIT_TIME_SECONDS + 10


@dataclass(frozen=True)
class Clients:
    """The three clients the deployer talks to; injected everywhere so tests can swap them."""

    s3: S3Client
    sns: SNSClient
    sqs: SQSClient


def resolve_region(region: str | None) -> str:
    found = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not found:
        raise ConfigError("no AWS region: set `region` in the config, --region, or AWS_REGION")
    return found


def _config() -> Config:
    return Config(
        # Our RetryPolicy is the only retry layer; botocore's would multiply attempts.
        retries={"total_max_attempts": 1},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        user_agent_extra=f"deployer/{__version__}",
    )


def make_clients(region: str | None = None, endpoint_url: str | None = None) -> Clients:
    """Build clients. endpoint_url (or AWS_ENDPOINT_URL, which boto3 reads itself) points at the emulator."""
    session = boto3.session.Session(region_name=resolve_region(region))
    config = _config()
    return Clients(
        s3=session.client("s3", endpoint_url=endpoint_url, config=config),
        sns=session.client("sns", endpoint_url=endpoint_url, config=config),
        sqs=session.client("sqs", endpoint_url=endpoint_url, config=config),
    )


def caller_userid(
    region: str | None = None, endpoint_url: str | None = None, policy: RetryPolicy = DEFAULT_POLICY
) -> str:
    """`sts:GetCallerIdentity`'s UserId: `<role id>:<instance id>` for an EC2 instance role session.

    GetCallerIdentity needs no IAM permission, so an instance can always learn what IAM's
    `${aws:userid}` is for it. https://docs.aws.amazon.com/STS/latest/APIReference/API_GetCallerIdentity.html
    """
    session = boto3.session.Session(region_name=resolve_region(region))
    sts = session.client("sts", endpoint_url=endpoint_url, config=_config())
    return str(policy.call(sts.get_caller_identity)["UserId"])


def autoscaling_client(region: str | None = None, endpoint_url: str | None = None) -> AutoScalingClient:
    """Built like the others; only agents with a launch hook (and `--asg` readers) need it."""
    session = boto3.session.Session(region_name=resolve_region(region))
    return session.client("autoscaling", endpoint_url=endpoint_url, config=_config())
