"""Names shared by CI and instances: channels, queue names, owners and the ARNs derived from the topic.

Each rule is written once here: the config parser, the agent's queue adapter, `deployer gc`,
deregistration and `deployer iam-policy` all build and check names with these functions.

Names are unambiguous, because IAM matches queues by name pattern: a stage, role, component
or instance id is words of letters and digits joined by single `-` or `_`, never `--`, so
the separator `--` in `<queue_prefix>--<stage>--<role>--<instance_id>` can only ever be a
separator. The pattern `deployer--prod--web--*` therefore matches the queues of role `web`
and never those of `web-admin` (`deployer--prod--web-admin--…`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deployer.protocol.errors import ConfigError, InvalidMessage
from deployer.protocol.limits import MAX_QUEUE_NAME_LENGTH

#: stage, role and component names end up in queue names and S3 keys: lowercase words joined by
#: single `-` or `_` (no leading, trailing or doubled separator), at most 32 characters.
NAME_PATTERN = re.compile(r"^(?=.{1,32}$)[a-z0-9]+(?:[-_][a-z0-9]+)*$")
#: EC2 instance ids (`i-` + 8 or 17 hex digits) and the ids tests and the demo give agents.
INSTANCE_ID_PATTERN = re.compile(r"^(?=.{1,40}$)[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*$")
#: The role id in an EC2 instance role session's `aws:userid` (`AROA…:i-…`).
#: https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_variables.html
ROLE_ID_PATTERN = re.compile(r"^AROA[A-Z0-9]{12,124}$")
#: What SQS allows in a queue name, minus the separator. https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_CreateQueue.html
QUEUE_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*$")
#: Between the parts of a queue name; no part may contain it.
QUEUE_SEPARATOR = "--"
#: S3 bucket names. https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
#: An ELBv2 target group ARN. https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/API_TargetGroup.html
TARGET_GROUP_ARN = re.compile(
    r"^arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:\d{12}:targetgroup/[A-Za-z0-9-]{1,32}/[0-9a-f]{1,16}$"
)
#: An Availability Zone name (us-east-1a) or a Local Zone / Wavelength name (us-west-2-lax-1a).
#: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/using-regions-availability-zones.html
ZONE_PATTERN = re.compile(r"^[a-z]{2}(-[a-z0-9]+){2,5}$")
#: In agent config and `iam-policy --target-group`: the target groups of the instance's Auto Scaling group.
AUTO_TARGET_GROUPS = "auto"
_TOPIC_ARN = re.compile(r"^arn:(aws[a-z-]*):sns:([a-z0-9-]+):(\d{12}):([A-Za-z0-9_-]{1,256})$")

DEFAULT_PREFIX = "deployer"
DEFAULT_QUEUE_PREFIX = "deployer"
#: The CloudWatch namespace `deployer status --metrics` puts the fleet's gauges into; the CI and
#: gc policies grant `cloudwatch:PutMetricData` in this namespace only (`cloudwatch:namespace`).
DEFAULT_METRICS_NAMESPACE = "Deployer"
#: CloudWatch namespaces: at most 255 of "alphanumeric characters (0-9A-Za-z), period (.), hyphen
#: (-), underscore (_), forward slash (/), hash (#), colon (:), and the space character", not
#: starting with `:` (PutMetricData's pattern `[^:].*`) nor with `AWS/`, which is AWS's own.
#: https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/cloudwatch_concepts.html#Namespace
#: https://docs.aws.amazon.com/AmazonCloudWatch/latest/APIReference/API_PutMetricData.html
METRICS_NAMESPACE_PATTERN = re.compile(r"^(?!AWS/)(?!:)(?=.*[^ ])[0-9A-Za-z._#:/ -]{1,255}$")
DLQ_SUFFIX = "--dlq"
#: The queue tag that names its owner (the creating principal's `aws:userid`); every SQS
#: permission of the instance role is conditioned on it (attribute-based access control).
#: https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-abac.html
OWNER_TAG = "deployer-owner"


@dataclass(frozen=True, order=True)
class Channel:
    """One line of deploys: every (stage, role, component) has its own strictly increasing seq."""

    stage: str
    role: str
    component: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.role}/{self.component}"

    @classmethod
    def parse(cls, text: str) -> Channel:
        """`stage/role/component` (what `str` writes) as a Channel; ValueError naming what is wrong."""
        parts = text.split("/")
        if len(parts) != 3:
            raise ValueError(f"{text!r} is not stage/role/component")
        for kind, value in zip(("stage", "role", "component"), parts, strict=True):
            if not NAME_PATTERN.match(value):
                raise ValueError(f"{kind} {value!r} of {text!r} is not a valid name")
        return cls(*parts)


def check_name(kind: str, value: str) -> str:
    """Validate a stage/role/component name outside a document (config, CLI flags)."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise InvalidMessage(
            f"{kind} {value!r} is not a valid name (lowercase letters, digits, '-' or '_', at most 32 characters)"
        )
    return value


def check_metrics_namespace(value: str) -> str:
    """Validate a CloudWatch namespace (`--metrics-namespace`, `iam-policy --metrics-namespace`)."""
    if not METRICS_NAMESPACE_PATTERN.match(value):
        raise ConfigError(
            f"metrics namespace {value!r} is not a CloudWatch namespace (1 to 255 of letters, digits, "
            "'.', '-', '_', '/', '#', ':' and spaces, not starting with ':' or 'AWS/')"
        )
    return value


def queue_name(queue_prefix: str, stage: str, role: str, instance_id: str) -> str:
    """`<queue_prefix>--<stage>--<role>--<instance_id>`: the instance's queue (its DLQ adds DLQ_SUFFIX)."""
    for kind, value, pattern in (
        ("queue_prefix", queue_prefix, QUEUE_PREFIX_PATTERN),
        ("stage", stage, NAME_PATTERN),
        ("role", role, NAME_PATTERN),
        ("instance id", instance_id, INSTANCE_ID_PATTERN),
    ):
        if not pattern.match(value):
            raise ConfigError(f"{kind} {value!r} cannot be part of a queue name (words joined by single '-' or '_')")
    name = QUEUE_SEPARATOR.join((queue_prefix, stage, role, instance_id))
    if len(name) + len(DLQ_SUFFIX) > MAX_QUEUE_NAME_LENGTH:
        raise ConfigError(
            f"queue name {name!r} (+{DLQ_SUFFIX!r}) is longer than SQS's {MAX_QUEUE_NAME_LENGTH} characters"
        )
    return name


def queue_name_pattern(queue_prefix: str, stage: str | None = None, role: str | None = None) -> str:
    """The IAM resource pattern for queue names, narrowed as far as stage and role are given.

    Always ends in `--*`: `deployer--prod--web--*` never matches role `web-admin`'s queues.
    """
    parts = [queue_prefix, *([stage] if stage else []), *([role] if stage and role else [])]
    return QUEUE_SEPARATOR.join(parts) + QUEUE_SEPARATOR + "*"


@dataclass(frozen=True, order=True)
class Owner:
    """Who an instance is to IAM: its instance id and, on EC2, the role id of its instance role.

    On EC2 an instance role session's `aws:userid` is `<role id>:<instance id>`; the status key
    and the queue owner tag carry that value, so IAM policy variables can confine each instance
    to its own objects and queues. Elsewhere (the emulator, a laptop) there is no role id and
    the owner is the instance id alone: nothing to confine it by.
    """

    instance_id: str
    role_id: str = ""

    @classmethod
    def from_userid(cls, userid: str, instance_id: str) -> Owner:
        """The owner for `instance_id` given `sts:GetCallerIdentity`'s UserId (no role id if it is not
        this instance's role session)."""
        role_id, _, session = userid.partition(":")
        if session == instance_id and ROLE_ID_PATTERN.match(role_id):
            return cls(instance_id, role_id)
        return cls(instance_id)

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        """`<role id>:<instance id>` or `<instance id>`; None if it is neither. Pure."""
        role_id, colon, instance_id = text.rpartition(":")
        if not INSTANCE_ID_PATTERN.match(instance_id) or (colon and not ROLE_ID_PATTERN.match(role_id)):
            return None
        return cls(instance_id, role_id)

    @property
    def userid(self) -> str:
        """The value IAM knows as `${aws:userid}` for this instance (the instance id when unconfined)."""
        return f"{self.role_id}:{self.instance_id}" if self.role_id else self.instance_id

    @property
    def confined(self) -> bool:
        return bool(self.role_id)


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
