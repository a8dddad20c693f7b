"""The IAM model of the product: every AWS call it makes → what AWS authorizes for it. Pure.

moto evaluates no IAM, so a policy AWS would refuse passes every emulator test. This table is
the one place that says, for each `(service, operation)` the product calls, which IAM requests a
real account evaluates: the action of the same name, the *dependent* actions the API reference
names (each cited in a `#:` constant below: they are in no IAM table, only in the operation's
text), the resource ARN, and the request context (`aws:RequestTag/*`, `aws:TagKeys`,
`aws:ResourceTag/*` of the target, `sns:Endpoint`, `sns:Protocol`, `s3:prefix`,
`s3:if-none-match`, …).

Two readers ask it the same questions:

- the test suite records every call the product makes (a botocore plugin, `tests/iam_record.py`)
  and has an independent evaluator decide each request under the policy `deployer iam-policy`
  generates for the caller's role, plus the resource policies the product sets itself;
- `deployer doctor` (`publisher/doctor.py`) asks IAM's `SimulatePrincipalPolicy` on a real
  account for the requests of each role's `expected_calls`.

A call the table does not know raises `UnknownOperation`: a new AWS call cannot reach a fleet
without its permissions being modelled first.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from deployer.protocol.errors import DeployerError
from deployer.protocol.events import EVENT_SOURCE, FLEET_RULE, EventType
from deployer.protocol.layout import (
    ARTIFACTS,
    CHANNELS,
    EVENTS,
    FLEET,
    FLEET_PAGE_NAME,
    HISTORY,
    MANIFEST_NAME,
    POINTER_NAME,
    RELEASES,
    REPORT_SUFFIX,
    ROLLOUTS,
    STATUS,
    TARGETS,
    TIMESTAMP_NAME,
    TRUST,
    Layout,
)
from deployer.protocol.names import (
    AUTO_TARGET_GROUPS,
    DEFAULT_METRICS_NAMESPACE,
    DLQ_SUFFIX,
    OWNER_TAG,
    TopicArn,
    queue_name,
)

#: SQS CreateQueue, `tags` member: "To be able to tag a queue on creation, you must have the
#: sqs:CreateQueue and sqs:TagQueue permissions."
#: https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_CreateQueue.html
TAG_ON_CREATE = "sqs:CreateQueue with tags also needs sqs:TagQueue (SQS API reference, CreateQueue `tags`)"
#: S3 GetObject/HeadObject: "If you have the s3:ListBucket permission on the bucket, Amazon S3
#: returns an HTTP status code 404 Not Found error. If you don't have the s3:ListBucket
#: permission, Amazon S3 returns an HTTP status code 403 Access Denied error."
#: https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html
ABSENCE_NEEDS_LIST = (
    "a missing key answers 404 only with s3:ListBucket on the bucket, else 403 (S3 API reference, GetObject)"
)
#: s3transfer aborts a multipart upload it cannot finish (`CreateMultipartUploadTask`'s cleanup):
#: AbortMultipartUpload is its own action, and without it the parts stay stored and billed.
#: https://docs.aws.amazon.com/AmazonS3/latest/API/API_AbortMultipartUpload.html
ABORT_ON_FAILURE = "a failed multipart upload is aborted by s3transfer: s3:AbortMultipartUpload (S3 API reference)"
#: Multipart uploads authorize as s3:PutObject on the object.
#: https://docs.aws.amazon.com/AmazonS3/latest/userguide/mpuoverview.html#mpuAndPermissions
MULTIPART_IS_PUT = "multipart upload steps authorize as s3:PutObject (S3 user guide, multipart upload permissions)"
#: SSM GetParameters with decryption of a SecureString under a customer managed key: "kms:Decrypt"
#: for the caller, which AWS makes through SSM (the kms:ViaService condition key says so).
#: https://docs.aws.amazon.com/systems-manager/latest/userguide/sysman-paramstore-access.html
DECRYPT_VIA_SERVICE = "a SecureString or secret under a customer managed key also needs kms:Decrypt, via the service (SSM and Secrets Manager docs)"
#: A key id standing for "the key that encrypts the secret", which the product never learns.
ANY_KEY = "00000000-0000-4000-8000-00000000c0de"
#: sts:GetCallerIdentity: "No permissions are required to perform this operation."
#: https://docs.aws.amazon.com/STS/latest/APIReference/API_GetCallerIdentity.html
NO_PERMISSION = frozenset({("sts", "GetCallerIdentity")})

#: A deploy id standing for any, in keys that name one (failure markers).
EXAMPLE_DEPLOY = "6b1e0000-0000-4000-8000-000000000000"
#: Auto Scaling group ARNs carry a UUID the product never learns; a policy names the group by
#: `autoScalingGroup:*:autoScalingGroupName/NAME`, so any UUID stands in for it.
GROUP_UUID = "00000000-0000-4000-8000-000000000000"


def default_key_policy(partition: str, account: str) -> dict[str, Any]:
    """The key policy KMS gives a key created without one: the account's IAM policies decide.

    KMS is the one service here whose resource policy is always evaluated: without a key policy
    statement that lets the account's IAM decide, no identity policy can grant kms:Sign. The
    product assumes release and trust keys keep this default.
    https://docs.aws.amazon.com/kms/latest/developerguide/key-policy-default.html
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{partition}:iam::{account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }


class UnknownOperation(DeployerError):
    """Raised when a call is not in the IAM model: its permissions were never worked out."""


class Role(enum.StrEnum):
    """Who makes a call: the principals `deployer iam-policy` writes identity policies for.

    `operator` is whoever runs `deployer init` and `deployer doctor` (an administrator); its
    calls are modelled but no generated policy grants them.
    """

    CI = "ci"
    INSTANCE = "instance"
    GC = "gc"
    TRUST = "trust"
    OPERATOR = "operator"


Context = Mapping[str, str | tuple[str, ...]]


@dataclass(frozen=True)
class Call:
    """One AWS call as the model sees it: the botocore service and operation names and parameters."""

    service: str
    operation: str
    params: Mapping[str, Any]
    region: str
    account: str
    partition: str = "aws"
    #: The target's tags, for calls on an existing resource (a queue's owner tag).
    resource_tags: Mapping[str, str] = field(default_factory=dict)
    #: S3 answered 404 (a pointer never published, a trust version not yet stored): on AWS that
    #: answer is a 403 unless the caller may also list the bucket.
    missing: bool = False


@dataclass(frozen=True)
class Need:
    """One IAM request AWS evaluates for a call: action on resource, with this request context."""

    action: str
    resource: str
    context: Context = field(default_factory=dict)
    #: Why a dependent action is needed (the API reference's words), empty for the call's own action.
    why: str = ""


# -- ARNs and context from a call's parameters --------------------------------------------------


def bucket_arn(call: Call) -> str:
    return f"arn:{call.partition}:s3:::{call.params['Bucket']}"


def object_arn(call: Call) -> str:
    return f"{bucket_arn(call)}/{call.params['Key']}"


def queue_arn(call: Call) -> str:
    """From `QueueUrl` (its last path segment is the name, on AWS and both emulators) or `QueueName`."""
    name = call.params.get("QueueName") or str(call.params["QueueUrl"]).rstrip("/").rsplit("/", 1)[-1]
    return f"arn:{call.partition}:sqs:{call.region}:{call.account}:{name}"


def topic_arn(call: Call) -> str:
    if "TopicArn" in call.params:
        return str(call.params["TopicArn"])
    if "SubscriptionArn" in call.params:  # arn:aws:sns:REGION:ACCOUNT:TOPIC:SUBSCRIPTION-ID
        return str(call.params["SubscriptionArn"]).rsplit(":", 1)[0]
    return f"arn:{call.partition}:sns:{call.region}:{call.account}:{call.params['Name']}"


def kms_key_arn(call: Call) -> str:
    key = str(call.params["KeyId"])
    return key if key.startswith("arn:") else f"arn:{call.partition}:kms:{call.region}:{call.account}:key/{key}"


def group_arn(call: Call) -> str:
    name = call.params["AutoScalingGroupName"]
    return f"arn:{call.partition}:autoscaling:{call.region}:{call.account}:autoScalingGroup:{GROUP_UUID}:autoScalingGroupName/{name}"


def target_group_arn(call: Call) -> str:
    return str(call.params["TargetGroupArn"])


def parameter_arn(call: Call, name: str) -> str:
    return f"arn:{call.partition}:ssm:{call.region}:{call.account}:parameter/{name.lstrip('/')}"


def secret_arn(call: Call) -> str:
    """The secret's ARN as given, or a name completed with the 6-character suffix AWS appends."""
    secret = str(call.params["SecretId"])
    return (
        secret
        if secret.startswith("arn:")
        else f"arn:{call.partition}:secretsmanager:{call.region}:{call.account}:secret:{secret}-AbCdEf"
    )


def _decrypt_via(call: Call, service: str) -> Need:
    key = f"arn:{call.partition}:kms:{call.region}:{call.account}:key/{ANY_KEY}"
    return Need("kms:Decrypt", key, {"kms:ViaService": f"{service}.{call.region}.amazonaws.com"}, DECRYPT_VIA_SERVICE)


def _get_parameters(call: Call) -> list[Need]:
    names = [str(n) for n in call.params.get("Names") or []]
    return [Need("ssm:GetParameters", parameter_arn(call, n)) for n in names] + [_decrypt_via(call, "ssm")]


def request_tags(tags: Mapping[str, str]) -> dict[str, str | tuple[str, ...]]:
    context: dict[str, str | tuple[str, ...]] = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    if tags:
        context["aws:TagKeys"] = tuple(sorted(tags))
    return context


def resource_tags(tags: Mapping[str, str]) -> dict[str, str | tuple[str, ...]]:
    return {f"aws:ResourceTag/{k}": v for k, v in tags.items()}


# -- the rules ----------------------------------------------------------------------------------

Rule = Callable[[Call], list[Need]]


def _s3_read(call: Call) -> list[Need]:
    needs = [Need("s3:GetObject", object_arn(call))]
    if call.missing:
        # The context of S3's implied list check is undocumented; the model gives it the requested
        # key as s3:prefix, as S3-compatible stores do to match AWS (docs/design.md, "IAM").
        needs.append(
            Need("s3:ListBucket", bucket_arn(call), {"s3:prefix": str(call.params["Key"])}, ABSENCE_NEEDS_LIST)
        )
    return needs


def _s3_write(call: Call) -> list[Need]:
    context: dict[str, str | tuple[str, ...]] = {}
    if "IfNoneMatch" in call.params:
        context["s3:if-none-match"] = str(call.params["IfNoneMatch"])
    if "IfMatch" in call.params:
        context["s3:if-match"] = str(call.params["IfMatch"])
    why = "" if call.operation == "PutObject" else MULTIPART_IS_PUT
    needs = [Need("s3:PutObject", object_arn(call), context, why)]
    if call.operation == "CreateMultipartUpload":
        needs.append(Need("s3:AbortMultipartUpload", object_arn(call), why=ABORT_ON_FAILURE))
    return needs


def _s3_list(call: Call) -> list[Need]:
    context = {"s3:prefix": str(call.params["Prefix"])} if "Prefix" in call.params else {}
    return [Need("s3:ListBucket", bucket_arn(call), context)]


def _own(action: str, arn: Callable[[Call], str]) -> Rule:
    """The call's own action on its resource, with the resource's tags (SQS ABAC)."""
    return lambda call: [Need(action, arn(call), resource_tags(call.resource_tags))]


def _create_queue(call: Call) -> list[Need]:
    tags: Mapping[str, str] = call.params.get("tags") or {}
    needs = [Need("sqs:CreateQueue", queue_arn(call), request_tags(tags))]
    if tags:
        context = {**request_tags(tags), **resource_tags(call.resource_tags)}
        needs.append(Need("sqs:TagQueue", queue_arn(call), context, TAG_ON_CREATE))
    return needs


def _tag_queue(call: Call) -> list[Need]:
    """Not called by the product (tags go in with CreateQueue); modelled for what an instance must not do."""
    context = {**request_tags(call.params.get("Tags") or {}), **resource_tags(call.resource_tags)}
    return [Need("sqs:TagQueue", queue_arn(call), context)]


def _subscribe(call: Call) -> list[Need]:
    context = {"sns:Protocol": str(call.params["Protocol"]), "sns:Endpoint": str(call.params["Endpoint"])}
    return [Need("sns:Subscribe", topic_arn(call), context)]


def _alarms(call: Call) -> list[Need]:
    names = call.params.get("AlarmNames") or ["*"]
    return [
        Need("cloudwatch:DescribeAlarms", f"arn:{call.partition}:cloudwatch:{call.region}:{call.account}:alarm:{name}")
        for name in names
    ]


def _put_metrics(call: Call) -> list[Need]:
    """PutMetricData names no resource; IAM scopes it by the request's namespace alone.
    https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/iam-cw-condition-keys-namespace.html
    """
    return [Need("cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": str(call.params["Namespace"])})]


def event_bus_arn(call: Call, bus: str) -> str:
    """A bus named in a PutEvents entry (name or ARN); `default` when none is named."""
    return (
        bus if bus.startswith("arn:") else f"arn:{call.partition}:events:{call.region}:{call.account}:event-bus/{bus}"
    )


def _put_events(call: Call) -> list[Need]:
    """One request per entry, on its bus, with the entry's source and detail-type as context.
    https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-use-conditions.html
    """
    return [
        Need(
            "events:PutEvents",
            event_bus_arn(call, str(entry.get("EventBusName") or "default")),
            {
                "events:source": (str(entry.get("Source", "")),),
                "events:detail-type": (str(entry.get("DetailType", "")),),
            },
        )
        for entry in call.params.get("Entries") or []
    ]


def rule_arn(call: Call) -> str:
    name = call.params.get("Name") or call.params["Rule"]
    return f"arn:{call.partition}:events:{call.region}:{call.account}:rule/{name}"


def _nothing(_call: Call) -> list[Need]:
    return []


def _anything(action: str) -> Rule:
    """Actions that take no resource-level permission: IAM evaluates them on `*`."""
    return lambda _call: [Need(action, "*")]


OPERATIONS: dict[tuple[str, str], Rule] = {
    ("s3", "GetObject"): _s3_read,
    ("s3", "HeadObject"): _s3_read,
    ("s3", "PutObject"): _s3_write,
    ("s3", "CreateMultipartUpload"): _s3_write,
    ("s3", "UploadPart"): _s3_write,
    ("s3", "CompleteMultipartUpload"): _s3_write,
    ("s3", "AbortMultipartUpload"): lambda call: [Need("s3:AbortMultipartUpload", object_arn(call))],
    ("s3", "DeleteObject"): lambda call: [Need("s3:DeleteObject", object_arn(call))],
    ("s3", "ListObjectsV2"): _s3_list,
    # HeadBucket authorizes as s3:ListBucket. https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadBucket.html
    ("s3", "HeadBucket"): lambda call: [Need("s3:ListBucket", bucket_arn(call))],
    ("s3", "CreateBucket"): lambda call: [Need("s3:CreateBucket", bucket_arn(call))],
    ("sqs", "CreateQueue"): _create_queue,
    ("sqs", "TagQueue"): _tag_queue,
    ("sqs", "GetQueueUrl"): _own("sqs:GetQueueUrl", queue_arn),
    ("sqs", "GetQueueAttributes"): _own("sqs:GetQueueAttributes", queue_arn),
    ("sqs", "SetQueueAttributes"): _own("sqs:SetQueueAttributes", queue_arn),
    ("sqs", "ReceiveMessage"): _own("sqs:ReceiveMessage", queue_arn),
    ("sqs", "DeleteMessage"): _own("sqs:DeleteMessage", queue_arn),
    ("sqs", "ChangeMessageVisibility"): _own("sqs:ChangeMessageVisibility", queue_arn),
    ("sqs", "SendMessage"): _own("sqs:SendMessage", queue_arn),
    ("sqs", "DeleteQueue"): _own("sqs:DeleteQueue", queue_arn),
    ("sns", "Subscribe"): _subscribe,
    # sns:Unsubscribe may be scoped to the subscription's topic, never to the subscription.
    ("sns", "Unsubscribe"): lambda call: [Need("sns:Unsubscribe", topic_arn(call))],
    ("sns", "Publish"): lambda call: [Need("sns:Publish", topic_arn(call))],
    ("sns", "GetTopicAttributes"): lambda call: [Need("sns:GetTopicAttributes", topic_arn(call))],
    ("sns", "SetTopicAttributes"): lambda call: [Need("sns:SetTopicAttributes", topic_arn(call))],
    ("sns", "ListSubscriptionsByTopic"): lambda call: [Need("sns:ListSubscriptionsByTopic", topic_arn(call))],
    ("sns", "CreateTopic"): lambda call: [Need("sns:CreateTopic", topic_arn(call))],
    ("sts", "GetCallerIdentity"): _nothing,
    ("kms", "Sign"): lambda call: [Need("kms:Sign", kms_key_arn(call))],
    ("kms", "GetPublicKey"): lambda call: [Need("kms:GetPublicKey", kms_key_arn(call))],
    ("autoscaling", "CompleteLifecycleAction"): lambda call: [
        Need("autoscaling:CompleteLifecycleAction", group_arn(call))
    ],
    ("autoscaling", "RecordLifecycleActionHeartbeat"): lambda call: [
        Need("autoscaling:RecordLifecycleActionHeartbeat", group_arn(call))
    ],
    ("autoscaling", "DescribeLifecycleHooks"): _anything("autoscaling:DescribeLifecycleHooks"),
    ("autoscaling", "SetInstanceProtection"): lambda call: [Need("autoscaling:SetInstanceProtection", group_arn(call))],
    ("autoscaling", "DescribeAutoScalingInstances"): _anything("autoscaling:DescribeAutoScalingInstances"),
    ("autoscaling", "DescribeAutoScalingGroups"): _anything("autoscaling:DescribeAutoScalingGroups"),
    # ELBv2 names a target group for (de)registering, but IAM has no condition key for the
    # target: whoever may deregister one instance of a group may deregister all of them.
    ("elbv2", "RegisterTargets"): lambda call: [Need("elasticloadbalancing:RegisterTargets", target_group_arn(call))],
    ("elbv2", "DeregisterTargets"): lambda call: [
        Need("elasticloadbalancing:DeregisterTargets", target_group_arn(call))
    ],
    ("elbv2", "DescribeTargetHealth"): _anything("elasticloadbalancing:DescribeTargetHealth"),
    ("elbv2", "DescribeTargetGroups"): _anything("elasticloadbalancing:DescribeTargetGroups"),
    ("elbv2", "DescribeTargetGroupAttributes"): _anything("elasticloadbalancing:DescribeTargetGroupAttributes"),
    ("cloudwatch", "DescribeAlarms"): _alarms,
    ("cloudwatch", "PutMetricData"): _put_metrics,
    ("ssm", "GetParameters"): _get_parameters,
    ("secretsmanager", "GetSecretValue"): lambda call: [
        Need("secretsmanager:GetSecretValue", secret_arn(call)),
        _decrypt_via(call, "secretsmanager"),
    ],
    ("events", "PutEvents"): _put_events,
    ("events", "PutRule"): lambda call: [Need("events:PutRule", rule_arn(call))],
    ("events", "PutTargets"): lambda call: [Need("events:PutTargets", rule_arn(call))],
    # The bucket's notification configuration authorizes as s3:Get/PutBucketNotification.
    # https://docs.aws.amazon.com/AmazonS3/latest/API/API_PutBucketNotificationConfiguration.html
    ("s3", "GetBucketNotificationConfiguration"): lambda call: [Need("s3:GetBucketNotification", bucket_arn(call))],
    ("s3", "PutBucketNotificationConfiguration"): lambda call: [Need("s3:PutBucketNotification", bucket_arn(call))],
    # A target in another account (`publish --targets`): its CI role, with the external id its trust asks for.
    ("sts", "AssumeRole"): lambda call: [
        Need(
            "sts:AssumeRole",
            str(call.params["RoleArn"]),
            {"sts:ExternalId": str(call.params["ExternalId"])} if "ExternalId" in call.params else {},
        )
    ],
    ("iam", "SimulatePrincipalPolicy"): lambda call: [
        Need("iam:SimulatePrincipalPolicy", str(call.params["PolicySourceArn"]))
    ],
}


def needs(call: Call) -> list[Need]:
    """The IAM requests AWS evaluates for `call`. Raises UnknownOperation for a call not modelled."""
    rule = OPERATIONS.get((call.service, call.operation))
    if rule is None:
        raise UnknownOperation(
            f"{call.service} {call.operation} is not in the IAM model (publisher/iam_model.py): "
            "add it with the actions the API reference says it needs"
        )
    return rule(call)


# -- what each role calls, for `deployer doctor` ----------------------------------------------


@dataclass(frozen=True)
class Place:
    """Where a role works: the names `iam-policy` takes, plus an example instance for the instance role."""

    bucket: str
    topic_arn: str
    prefix: str = "deployer"
    queue_prefix: str = "deployer"
    stage: str = "prod"
    role: str = "web"
    component: str = "app"
    instance_id: str = "i-0123456789abcdef0"
    #: The instance's `aws:userid` (`<role id>:<instance id>`); doctor fills in the role's id.
    userid: str = ""
    #: The instance's Auto Scaling group, when the config names it (else it is looked up).
    asg_name: str | None = None
    #: Completes the launch hook; leaves through the terminate hook.
    launch: bool = False
    terminate: bool = False
    protect: bool = False
    deregister: bool = False
    sign_keys: tuple[str, ...] = ()
    #: The secrets its manifests name: SSM parameter and Secrets Manager secret ARNs.
    secrets: tuple[str, ...] = ()
    #: The target groups an instance leaves and rejoins (`auto`: its Auto Scaling group's).
    target_groups: tuple[str, ...] = ()
    #: Where `status --metrics` (CI or gc) puts the fleet's gauges.
    metrics_namespace: str = DEFAULT_METRICS_NAMESPACE
    #: CI: the EventBridge bus `--event-bus` names, and the SNS topics `--notify` names.
    event_bus: str | None = None
    notify_topics: tuple[str, ...] = ()
    #: CI: the roles of targets in other accounts (`publish --targets`), and their external id.
    assume_roles: tuple[str, ...] = ()
    external_id: str | None = None


def expected_calls(role: Role, place: Place) -> list[Call]:
    """Every call `role` makes, with example parameters in `place`: what doctor simulates.

    The suite checks that each (service, operation) a role was seen making is listed here, so
    doctor's questions cover everything the product really does.
    """
    topic = TopicArn.parse(place.topic_arn)
    layout = Layout(place.prefix)
    channel = [place.stage, place.role, place.component]
    release = [RELEASES, place.component, "20261207T0000Z-0000000"]
    blob = [ARTIFACTS, "sha256", "0" * 64]

    def call(service: str, operation: str, owned: Mapping[str, str] | None = None, **params: Any) -> Call:
        """`owned`: the target's tags (a queue's owner tag)."""
        return Call(service, operation, params, topic.region, topic.account, topic.partition, dict(owned or {}))

    def s3(operation: str, *parts: str, missing: bool = False, **params: Any) -> Call:
        found = call("s3", operation, Bucket=place.bucket, Key=layout.key(*parts), **params)
        return replace(found, missing=missing)

    if role is Role.INSTANCE:
        return _instance_calls(place, topic, call, s3, channel, release, blob)
    if role is Role.CI:
        calls = [
            call("s3", "HeadBucket", Bucket=place.bucket),
            call("sns", "GetTopicAttributes", TopicArn=place.topic_arn),
            s3("HeadObject", *blob, missing=True),
            s3("PutObject", *blob),
            s3("CreateMultipartUpload", *blob),
            s3("UploadPart", *blob),
            s3("CompleteMultipartUpload", *blob),
            s3("AbortMultipartUpload", *blob),
            s3("GetObject", *release, MANIFEST_NAME, missing=True),
            s3("PutObject", *release, MANIFEST_NAME, IfNoneMatch="*"),
            s3("GetObject", *release, "condemned.json", missing=True),
            s3("DeleteObject", *release, "condemned.json"),
            s3("GetObject", CHANNELS, *channel, POINTER_NAME, missing=True),
            s3("PutObject", CHANNELS, *channel, POINTER_NAME, IfMatch='"etag"'),
            s3("PutObject", CHANNELS, *channel, TIMESTAMP_NAME),
            s3("GetObject", CHANNELS, *channel, HISTORY, "8.json", missing=True),
            s3("PutObject", CHANNELS, *channel, HISTORY, "8.json", IfNoneMatch="*"),
            s3("GetObject", CHANNELS, *channel, ROLLOUTS, "deploy.json", missing=True),
            s3("PutObject", CHANNELS, *channel, ROLLOUTS, "deploy.json", IfNoneMatch="*"),
            call("s3", "ListObjectsV2", Bucket=place.bucket, Prefix=layout.key(CHANNELS, *channel, HISTORY) + "/"),
            call("s3", "ListObjectsV2", Bucket=place.bucket, Prefix=layout.key(STATUS, place.stage) + "/"),
            s3("GetObject", STATUS, place.stage, place.role, f"{place.instance_id}{REPORT_SUFFIX}"),
            s3("PutObject", FLEET, FLEET_PAGE_NAME),
            call("cloudwatch", "PutMetricData", Namespace=place.metrics_namespace),
            call("sns", "Publish", TopicArn=place.topic_arn),
            call("autoscaling", "DescribeAutoScalingGroups", AutoScalingGroupNames=["web"]),
            call("cloudwatch", "DescribeAlarms", AlarmNames=["deploy-errors"]),
            call("elbv2", "DescribeTargetHealth", TargetGroupArn="arn:aws:elasticloadbalancing:::targetgroup/web/0"),
            *(call("sns", "Publish", TopicArn=arn) for arn in place.notify_topics),
        ]
        calls += [
            s3("GetObject", TARGETS, *channel, "record.json", missing=True),
            s3("PutObject", TARGETS, *channel, "record.json", IfNoneMatch="*"),
            call("s3", "ListObjectsV2", Bucket=place.bucket, Prefix=layout.key(TARGETS, *channel) + "/"),
        ]
        for role_arn in place.assume_roles:
            assumed = call("sts", "AssumeRole", RoleArn=role_arn, RoleSessionName="deployer")
            if place.external_id:
                assumed = replace(assumed, params={**assumed.params, "ExternalId": place.external_id})
            calls.append(assumed)
        if place.event_bus:
            entry = {
                "Source": EVENT_SOURCE,
                "DetailType": EventType.WAVE_STARTED.value,
                "EventBusName": place.event_bus,
            }
            calls.append(call("events", "PutEvents", Entries=[entry]))
        return calls + _signing_calls(place, call)
    if role is Role.GC:
        queue = queue_name(place.queue_prefix, place.stage, place.role, place.instance_id)
        return [
            call("s3", "ListObjectsV2", Bucket=place.bucket, Prefix=layout.key(STATUS) + "/"),
            s3("GetObject", STATUS, place.stage, place.role, f"{place.instance_id}{REPORT_SUFFIX}"),
            s3("DeleteObject", STATUS, place.stage, place.role, f"{place.instance_id}{REPORT_SUFFIX}"),
            call("sns", "ListSubscriptionsByTopic", TopicArn=place.topic_arn),
            call("sns", "Unsubscribe", SubscriptionArn=f"{place.topic_arn}:{GROUP_UUID}"),
            call("sqs", "GetQueueUrl", QueueName=queue),
            call("sqs", "DeleteQueue", QueueUrl=f"https://sqs/{topic.account}/{queue}"),
            call("sqs", "GetQueueUrl", QueueName=queue + DLQ_SUFFIX),
            call("sqs", "DeleteQueue", QueueUrl=f"https://sqs/{topic.account}/{queue}{DLQ_SUFFIX}"),
            call("s3", "ListObjectsV2", Bucket=place.bucket, Prefix=layout.key(RELEASES) + "/"),
            call("s3", "ListObjectsV2", Bucket=place.bucket, Prefix=layout.key(CHANNELS) + "/"),
            s3("GetObject", CHANNELS, *channel, POINTER_NAME),
            s3("GetObject", *release, MANIFEST_NAME),
            s3("HeadObject", *release, MANIFEST_NAME),
            s3("GetObject", *release, "condemned.json", missing=True),
            s3("PutObject", *release, "condemned.json", IfNoneMatch="*"),
            s3("DeleteObject", *release, MANIFEST_NAME),
            s3("DeleteObject", *release, "condemned.json"),
            s3("DeleteObject", *blob),
            s3("PutObject", FLEET, FLEET_PAGE_NAME),
            call("cloudwatch", "PutMetricData", Namespace=place.metrics_namespace),
        ]
    if role is Role.TRUST:
        return [
            s3("GetObject", TRUST, "2.json", missing=True),
            s3("PutObject", TRUST, "2.json", IfNoneMatch="*"),
            *_signing_calls(place, call),
        ]
    return [
        call("s3", "HeadBucket", Bucket=place.bucket),
        call("s3", "CreateBucket", Bucket=place.bucket),
        call("sns", "CreateTopic", Name=topic.name),
        call("sns", "SetTopicAttributes", TopicArn=place.topic_arn),
        call("s3", "GetBucketNotificationConfiguration", Bucket=place.bucket),
        call("s3", "PutBucketNotificationConfiguration", Bucket=place.bucket),
        call("events", "PutRule", Name=FLEET_RULE),
        call("events", "PutTargets", Rule=FLEET_RULE),
        call("sts", "GetCallerIdentity"),
        call("iam", "SimulatePrincipalPolicy", PolicySourceArn=f"arn:{topic.partition}:iam::{topic.account}:role/x"),
    ]


def _signing_calls(place: Place, call: Callable[..., Call]) -> list[Call]:
    keys = [spec.partition(":")[2] for spec in place.sign_keys if spec.startswith("kms:")]
    return [c for key in keys for c in (call("kms", "GetPublicKey", KeyId=key), call("kms", "Sign", KeyId=key))]


def _instance_calls(
    place: Place,
    topic: TopicArn,
    call: Callable[..., Call],
    s3: Callable[..., Call],
    channel: list[str],
    release: list[str],
    blob: list[str],
) -> list[Call]:
    name = queue_name(place.queue_prefix, place.stage, place.role, place.instance_id)
    owner = {OWNER_TAG: place.userid}
    calls: list[Call] = [call("sts", "GetCallerIdentity")]
    for queue in (name + DLQ_SUFFIX, name):
        url = f"https://sqs.{topic.region}.amazonaws.com/{topic.account}/{queue}"  # the shape only
        calls += [
            call("sqs", "CreateQueue", QueueName=queue, tags=owner),
            call("sqs", "GetQueueAttributes", owner, QueueUrl=url),
            call("sqs", "SetQueueAttributes", owner, QueueUrl=url),
        ]
    url = f"https://sqs.{topic.region}.amazonaws.com/{topic.account}/{name}"
    calls += [
        call("sns", "Subscribe", TopicArn=place.topic_arn, Protocol="sqs", Endpoint=topic.queue_arn(name)),
        call("sqs", "ReceiveMessage", owner, QueueUrl=url),
        call("sqs", "DeleteMessage", owner, QueueUrl=url),
        call("sqs", "ChangeMessageVisibility", owner, QueueUrl=url),
        call("sqs", "SendMessage", owner, QueueUrl=url + DLQ_SUFFIX),
        s3("GetObject", CHANNELS, *channel, POINTER_NAME, missing=True),
        s3("GetObject", CHANNELS, *channel, TIMESTAMP_NAME, missing=True),
        s3("GetObject", CHANNELS, *channel, HISTORY, "8.json"),
        s3("GetObject", CHANNELS, *channel, ROLLOUTS, "deploy.json", missing=True),
        s3("GetObject", *release, MANIFEST_NAME),
        s3("GetObject", *blob),
        s3("GetObject", TRUST, "2.json", missing=True),
        call(
            "s3",
            "ListObjectsV2",
            Bucket=place.bucket,
            Prefix=Layout(place.prefix).event_prefix(
                EventType.INSTANCE_DEPLOY_FAILED.slug, place.stage, place.role, EXAMPLE_DEPLOY
            ),
        ),
        s3("PutObject", STATUS, place.stage, place.role, f"{place.userid}{REPORT_SUFFIX}"),
        s3(
            "PutObject",
            EVENTS,
            EventType.INSTANCE_DEPLOY_FAILED.slug,
            place.stage,
            place.role,
            EXAMPLE_DEPLOY,
            f"{place.userid}{REPORT_SUFFIX}",
            IfNoneMatch="*",
        ),
    ]
    if place.deregister or place.terminate:
        calls += [
            call("sns", "Unsubscribe", SubscriptionArn=f"{place.topic_arn}:{GROUP_UUID}"),
            call("sqs", "GetQueueUrl", owner, QueueName=name),
            call("sqs", "DeleteQueue", owner, QueueUrl=url),
        ]
    if place.deregister:  # leaving through the terminate hook keeps its last report
        calls.append(s3("DeleteObject", STATUS, place.stage, place.role, f"{place.userid}{REPORT_SUFFIX}"))
    calls += _traffic_calls(place, topic, call)
    calls += _secret_calls(place, call)
    if place.launch or place.terminate or place.protect:
        # Without the group's name the agent looks it up first.
        group = place.asg_name or "any-group"
        if place.asg_name is None:
            calls.append(call("autoscaling", "DescribeAutoScalingInstances", InstanceIds=[place.instance_id]))
        hooked = {"AutoScalingGroupName": group, "InstanceId": place.instance_id}
        if place.launch:
            calls.append(call("autoscaling", "CompleteLifecycleAction", LifecycleHookName="launch", **hooked))
        if place.protect:
            calls.append(
                call(
                    "autoscaling", "SetInstanceProtection", InstanceIds=[place.instance_id], AutoScalingGroupName=group
                )
            )
        if place.terminate:
            calls += [
                call("autoscaling", "DescribeLifecycleHooks", AutoScalingGroupName=group),
                call("autoscaling", "RecordLifecycleActionHeartbeat", LifecycleHookName="leave", **hooked),
                call("autoscaling", "CompleteLifecycleAction", LifecycleHookName="leave", **hooked),
            ]
    return calls


def _secret_calls(place: Place, call: Callable[..., Call]) -> list[Call]:
    """Reading the secrets a manifest names, at apply time (deployer.aws.secrets)."""
    calls = []
    for arn in place.secrets:
        if ":ssm:" in arn:
            calls.append(
                call("ssm", "GetParameters", Names=["/" + arn.split(":parameter/", 1)[1]], WithDecryption=True)
            )
        else:
            calls.append(call("secretsmanager", "GetSecretValue", SecretId=arn))
    return calls


def _traffic_calls(place: Place, topic: TopicArn, call: Callable[..., Call]) -> list[Call]:
    """Leaving and rejoining the load balancer around a release switch (deployer.agent.traffic)."""
    if not place.target_groups:
        return []
    calls: list[Call] = []
    groups = [g for g in place.target_groups if g != AUTO_TARGET_GROUPS]
    if AUTO_TARGET_GROUPS in place.target_groups:
        if place.asg_name is None:
            calls.append(call("autoscaling", "DescribeAutoScalingInstances", InstanceIds=[place.instance_id]))
        calls.append(call("autoscaling", "DescribeAutoScalingGroups", AutoScalingGroupNames=["web"]))
        groups.append(f"arn:{topic.partition}:elasticloadbalancing:{topic.region}:{topic.account}:targetgroup/web/0")
    for group in groups:
        target = [{"Id": place.instance_id, "Port": 80}]
        calls += [
            call("elbv2", "DescribeTargetHealth", TargetGroupArn=group),
            call("elbv2", "DescribeTargetGroups", TargetGroupArns=[group]),
            call("elbv2", "DescribeTargetGroupAttributes", TargetGroupArn=group),
            call("elbv2", "DeregisterTargets", TargetGroupArn=group.replace("*", "web"), Targets=target),
            call("elbv2", "RegisterTargets", TargetGroupArn=group.replace("*", "web"), Targets=target),
        ]
    return calls


def operations(calls: Iterable[Call]) -> set[tuple[str, str]]:
    return {(c.service, c.operation) for c in calls}
