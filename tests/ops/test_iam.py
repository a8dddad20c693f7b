"""`deployer iam-policy`: least privilege, scoped to bucket/prefix/topic/queue pattern, and the README agrees."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from deployer.agent.config import AgentConfig
from deployer.agent.queue import SqsQueue
from deployer.cli import main
from publisher.iam import Audience, Scope, policy_for
from tests.support import BUCKET, FAST_POLICY, Fleet

README = Path(__file__).parents[2] / "README.md"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:deployer"
#: The example the README's policies are printed for.
README_ARGS = ("--bucket", "my-deploys", "--topic-arn", TOPIC)


def iam_policy(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["iam-policy", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def actions(policy: dict[str, Any]) -> set[str]:
    return {a for s in policy["Statement"] for a in s["Action"]}


def resources(policy: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for statement in policy["Statement"]:
        value = statement["Resource"]
        found.update([value] if isinstance(value, str) else value)
    return found


def test_ci_may_publish_and_read_status_but_not_touch_queues_or_delete() -> None:
    policy = policy_for(Audience.CI, Scope(bucket="b", topic_arn=TOPIC, prefix="team/deployer"))
    assert actions(policy) == {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "sns:Publish", "sns:GetTopicAttributes"}
    assert resources(policy) == {
        "arn:aws:s3:::b/team/deployer/releases/*",
        "arn:aws:s3:::b/team/deployer/channels/*",
        "arn:aws:s3:::b/team/deployer/status/*",
        "arn:aws:s3:::b",
        TOPIC,
    }
    put = next(s for s in policy["Statement"] if "s3:PutObject" in s["Action"])
    assert "arn:aws:s3:::b/team/deployer/status/*" not in put["Resource"]


def test_instance_policy_is_narrowed_to_its_stage_role_queues_and_status() -> None:
    policy = policy_for(Audience.INSTANCE, Scope(bucket="b", topic_arn=TOPIC, stage="prod", role="web"))
    assert "arn:aws:sqs:eu-west-1:123456789012:deployer-prod-web-*" in resources(policy)
    assert "arn:aws:s3:::b/deployer/status/prod/web/*" in resources(policy)
    assert not {"s3:DeleteObject", "sqs:DeleteQueue", "sns:Unsubscribe", "sns:Publish"} & actions(policy)
    writes = [s for s in policy["Statement"] if "s3:PutObject" in s["Action"]]
    assert [w["Resource"] for w in writes] == ["arn:aws:s3:::b/deployer/status/prod/web/*"]
    assert not any(a.startswith("autoscaling:") for a in actions(policy))
    opted = policy_for(Audience.INSTANCE, Scope(bucket="b", topic_arn=TOPIC, asg_name="web-asg", deregister=True))
    assert {"s3:DeleteObject", "sqs:DeleteQueue", "sns:Unsubscribe", "autoscaling:CompleteLifecycleAction"} <= actions(
        opted
    )
    assert "arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:*:autoScalingGroupName/web-asg" in resources(
        opted
    )
    # With the group named in the config no lookup is needed, so no unscoped Describe either.
    assert "*" not in resources(opted)


def test_gc_may_delete_queues_and_status_but_not_publish() -> None:
    policy = policy_for(Audience.GC, Scope(bucket="b", topic_arn=TOPIC, queue_prefix="dep"))
    assert "arn:aws:sqs:eu-west-1:123456789012:dep-*" in resources(policy)
    assert {"sqs:DeleteQueue", "sns:Unsubscribe", "s3:DeleteObject"} <= actions(policy)
    assert not {"sns:Publish", "s3:PutObject"} & actions(policy)


def test_the_readme_shows_exactly_what_iam_policy_prints() -> None:
    section = README.read_text().split("## AWS resources and IAM", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"deployer iam-policy (--for \w+[^\n`]*)`?[^\n]*\n+```json\n(.*?)\n```", section, re.S)
    assert [b[0].split()[1] for b in blocks] == ["ci", "instance", "gc"]
    for flags, block in blocks:
        extra = [f for f in flags.split()[2:] if f.startswith("--") and "bucket" not in f and "topic" not in f]
        expected = iam_policy(*flags.split()[:2], *README_ARGS, *extra)
        assert json.loads(block) == expected, flags


def test_the_queue_policy_the_agent_sets_admits_only_the_topic(fleet: Fleet) -> None:
    config = AgentConfig(stage="prod", role="web", components=("api",), bucket=BUCKET, topic_arn=fleet.topic_arn)
    handle = SqsQueue(fleet.clients.sqs, fleet.clients.sns, config, "i-policy", FAST_POLICY).ensure()
    attrs = fleet.clients.sqs.get_queue_attributes(QueueUrl=handle.url, AttributeNames=["Policy"])["Attributes"]
    [statement] = json.loads(attrs["Policy"])["Statement"]
    assert statement["Principal"] == {"Service": "sns.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Resource"] == handle.arn
    assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": fleet.topic_arn}}
