"""`deployer iam-policy`: least-privilege IAM policies for CI, instances and gc. Pure.

Scoped to the bucket and prefix (and within it to releases/, channels/ and status/), the topic,
and the queue-name pattern `<queue_prefix>-<stage>-<role>-*`. Region and account come from the
topic ARN: queues live next to the topic they subscribe to.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from deployer.protocol.layout import CHANNELS, RELEASES, STATUS, Layout
from deployer.protocol.names import DEFAULT_PREFIX, DEFAULT_QUEUE_PREFIX, TopicArn, queue_name_pattern

POLICY_VERSION = "2012-10-17"


class Audience(enum.StrEnum):
    CI = "ci"  # publish, publish --wait, rollback, history, status
    INSTANCE = "instance"  # the agent
    GC = "gc"  # deployer gc on a schedule


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

    @property
    def topic(self) -> TopicArn:
        return TopicArn.parse(self.topic_arn)

    @property
    def region(self) -> str:
        return self.topic.region

    @property
    def account(self) -> str:
        return self.topic.account

    @property
    def partition(self) -> str:
        return self.topic.partition

    def objects(self, *parts: str) -> str:
        """Object ARN pattern for `<prefix>/<parts…>`, keys built by the same Layout the code writes with."""
        return f"{self.bucket_arn}/{Layout(self.prefix).key(*parts)}"

    @property
    def bucket_arn(self) -> str:
        return self.topic.bucket_arn(self.bucket)

    @property
    def status_objects(self) -> str:
        return self.objects(STATUS, *([self.stage, self.role or "*", "*"] if self.stage else ["*"]))

    @property
    def queues(self) -> str:
        """`<queue_prefix>-<stage>-<role>-*`, narrowed as far as stage and role are given."""
        return self.topic.queue_arn(queue_name_pattern(self.queue_prefix, self.stage, self.role))


def _statement(sid: str, actions: list[str], resources: str | list[str]) -> dict[str, Any]:
    return {"Sid": sid, "Effect": "Allow", "Action": sorted(actions), "Resource": resources}


def policy_for(audience: Audience, scope: Scope) -> dict[str, Any]:
    if audience is Audience.CI:
        statements = [
            _statement(
                "ReleasesAndChannels",
                ["s3:GetObject", "s3:PutObject"],
                [scope.objects(RELEASES, "*"), scope.objects(CHANNELS, "*")],
            ),
            _statement("ReadStatus", ["s3:GetObject"], scope.objects(STATUS, "*")),
            # HeadBucket and ListObjectsV2 (history, status) authorize as s3:ListBucket on the bucket.
            _statement("ListBucket", ["s3:ListBucket"], scope.bucket_arn),
            _statement("PublishDeploys", ["sns:GetTopicAttributes", "sns:Publish"], scope.topic_arn),
        ]
    elif audience is Audience.INSTANCE:
        statements = [
            _statement(
                "ReadReleasesAndPointers",
                ["s3:GetObject"],
                [scope.objects(RELEASES, "*"), scope.objects(CHANNELS, "*")],
            ),
            # Without s3:ListBucket, S3 answers 403 instead of 404 for a pointer never published.
            _statement("ListBucket", ["s3:ListBucket"], scope.bucket_arn),
            _statement(
                "WriteOwnStatus",
                ["s3:PutObject", *(["s3:DeleteObject"] if scope.deregister else [])],
                scope.status_objects,
            ),
            _statement(
                "OwnQueues",
                [
                    "sqs:ChangeMessageVisibility",
                    "sqs:CreateQueue",
                    "sqs:DeleteMessage",
                    "sqs:GetQueueAttributes",
                    "sqs:GetQueueUrl",
                    "sqs:ReceiveMessage",
                    "sqs:SendMessage",  # moving a poison message to its own DLQ
                    "sqs:SetQueueAttributes",
                    *(["sqs:DeleteQueue"] if scope.deregister else []),
                ],
                scope.queues,
            ),
            _statement(
                "Subscribe",
                [
                    "sns:SetSubscriptionAttributes",
                    "sns:Subscribe",
                    *(["sns:Unsubscribe"] if scope.deregister else []),
                ],
                scope.topic_arn,
            ),
        ]
        if scope.lifecycle or scope.asg_name:
            group = scope.asg_name or "*"
            statements.append(
                _statement(
                    "CompleteLaunchHook",
                    ["autoscaling:CompleteLifecycleAction"],
                    f"arn:{scope.partition}:autoscaling:{scope.region}:{scope.account}:autoScalingGroup:*:autoScalingGroupName/{group}",
                )
            )
            if not scope.asg_name:
                # DescribeAutoScalingInstances supports no resource-level scoping.
                statements.append(_statement("FindOwnGroup", ["autoscaling:DescribeAutoScalingInstances"], "*"))
    else:
        statements = [
            _statement("ReadAndDeleteStatus", ["s3:DeleteObject", "s3:GetObject"], scope.status_objects),
            _statement("ListBucket", ["s3:ListBucket"], scope.bucket_arn),
            _statement("Unsubscribe", ["sns:ListSubscriptionsByTopic", "sns:Unsubscribe"], scope.topic_arn),
            _statement("DeleteQueues", ["sqs:DeleteQueue", "sqs:GetQueueUrl"], scope.queues),
        ]
    return {"Version": POLICY_VERSION, "Statement": statements}


def render(policy: dict[str, Any]) -> str:
    """Valid JSON, one statement per line: short enough to read in a terminal or a README."""
    statements = ",\n".join("  " + json.dumps(s) for s in policy["Statement"])
    return f'{{"Version": {json.dumps(policy["Version"])}, "Statement": [\n{statements}\n]}}'
