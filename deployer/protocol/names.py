"""Names shared by CI and instances: channels, queue names and the ARNs derived from the topic.

Each rule is written once here: the config parser, the agent's queue adapter, `deployer gc`,
deregistration and `deployer iam-policy` all build and check names with these functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deployer.protocol.errors import ConfigError, InvalidMessage
from deployer.protocol.limits import MAX_QUEUE_NAME_LENGTH

#: stage, role and component names end up in queue names and S3 keys.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
#: EC2 instance ids (`i-` + 8 or 17 hex digits) and the ids tests and the demo give agents.
INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
#: What SQS allows in a queue name. https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_CreateQueue.html
QUEUE_NAME_PART = re.compile(r"^[A-Za-z0-9_-]+$")
#: S3 bucket names. https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TOPIC_ARN = re.compile(r"^arn:(aws[a-z-]*):sns:([a-z0-9-]+):(\d{12}):([A-Za-z0-9_-]{1,256})$")

DEFAULT_PREFIX = "deployer"
DEFAULT_QUEUE_PREFIX = "deployer"
DLQ_SUFFIX = "-dlq"


@dataclass(frozen=True, order=True)
class Channel:
    """One line of deploys: every (stage, role, component) has its own strictly increasing seq."""

    stage: str
    role: str
    component: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.role}/{self.component}"


def check_name(kind: str, value: str) -> str:
    """Validate a stage/role/component name outside a document (config, CLI flags)."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise InvalidMessage(
            f"{kind} {value!r} is not a valid name (lowercase letters, digits, '-' or '_', at most 32 characters)"
        )
    return value


def queue_name(queue_prefix: str, stage: str, role: str, instance_id: str) -> str:
    """`<queue_prefix>-<stage>-<role>-<instance_id>`: the instance's queue (its DLQ adds DLQ_SUFFIX)."""
    name = f"{queue_prefix}-{stage}-{role}-{instance_id}"
    if not QUEUE_NAME_PART.match(name) or len(name) + len(DLQ_SUFFIX) > MAX_QUEUE_NAME_LENGTH:
        raise ConfigError(
            f"queue name {name!r} (+{DLQ_SUFFIX!r}) must be at most {MAX_QUEUE_NAME_LENGTH} letters, digits, '-' or '_'"
        )
    return name


def queue_name_pattern(queue_prefix: str, stage: str | None = None, role: str | None = None) -> str:
    """The IAM resource pattern for queue names, narrowed as far as stage and role are given."""
    parts = [queue_prefix, *([stage] if stage else []), *([role] if stage and role else [])]
    return "-".join(parts) + "-*"


@dataclass(frozen=True)
class TopicArn:
    """A parsed SNS topic ARN. Queues live beside the topic: same partition, region and account."""

    partition: str
    region: str
    account: str
    name: str

    @classmethod
    def parse(cls, arn: str) -> TopicArn:
        match = _TOPIC_ARN.match(arn) if isinstance(arn, str) else None
        if match is None:
            raise ConfigError(f"topic ARN {arn!r} is not arn:aws:sns:REGION:ACCOUNT:NAME")
        return cls(*match.groups())

    def __str__(self) -> str:
        return f"arn:{self.partition}:sns:{self.region}:{self.account}:{self.name}"

    def queue_arn(self, name: str) -> str:
        """The ARN of a queue of this account and region (derived, so a deleted queue is still named)."""
        return f"arn:{self.partition}:sqs:{self.region}:{self.account}:{name}"

    def bucket_arn(self, bucket: str) -> str:
        return f"arn:{self.partition}:s3:::{bucket}"
