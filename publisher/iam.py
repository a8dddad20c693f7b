"""`deployer iam-policy`: the policies that draw the trust boundary. Pure: documents from names.

Who may do what (docs/design.md, "The trust boundary"):

- `ci` publishes: writes releases and the channel pointers of its stage (`--stage`), publishes
  to the topic, reads status. It is the only principal that can move a fleet.
- `instance` is the agent: it reads releases and its channels, and touches only what is its
  own. Its queues carry a `deployer-owner` tag with its `aws:userid` (`<role id>:<instance id>`
  on EC2) and every SQS permission is conditioned on that tag (SQS attribute-based access
  control); it can create a queue only by tagging it so; it sends only to its own DLQ; its
  status report is the object named by its own `${aws:userid}`; it subscribes only SQS
  endpoints of the deployer's queue-name pattern, with the attributes in the Subscribe call
  (there is no `SetSubscriptionAttributes`, so no subscription can be re-pointed or re-filtered).
- `gc` removes registrations of instances that stopped heartbeating.
- `trust` stores signed trust versions (`deployer trust sign-update`), signing with trust keys.
- `bucket` is a bucket policy that makes conditional writes the rule, not a client habit:
  releases and history only with `If-None-Match: *`, pointers only with `If-Match` or
  `If-None-Match`.
- `topic` is the topic policy `deployer init` sets: only the given CI principals may publish,
  and only SQS endpoints of the queue-name pattern may subscribe.

Region and account come from the topic ARN: queues live next to the topic they subscribe to.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

from deployer.protocol.errors import ConfigError
from deployer.protocol.events import EVENT_SOURCE, EventType
from deployer.protocol.layout import (
    ARTIFACTS,
    CHANNELS,
    CONDEMNED_NAME,
    EVENTS,
    FLEET,
    FLEET_PAGE_NAME,
    HISTORY,
    MANIFEST_NAME,
    POINTER_NAME,
    RELEASES,
    REPORT_SUFFIX,
    STATUS,
    TARGETS,
    TRUST,
    Layout,
)
from deployer.protocol.names import (
    AUTO_TARGET_GROUPS,
    DEFAULT_METRICS_NAMESPACE,
    DEFAULT_PREFIX,
    DEFAULT_QUEUE_PREFIX,
    DLQ_SUFFIX,
    OWNER_TAG,
    TopicArn,
    check_metrics_namespace,
    queue_name_pattern,
)

POLICY_VERSION = "2012-10-17"
#: IAM's policy variable for the caller: `<role id>:<instance id>` for an EC2 instance-role session.
#: https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_variables.html
USERID = "${aws:userid}"
#: The principals `--publisher-arn` takes: IAM roles (a CI job's OIDC role) and users.
PRINCIPAL_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:(role|user)/[\w+=,.@/-]+$")
#: `--secrets`: an SSM parameter or a Secrets Manager secret ARN (or a pattern of them).
SECRET_PATTERN = re.compile(
    r"^arn:aws[a-z-]*:(ssm:[a-z0-9-]+:\d{12}:parameter/|secretsmanager:[a-z0-9-]+:\d{12}:secret:)\S+$"
)
#: `--event-bus`: a bus name, or an event bus ARN.
EVENT_BUS = re.compile(
    r"^([A-Za-z0-9._-]{1,256}|arn:aws[a-z-]*:events:[a-z0-9-]+:\d{12}:event-bus/[A-Za-z0-9._/-]{1,256})$"
)
#: `--target-group`: a target group ARN, or a pattern of them (`*` for a name or id part).
TARGET_GROUP_PATTERN = re.compile(
    r"^arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:\d{12}:targetgroup/[A-Za-z0-9*-]+(/[0-9a-f*]+)?$"
)


class Audience(enum.StrEnum):
    CI = "ci"  # publish, publish --wait, rollback, history, status
    INSTANCE = "instance"  # the agent
    GC = "gc"  # deployer gc on a schedule
    TRUST = "trust"  # deployer trust sign-update, by a holder of a trust key
    BUCKET = "bucket"  # a bucket policy: conditional writes enforced
    TOPIC = "topic"  # the topic policy `deployer init` sets
    TARGET_TRUST = "target-trust"  # the trust policy of a target account's CI role (`publish --targets`)


@dataclass(frozen=True)
class Scope:
    bucket: str
    topic_arn: str
    prefix: str = DEFAULT_PREFIX
    queue_prefix: str = DEFAULT_QUEUE_PREFIX
    stage: str | None = None
    role: str | None = None
    #: Instance: allow completing launch hooks of this group ("*" if `lifecycle` without a name).
    asg_name: str | None = None
    lifecycle: bool = False
    deregister: bool = False
    #: Instance: allow leaving through the terminate hook (queues removed, action completed, heartbeats).
    terminate: bool = False
    #: Instance: allow protecting itself from scale-in while a deploy runs.
    protect: bool = False
    #: Instance: the secrets its manifests name (SSM parameter or Secrets Manager secret ARNs, `*` allowed).
    secrets: tuple[str, ...] = ()
    #: Instance: the target groups it leaves and rejoins around a release switch (ARNs or
    #: patterns), or `auto`: any group of its Auto Scaling group, found with Describe calls.
    target_groups: tuple[str, ...] = ()
    #: Topic: the CI principals allowed to publish (none: any principal the account's IAM allows).
    publishers: tuple[str, ...] = ()
    #: CI: the `--sign-key` values; each `kms:` key gets kms:Sign (file keys need no permission).
    sign_keys: tuple[str, ...] = ()
    #: CI and gc: the CloudWatch namespace `status --metrics` puts the fleet's gauges into.
    metrics_namespace: str = DEFAULT_METRICS_NAMESPACE
    #: CI: the EventBridge bus `--event-bus` sends deploy events to (a name or an ARN).
    event_bus: str | None = None
    #: CI: the SNS topics `--notify` tells (webhooks need no permission).
    notify_topics: tuple[str, ...] = ()
    #: CI: the roles it assumes in the other accounts of `publish --targets`; target-trust: the
    #: external id that role's trust policy asks for.
    assume_roles: tuple[str, ...] = ()
    external_id: str | None = None

    def __post_init__(self) -> None:
        check_metrics_namespace(self.metrics_namespace)
        for arn in self.publishers:
            if not PRINCIPAL_ARN.match(arn):
                raise ConfigError(
                    f"publisher ARN {arn!r} is not an IAM role or user ARN (arn:aws:iam::ACCOUNT:role/NAME)"
                )
        for secret in self.secrets:
            if not SECRET_PATTERN.match(secret):
                raise ConfigError(
                    f"--secrets {secret!r} is not an SSM parameter or Secrets Manager secret ARN "
                    "(arn:aws:ssm:REGION:ACCOUNT:parameter/NAME, arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-*)"
                )
        for arn in self.notify_topics:
            TopicArn.parse(arn)  # raises, naming the bad ARN
        if self.event_bus is not None and not EVENT_BUS.match(self.event_bus):
            raise ConfigError(f"--event-bus {self.event_bus!r} is not an event bus name or ARN")
        for group in self.target_groups:
            if group != AUTO_TARGET_GROUPS and not TARGET_GROUP_PATTERN.match(group):
                raise ConfigError(
                    f"--target-group {group!r} is not a target group ARN "
                    "(arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID, * allowed) or 'auto'"
                )

    @property
    def topic(self) -> TopicArn:
        return TopicArn.parse(self.topic_arn)

    def objects(self, *parts: str) -> str:
        """Object ARN pattern for `<prefix>/<parts…>`, keys built by the same Layout the code writes with."""
        return f"{self.bucket_arn}/{Layout(self.prefix).key(*parts)}"

    def key_pattern(self, *parts: str) -> str:
        """`<prefix>/<parts…>` as an `s3:prefix` condition value."""
        return Layout(self.prefix).key(*parts)

    @property
    def bucket_arn(self) -> str:
        return self.topic.bucket_arn(self.bucket)

    @property
    def fleet(self) -> list[str]:
        """`<stage>/<role>` path parts, `*` where not narrowed."""
        return [self.stage or "*", (self.role or "*") if self.stage else "*"]

    @property
    def queues(self) -> str:
        """`<queue_prefix>--<stage>--<role>--*`, narrowed as far as stage and role are given."""
        return self.topic.queue_arn(queue_name_pattern(self.queue_prefix, self.stage, self.role))

    @property
    def condemned_marks(self) -> list[str]:
        """`gc releases`' marks on releases and on content-addressed artifacts."""
        return [self.objects(RELEASES, "*", CONDEMNED_NAME), self.objects(ARTIFACTS, f"*.{CONDEMNED_NAME}")]

    @property
    def launch(self) -> bool:
        """Completes the launch hook: `--lifecycle`, or `--asg` alone (what it has always meant)."""
        return self.lifecycle or bool(self.asg_name and not (self.terminate or self.protect))

    @property
    def target_group_arns(self) -> list[str]:
        """The groups RegisterTargets/DeregisterTargets may name: as given, or every group for `auto`."""
        topic = self.topic
        every = f"arn:{topic.partition}:elasticloadbalancing:{topic.region}:{topic.account}:targetgroup/*"
        return [every if g == AUTO_TARGET_GROUPS else g for g in self.target_groups]

    @property
    def alarms(self) -> str:
        topic = self.topic
        return f"arn:{topic.partition}:cloudwatch:{topic.region}:{topic.account}:alarm:*"

    @property
    def fleet_metrics(self) -> dict[str, Any]:
        """PutMetricData takes no resource ARN: its one scope is the namespace condition key.
        https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/iam-cw-condition-keys-namespace.html
        """
        return _allow(
            "PutFleetMetrics",
            ["cloudwatch:PutMetricData"],
            "*",
            {"StringEquals": {"cloudwatch:namespace": self.metrics_namespace}},
        )

    @property
    def event_bus_arn(self) -> str:
        bus, topic = self.event_bus or "default", self.topic
        return (
            bus
            if bus.startswith("arn:")
            else f"arn:{topic.partition}:events:{topic.region}:{topic.account}:event-bus/{bus}"
        )

    @property
    def dead_letter_queues(self) -> str:
        return self.queues + DLQ_SUFFIX

    def kms_key_arns(self) -> list[str]:
        """The `kms:` sign keys as key ARNs (an id is completed from the topic's region and account).

        An alias is refused: kms:Sign is granted on keys, and an alias can be re-pointed at
        another key by whoever may update aliases.
        """
        topic, arns = self.topic, []
        for spec in self.sign_keys:
            kind, _, key = spec.partition(":")
            if kind != "kms":
                continue
            if key.startswith("alias/") or ":alias/" in key:
                raise ConfigError(
                    f"--sign-key {spec}: give the key's id or ARN, not an alias (kms:Sign is granted on keys)"
                )
            arns.append(
                key if key.startswith("arn:") else f"arn:{topic.partition}:kms:{topic.region}:{topic.account}:key/{key}"
            )
        return arns


def _allow(
    sid: str, actions: list[str], resources: str | list[str], condition: dict[str, Any] | None = None
) -> dict[str, Any]:
    statement: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": sorted(actions), "Resource": resources}
    if condition:
        statement["Condition"] = condition
    return statement


def _deny(sid: str, actions: list[str], resource: str, condition: dict[str, Any]) -> dict[str, Any]:
    """A resource-policy Deny for everyone: within one account only an explicit Deny restricts."""
    return {
        "Sid": sid,
        "Effect": "Deny",
        "Principal": "*",
        "Action": sorted(actions),
        "Resource": resource,
        "Condition": condition,
    }


def policy_for(audience: Audience, scope: Scope) -> dict[str, Any]:
    builders = {
        Audience.CI: _ci,
        Audience.INSTANCE: _instance,
        Audience.GC: _gc,
        Audience.TRUST: _trust,
        Audience.BUCKET: _bucket,
        Audience.TOPIC: _topic,
        Audience.TARGET_TRUST: _target_trust,
    }
    return {"Version": POLICY_VERSION, "Statement": builders[audience](scope)}


def _ci(scope: Scope) -> list[dict[str, Any]]:
    stage = scope.stage or "*"
    return [
        # Releases are per component and immutable; a release built once may be promoted to every stage.
        # AbortMultipartUpload: s3transfer aborts an upload it cannot finish; without it the parts
        # stay stored, and billed, until a lifecycle rule removes them.
        _allow(
            "PutReleasesAndArtifacts",
            ["s3:AbortMultipartUpload", "s3:GetObject", "s3:PutObject"],
            [scope.objects(RELEASES, "*"), scope.objects(ARTIFACTS, "*")],
        ),
        # A publish takes a release back from `gc releases` by deleting gc's mark (publisher/retention.py).
        _allow("TakeReleasesBackFromGc", ["s3:DeleteObject"], scope.condemned_marks),
        _allow("MoveOwnStagesChannels", ["s3:GetObject", "s3:PutObject"], scope.objects(CHANNELS, stage, "*")),
        _allow("ReadStatus", ["s3:GetObject"], scope.objects(STATUS, stage, "*")),
        # HeadBucket and ListObjectsV2 (history, status) authorize as s3:ListBucket on the bucket.
        _allow("ListBucket", ["s3:ListBucket"], scope.bucket_arn),
        # `deployer status --html --upload` from CI as well as from the housekeeping job.
        _allow("PutFleetPage", ["s3:PutObject"], scope.objects(FLEET, FLEET_PAGE_NAME)),
        # `deployer status --metrics`: the fleet's gauges, into its own namespace only.
        scope.fleet_metrics,
        _allow("PublishDeploys", ["sns:GetTopicAttributes", "sns:Publish"], scope.topic_arn),
        # `--wait --asg`: the group's InService instances. Describe calls take no resource ARN.
        _allow("ReadGroupsForWait", ["autoscaling:DescribeAutoScalingGroups"], "*"),
        # `--waves --alarm`: whether the rollout's alarms are in ALARM.
        _allow("ReadAlarmsForRollouts", ["cloudwatch:DescribeAlarms"], scope.alarms),
        # `--waves --target-group`: how many targets are healthy before a wave starts.
        _allow("ReadTargetHealthForWaves", ["elasticloadbalancing:DescribeTargetHealth"], "*"),
        # `publish --targets`: the record of a publish across targets, in the first target's bucket.
        _allow(
            "RecordPublishesAcrossTargets",
            ["s3:GetObject", "s3:PutObject"],
            scope.objects(TARGETS, stage, "*"),
        ),
        # Options only add statements, each written the same way, after these: a policy for several
        # options is the union of theirs by Sid (how the Terraform module composes them).
        *_signing(scope),
        *_news(scope),
        *_assume(scope),
    ]


def _assume(scope: Scope) -> list[dict[str, Any]]:
    """`publish --targets` with targets in other accounts: their CI roles, and nothing else."""
    return [_allow("AssumeTargetRoles", ["sts:AssumeRole"], sorted(scope.assume_roles))] if scope.assume_roles else []


def _target_trust(scope: Scope) -> list[dict[str, Any]]:
    """The trust policy of a target account's CI role: the source account's CI principals may
    assume it, with the external id (the confused-deputy guard), and nobody else."""
    if not scope.publishers:
        raise ConfigError("--for target-trust needs --publisher-arn: the CI role(s) that assume this one")
    statement: dict[str, Any] = {
        "Sid": "SourceCiAssumesThisRole",
        "Effect": "Allow",
        "Principal": {"AWS": sorted(scope.publishers)},
        "Action": "sts:AssumeRole",
    }
    if scope.external_id:
        statement["Condition"] = {"StringEquals": {"sts:ExternalId": scope.external_id}}
    return [statement]


def _news(scope: Scope) -> list[dict[str, Any]]:
    """`--event-bus` and `--notify`: deploy events to one bus, under the deployer's source only, so
    CI cannot pass itself off as another service there; chat lines to the named topics."""
    statements = []
    if scope.event_bus:
        statements.append(
            _allow(
                "SendDeployEvents",
                ["events:PutEvents"],
                scope.event_bus_arn,
                # events:source is multivalued (one value per entry): every entry's must be ours,
                # and there must be one (ForAllValues alone is true of an empty set).
                {"ForAllValues:StringEquals": {"events:source": [EVENT_SOURCE]}, "Null": {"events:source": "false"}},
            )
        )
    if scope.notify_topics:
        statements.append(_allow("NotifyTopics", ["sns:Publish"], sorted(scope.notify_topics)))
    return statements


def _signing(scope: Scope) -> list[dict[str, Any]]:
    """kms:Sign (and GetPublicKey, for the key id) on the release keys only; verifying needs nothing."""
    arns = scope.kms_key_arns()
    return [_allow("SignWithReleaseKeys", ["kms:GetPublicKey", "kms:Sign"], arns)] if arns else []


def _instance(scope: Scope) -> list[dict[str, Any]]:
    owned = {"StringEquals": {f"aws:ResourceTag/{OWNER_TAG}": USERID}}
    statements = [
        _allow("ReadReleases", ["s3:GetObject"], [scope.objects(RELEASES, "*"), scope.objects(ARTIFACTS, "*")]),
        _allow("ReadOwnChannels", ["s3:GetObject"], scope.objects(CHANNELS, *scope.fleet, "*")),
        _allow("ReadTrustUpdates", ["s3:GetObject"], scope.objects(TRUST, "*")),
        # Only so that S3 answers 404, not 403, for a pointer never published or a trust version
        # not yet stored; never status/.
        _allow(
            "ListOwnChannelsAndTrust",
            ["s3:ListBucket"],
            scope.bucket_arn,
            {
                "StringLike": {
                    "s3:prefix": [scope.key_pattern(CHANNELS, *scope.fleet, "*"), scope.key_pattern(TRUST, "*")]
                }
            },
        ),
        # A rollout's pre-authorised abort: how many instances of its own stage and role told that
        # a deploy failed, read from the keys alone (never the markers' content, never status/).
        _allow(
            "CountFailureMarkers",
            ["s3:ListBucket"],
            scope.bucket_arn,
            {
                "StringLike": {
                    "s3:prefix": [scope.key_pattern(EVENTS, EventType.INSTANCE_DEPLOY_FAILED.slug, *scope.fleet, "*")]
                }
            },
        ),
        _allow("WriteOwnStatus", ["s3:PutObject"], scope.objects(STATUS, *scope.fleet, f"{USERID}{REPORT_SUFFIX}")),
        # Instance events (`events/<event>/<stage>/<role>/<deploy>/<owner>.json`): the bucket's
        # EventBridge notification delivers them, so telling needs no events:PutEvents here.
        _allow(
            "WriteOwnEvents",
            ["s3:PutObject"],
            scope.objects(EVENTS, "*", *scope.fleet, "*", f"{USERID}{REPORT_SUFFIX}"),
        ),
        # Tagging on create needs sqs:TagQueue too (publisher/iam_model.py). TagQueue alone would
        # let an instance re-tag another's queue as its own and take it over: it is granted only
        # with the caller's own tag, and only on a queue that has no owner yet or is its own.
        _allow(
            "CreateQueuesTaggedAsOwn",
            ["sqs:CreateQueue", "sqs:TagQueue"],
            scope.queues,
            {
                "StringEquals": {f"aws:RequestTag/{OWNER_TAG}": USERID},
                "ForAllValues:StringEquals": {"aws:TagKeys": [OWNER_TAG]},
                "StringEqualsIfExists": {f"aws:ResourceTag/{OWNER_TAG}": USERID},
            },
        ),
        _allow(
            "UseOwnQueues",
            [
                "sqs:ChangeMessageVisibility",
                "sqs:DeleteMessage",
                "sqs:GetQueueAttributes",
                "sqs:ReceiveMessage",
                "sqs:SetQueueAttributes",
            ],
            scope.queues,
            owned,
        ),
        # Moving a poison message to its own DLQ, nowhere else.
        _allow("DeadLetterToOwnDlq", ["sqs:SendMessage"], scope.dead_letter_queues, owned),
        _allow(
            "SubscribeDeployerQueues",
            ["sns:Subscribe"],
            scope.topic_arn,
            # The queue pattern also matches every DLQ (`…--i-1--dlq`): those are excluded by name.
            {
                "StringEquals": {"sns:Protocol": "sqs"},
                "StringLike": {"sns:Endpoint": scope.queues},
                "StringNotLike": {"sns:Endpoint": f"*{DLQ_SUFFIX}"},
            },
        ),
    ]
    # Every option below only adds statements, each always written the same way: a policy for
    # several options is the union of theirs by Sid (how the Terraform module composes them).
    if scope.deregister:
        statements.append(
            _allow(
                "DeleteOwnStatus", ["s3:DeleteObject"], scope.objects(STATUS, *scope.fleet, f"{USERID}{REPORT_SUFFIX}")
            )
        )
    if scope.deregister or scope.terminate:
        statements += [
            _allow("DeleteOwnQueues", ["sqs:DeleteQueue", "sqs:GetQueueUrl"], scope.queues, owned),
            # sns:Unsubscribe takes no resource scoping at all (not even the topic): grant it only where
            # SIGTERM (or the terminate hook) means termination, or leave leaving to `deployer gc`.
            _allow("LeaveTheTopic", ["sns:Unsubscribe"], "*"),
        ]
    statements += _traffic(scope)
    statements += _secrets(scope)
    topic = scope.topic
    group = f"arn:{topic.partition}:autoscaling:{topic.region}:{topic.account}:autoScalingGroup:*:autoScalingGroupName/{scope.asg_name or '*'}"
    # `--asg` alone has always meant the launch hook of that group; with --terminate-hook or
    # --scale-in-protection it only names the group.
    if scope.launch:
        statements.append(_allow("CompleteLaunchHook", ["autoscaling:CompleteLifecycleAction"], group))
    if scope.terminate:
        statements += [
            _allow(
                "LeaveThroughTerminateHook",
                ["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"],
                group,
            ),
            # Its HeartbeatTimeout, for the heartbeat's period; Describe calls take no resource ARN.
            _allow("ReadTerminateHook", ["autoscaling:DescribeLifecycleHooks"], "*"),
        ]
    if scope.protect:
        statements.append(_allow("ProtectWhileDeploying", ["autoscaling:SetInstanceProtection"], group))
    looks_up = scope.lifecycle or scope.terminate or scope.protect or AUTO_TARGET_GROUPS in scope.target_groups
    if looks_up and not scope.asg_name:
        # DescribeAutoScalingInstances supports no resource-level scoping.
        statements.append(_allow("FindOwnGroup", ["autoscaling:DescribeAutoScalingInstances"], "*"))
    return statements


def _secrets(scope: Scope) -> list[dict[str, Any]]:
    """Reading the secrets a manifest names at apply time (deployer.aws.secrets), nothing else."""
    if not scope.secrets:
        return []
    topic = scope.topic
    parameters = sorted(s for s in scope.secrets if ":ssm:" in s)
    secrets = sorted(s for s in scope.secrets if ":secretsmanager:" in s)
    services = [f"{name}.{topic.region}.amazonaws.com" for name in ("secretsmanager", "ssm")]
    statements = []
    if parameters:
        statements.append(_allow("ReadNamedParameters", ["ssm:GetParameters"], parameters))
    if secrets:
        statements.append(_allow("ReadNamedSecrets", ["secretsmanager:GetSecretValue"], secrets))
    # A SecureString or secret under a customer managed key: kms:Decrypt, only through those services.
    statements.append(
        _allow(
            "DecryptSecretsViaService",
            ["kms:Decrypt"],
            f"arn:{topic.partition}:kms:{topic.region}:{topic.account}:key/*",
            {"StringEquals": {"kms:ViaService": services}},
        )
    )
    return statements


def _traffic(scope: Scope) -> list[dict[str, Any]]:
    """Leaving and rejoining the load balancer around a release switch (deployer.agent.traffic)."""
    if not scope.target_groups:
        return []
    statements = [
        # IAM has no condition key for the target: this lets the instance take any target of these
        # groups out (docs/design.md, "Behind a load balancer"); name the groups, not `*`.
        _allow(
            "LeaveAndRejoinTargetGroups",
            ["elasticloadbalancing:DeregisterTargets", "elasticloadbalancing:RegisterTargets"],
            sorted(set(scope.target_group_arns)),
        ),
        # Describe calls take no resource-level scoping.
        _allow(
            "ReadTargetHealth",
            [
                "elasticloadbalancing:DescribeTargetGroupAttributes",
                "elasticloadbalancing:DescribeTargetGroups",
                "elasticloadbalancing:DescribeTargetHealth",
            ],
            "*",
        ),
    ]
    if AUTO_TARGET_GROUPS in scope.target_groups:
        # The group's target groups; the group itself is found by FindOwnGroup (without --asg).
        statements.append(_allow("FindOwnTargetGroups", ["autoscaling:DescribeAutoScalingGroups"], "*"))
    return statements


def _gc(scope: Scope) -> list[dict[str, Any]]:
    return [
        _allow("ReadAndDeleteStatus", ["s3:DeleteObject", "s3:GetObject"], scope.objects(STATUS, *scope.fleet, "*")),
        _allow("ListBucket", ["s3:ListBucket"], scope.bucket_arn),
        _allow("ListSubscriptions", ["sns:ListSubscriptionsByTopic"], scope.topic_arn),
        # sns:Unsubscribe supports no resource-level permissions.
        _allow("Unsubscribe", ["sns:Unsubscribe"], "*"),
        _allow("DeleteQueues", ["sqs:DeleteQueue", "sqs:GetQueueUrl"], scope.queues),
        # `gc releases`: a release may be promoted to any stage, so what refers to it is read in
        # every stage, whatever --stage narrows above; it condemns (a mark), then deletes.
        _allow(
            "ReadWhatRefersToReleases",
            ["s3:GetObject"],
            [scope.objects(CHANNELS, "*"), scope.objects(STATUS, "*"), scope.objects(RELEASES, "*", MANIFEST_NAME)],
        ),
        _allow("CondemnReleases", ["s3:GetObject", "s3:PutObject"], scope.condemned_marks),
        _allow("DeleteReleases", ["s3:DeleteObject"], [scope.objects(RELEASES, "*"), scope.objects(ARTIFACTS, "*")]),
        # `deployer status --html … --upload` and `status --metrics`, from the same scheduled job.
        _allow("PutFleetPage", ["s3:PutObject"], scope.objects(FLEET, FLEET_PAGE_NAME)),
        scope.fleet_metrics,
    ]


def _trust(scope: Scope) -> list[dict[str, Any]]:
    """`deployer trust sign-update`: read and conditionally write trust versions, sign with trust keys.

    Kept apart from CI: a trust key holder can change who may sign releases, so the role that
    stores trust versions is not the one every pipeline runs with.
    """
    arns = scope.kms_key_arns()
    statements = [
        _allow("ReadAndStoreTrustVersions", ["s3:GetObject", "s3:PutObject"], scope.objects(TRUST, "*")),
        # Only so that a version not yet stored answers 404, not 403.
        _allow(
            "ListTrustVersions",
            ["s3:ListBucket"],
            scope.bucket_arn,
            {"StringLike": {"s3:prefix": [scope.key_pattern(TRUST, "*")]}},
        ),
    ]
    if arns:
        statements.append(_allow("SignWithTrustKeys", ["kms:GetPublicKey", "kms:Sign"], arns))
    return statements


def _bucket(scope: Scope) -> list[dict[str, Any]]:
    """Conditional writes as the bucket's rule: a release or a history entry is written once, a
    pointer moves only from the version its writer read (`s3:if-none-match`, `s3:if-match`).
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes-enforce.html
    """
    return [
        _deny(
            "ReleasesAreWrittenOnce",
            ["s3:PutObject"],
            scope.objects(RELEASES, "*"),
            {"Null": {"s3:if-none-match": "true"}},
        ),
        _deny(
            "HistoryIsWrittenOnce",
            ["s3:PutObject"],
            scope.objects(CHANNELS, "*", HISTORY, "*"),
            {"Null": {"s3:if-none-match": "true"}},
        ),
        _deny(
            "PointersMoveConditionally",
            ["s3:PutObject"],
            scope.objects(CHANNELS, "*", POINTER_NAME),
            {"Null": {"s3:if-match": "true", "s3:if-none-match": "true"}},
        ),
        _deny(
            "EventsAreWrittenOnce",
            ["s3:PutObject"],
            scope.objects(EVENTS, "*"),
            {"Null": {"s3:if-none-match": "true"}},
        ),
        _deny(
            "TrustVersionsChangeConditionally",
            ["s3:PutObject"],
            scope.objects(TRUST, "*"),
            {"Null": {"s3:if-match": "true", "s3:if-none-match": "true"}},
        ),
    ]


def _topic(scope: Scope) -> list[dict[str, Any]]:
    topic = scope.topic
    statements: list[dict[str, Any]] = [
        {
            # The account's IAM decides, as under SNS's default policy; the Denies below narrow it.
            "Sid": "AccountIamDecides",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:{topic.partition}:iam::{topic.account}:root"},
            "Action": sorted(
                ["sns:GetTopicAttributes", "sns:ListSubscriptionsByTopic", "sns:Publish", "sns:Subscribe"]
            ),
            "Resource": scope.topic_arn,
        },
        _deny("OnlySqsSubscriptions", ["sns:Subscribe"], scope.topic_arn, {"StringNotEquals": {"sns:Protocol": "sqs"}}),
        _deny(
            "OnlyDeployerQueues",
            ["sns:Subscribe"],
            scope.topic_arn,
            {"StringNotLike": {"sns:Endpoint": topic.queue_arn(queue_name_pattern(scope.queue_prefix))}},
        ),
        _deny(
            "NoDeadLetterQueues", ["sns:Subscribe"], scope.topic_arn, {"StringLike": {"sns:Endpoint": f"*{DLQ_SUFFIX}"}}
        ),
    ]
    if scope.publishers:
        statements.append(
            _deny(
                "OnlyCiPublishes",
                ["sns:Publish"],
                scope.topic_arn,
                {"ArnNotLike": {"aws:PrincipalArn": list(scope.publishers)}},
            )
        )
    return statements


def render(policy: dict[str, Any]) -> str:
    """Valid JSON, one statement per line: short enough to read in a terminal or a README."""
    statements = ",\n".join("  " + json.dumps(s) for s in policy["Statement"])
    return f'{{"Version": {json.dumps(policy["Version"])}, "Statement": [\n{statements}\n]}}'
