"""`deployer iam-policy`: the trust boundary as documents, linted by parliament and held to the
properties that confine an instance (moto evaluates no IAM conditions, so these are the check)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import parliament
import pytest
from click.testing import CliRunner
from parliament import analyze_policy_string

from deployer.agent.config import AgentConfig
from deployer.agent.queue import SqsQueue
from deployer.cli import main
from deployer.protocol.errors import ConfigError
from deployer.protocol.names import OWNER_TAG, queue_name
from publisher.iam import USERID, Audience, Scope, policy_for
from tests.support import BUCKET, FAST_POLICY, Fleet

README = Path(__file__).parents[2] / "README.md"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:deployer"
CI_ROLE = "arn:aws:iam::123456789012:role/ci-deployer"
#: The example the README's policies are printed for.
README_ARGS = ("--bucket", "my-deploys", "--topic-arn", TOPIC)
#: Every combination of options an operator may pass, for the properties below.
SCOPES = [
    Scope(bucket="b", topic_arn=TOPIC),
    Scope(bucket="b", topic_arn=TOPIC, stage="prod"),
    Scope(bucket="b", topic_arn=TOPIC, stage="prod", role="web", prefix="team/deployer", queue_prefix="dep"),
    Scope(bucket="b", topic_arn=TOPIC, stage="prod", role="web", deregister=True, asg_name="web-asg"),
    Scope(bucket="b", topic_arn=TOPIC, lifecycle=True, publishers=(CI_ROLE,)),
    Scope(bucket="b", topic_arn=TOPIC, sign_keys=("kms:1234abcd-12ab-34cd-56ef-1234567890ab",)),
]


def iam_policy(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["iam-policy", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def statements(policy: dict[str, Any], action_prefix: str = "") -> list[dict[str, Any]]:
    return [s for s in policy["Statement"] if any(a.startswith(action_prefix) for a in s["Action"])]


def actions(policy: dict[str, Any]) -> set[str]:
    return {a for s in policy["Statement"] for a in s["Action"]}


def resources(policy: dict[str, Any]) -> set[str]:
    return {r for s in policy["Statement"] for r in as_list(s["Resource"])}


#: A role's trust policy names a Principal and no Resource, which parliament (identity and resource
#: policies) reports as malformed; its decisions are the evaluator's (test_iam_boundary.py).
LINTED = [audience for audience in Audience if audience is not Audience.TARGET_TRUST]


@pytest.mark.parametrize("audience", LINTED)
@pytest.mark.parametrize("scope", SCOPES, ids=range(len(SCOPES)))
def test_parliament_finds_no_unknown_action_resource_or_condition_key(audience: Audience, scope: Scope) -> None:
    findings = analyze_policy_string(json.dumps(policy_for(audience, scope)), include_community_auditors=False).findings
    assert [(f.issue, f.detail) for f in findings] == []


def test_null_condition_keys_are_keys_s3_defines_for_put_object() -> None:
    """parliament does not check keys inside Null; check the bucket policy's against its IAM data."""
    definitions = json.loads((Path(parliament.__file__).parent / "iam_definition.json").read_text())
    [s3] = [service for service in definitions if service["prefix"] == "s3"]
    [put] = [p for p in s3["privileges"] if p["privilege"] == "PutObject"]
    known = {key for resource in put["resource_types"] for key in resource["condition_keys"]}
    used = {k for s in policy_for(Audience.BUCKET, SCOPES[0])["Statement"] for k in s["Condition"]["Null"]}
    assert used == {"s3:if-none-match", "s3:if-match"}
    assert used <= known


@pytest.mark.parametrize("scope", SCOPES, ids=range(len(SCOPES)))
def test_every_sqs_permission_of_an_instance_is_bound_to_the_queues_it_owns(scope: Scope) -> None:
    for statement in statements(policy_for(Audience.INSTANCE, scope), "sqs:"):
        condition = statement["Condition"]
        if statement["Action"] == ["sqs:CreateQueue", "sqs:TagQueue"]:
            # It may only create a queue by tagging it as its own, with no other tag, and tag only
            # a queue that has no owner yet or is its own (else it could take another's over).
            assert condition["StringEquals"] == {f"aws:RequestTag/{OWNER_TAG}": USERID}
            assert condition["ForAllValues:StringEquals"] == {"aws:TagKeys": [OWNER_TAG]}
            assert condition["StringEqualsIfExists"] == {f"aws:ResourceTag/{OWNER_TAG}": USERID}
        else:
            assert condition == {"StringEquals": {f"aws:ResourceTag/{OWNER_TAG}": USERID}}
        assert statement["Resource"].startswith(scope.topic.queue_arn(scope.queue_prefix + "--"))


@pytest.mark.parametrize("scope", SCOPES, ids=range(len(SCOPES)))
def test_an_instance_writes_no_object_but_its_own_status_report_and_its_own_events(scope: Scope) -> None:
    for statement in statements(policy_for(Audience.INSTANCE, scope), "s3:"):
        if {"s3:PutObject", "s3:DeleteObject"} & set(statement["Action"]):
            assert statement["Resource"].endswith(f"/{USERID}.json")
            assert "/status/" in statement["Resource"] or (
                "/events/" in statement["Resource"] and statement["Action"] == ["s3:PutObject"]
            )


@pytest.mark.parametrize("scope", SCOPES, ids=range(len(SCOPES)))
def test_an_instance_cannot_reattribute_a_subscription_send_to_others_or_list_status_or_events_of_other_kinds(
    scope: Scope,
) -> None:
    policy = policy_for(Audience.INSTANCE, scope)
    assert "sns:SetSubscriptionAttributes" not in actions(policy)
    assert "sns:Publish" not in actions(policy)
    [send] = [s for s in policy["Statement"] if "sqs:SendMessage" in s["Action"]]
    assert send["Resource"].endswith("--dlq")
    [subscribe] = [s for s in policy["Statement"] if "sns:Subscribe" in s["Action"]]
    assert subscribe["Condition"]["StringEquals"] == {"sns:Protocol": "sqs"}
    prefixes = [
        prefix
        for s in policy["Statement"]
        if "s3:ListBucket" in s["Action"]
        for prefix in s["Condition"]["StringLike"]["s3:prefix"]
    ]
    assert all("/channels/" in p or "/trust/" in p or "/events/instance-deploy-failed/" in p for p in prefixes)
    assert not any("/status" in p for p in prefixes)


@pytest.mark.parametrize(("mine", "theirs"), [("web", "web-admin"), ("web-admin", "web"), ("web", "web_1")])
def test_a_roles_queue_pattern_is_not_another_roles_even_when_one_name_starts_the_other(mine: str, theirs: str) -> None:
    pattern = Scope(bucket="b", topic_arn=TOPIC, stage="prod", role=mine).queues.rsplit(":", 1)[1]
    assert fnmatch.fnmatchcase(queue_name("deployer", "prod", mine, "i-0abc"), pattern)
    assert not fnmatch.fnmatchcase(queue_name("deployer", "prod", theirs, "i-0abc"), pattern)


def test_ci_moves_only_its_stages_channels_never_touches_queues_and_deletes_only_gcs_marks() -> None:
    policy = policy_for(Audience.CI, Scope(bucket="b", topic_arn=TOPIC, prefix="team/deployer", stage="dev"))
    assert actions(policy) == {
        "s3:GetObject",
        "s3:PutObject",
        "s3:AbortMultipartUpload",  # s3transfer's cleanup of an upload it could not finish
        "s3:DeleteObject",  # taking a release back from gc --releases: its mark only
        "s3:ListBucket",
        "sns:Publish",
        "sns:GetTopicAttributes",
        "autoscaling:DescribeAutoScalingGroups",  # publish --wait --asg, read-only
        "cloudwatch:DescribeAlarms",  # publish --waves --alarm, read-only
        "cloudwatch:PutMetricData",  # status --metrics, in its namespace only (below)
        "elasticloadbalancing:DescribeTargetHealth",  # publish --waves --target-group, read-only
    }
    puts = {r for s in statements(policy) if "s3:PutObject" in s["Action"] for r in as_list(s["Resource"])}
    assert puts == {
        "arn:aws:s3:::b/team/deployer/releases/*",
        "arn:aws:s3:::b/team/deployer/artifacts/*",
        "arn:aws:s3:::b/team/deployer/channels/dev/*",
        "arn:aws:s3:::b/team/deployer/fleet/index.html",
        "arn:aws:s3:::b/team/deployer/targets/dev/*",  # the record of a publish across targets
    }
    deletes = {r for s in statements(policy) if "s3:DeleteObject" in s["Action"] for r in as_list(s["Resource"])}
    assert deletes == {
        "arn:aws:s3:::b/team/deployer/releases/*/condemned.json",
        "arn:aws:s3:::b/team/deployer/artifacts/*.condemned.json",
    }


@pytest.mark.parametrize("audience", [Audience.CI, Audience.GC])
def test_ci_and_gc_put_metrics_only_into_the_namespace_they_were_given(audience: Audience) -> None:
    for namespace, flags in (("Deployer", ()), ("Team/Deploys prod", ("--metrics-namespace", "Team/Deploys prod"))):
        policy = iam_policy("--for", audience.value, "--bucket", "b", "--topic-arn", TOPIC, *flags)
        [put] = statements(policy, "cloudwatch:Put")
        assert put["Action"] == ["cloudwatch:PutMetricData"]
        assert put["Condition"] == {"StringEquals": {"cloudwatch:namespace": namespace}}
    for scope in SCOPES:
        assert "cloudwatch:PutMetricData" not in actions(policy_for(Audience.INSTANCE, scope))
    with pytest.raises(ConfigError, match="is not a CloudWatch namespace"):
        Scope(bucket="b", topic_arn=TOPIC, metrics_namespace="AWS/EC2")


def test_release_gc_reads_every_stage_and_deletes_only_releases_and_reports() -> None:
    policy = policy_for(Audience.GC, Scope(bucket="b", topic_arn=TOPIC, stage="dev"))
    deletes = {r for s in statements(policy) if "s3:DeleteObject" in s["Action"] for r in as_list(s["Resource"])}
    assert deletes == {
        "arn:aws:s3:::b/deployer/status/dev/*/*",
        "arn:aws:s3:::b/deployer/releases/*",
        "arn:aws:s3:::b/deployer/artifacts/*",
    }
    puts = {r for s in statements(policy) if "s3:PutObject" in s["Action"] for r in as_list(s["Resource"])}
    assert puts == {
        "arn:aws:s3:::b/deployer/releases/*/condemned.json",
        "arn:aws:s3:::b/deployer/artifacts/*.condemned.json",
        "arn:aws:s3:::b/deployer/fleet/index.html",
    }
    # A release may be promoted to any stage: what refers to it is read everywhere, however narrowed.
    gets = {r for s in statements(policy) if "s3:GetObject" in s["Action"] for r in as_list(s["Resource"])}
    assert {"arn:aws:s3:::b/deployer/channels/*", "arn:aws:s3:::b/deployer/status/*"} <= gets


def test_the_bucket_policy_refuses_unconditional_release_history_pointer_and_event_writes() -> None:
    policy = policy_for(Audience.BUCKET, Scope(bucket="b", topic_arn=TOPIC))
    assert {s["Effect"] for s in policy["Statement"]} == {"Deny"}
    by_resource = {s["Resource"]: s["Condition"]["Null"] for s in policy["Statement"]}
    assert by_resource == {
        "arn:aws:s3:::b/deployer/releases/*": {"s3:if-none-match": "true"},
        "arn:aws:s3:::b/deployer/channels/*/history/*": {"s3:if-none-match": "true"},
        "arn:aws:s3:::b/deployer/channels/*/latest.json": {"s3:if-match": "true", "s3:if-none-match": "true"},
        "arn:aws:s3:::b/deployer/trust/*": {"s3:if-match": "true", "s3:if-none-match": "true"},
        "arn:aws:s3:::b/deployer/events/*": {"s3:if-none-match": "true"},
    }


def test_ci_may_sign_with_its_release_keys_only_and_instances_need_no_kms_at_all() -> None:
    other = "arn:aws:kms:eu-west-1:123456789012:key/0000abcd-12ab-34cd-56ef-1234567890ab"
    keys = ("kms:1234abcd-12ab-34cd-56ef-1234567890ab", f"kms:{other}", "file:/ci/key.pem")
    policy = policy_for(Audience.CI, Scope(bucket="b", topic_arn=TOPIC, sign_keys=keys))
    [signing] = [s for s in policy["Statement"] if "kms:Sign" in s["Action"]]
    assert signing["Resource"] == ["arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab", other]
    with pytest.raises(ConfigError, match="not an alias"):
        policy_for(Audience.CI, Scope(bucket="b", topic_arn=TOPIC, sign_keys=("kms:alias/release",)))
    for scope in SCOPES:
        assert not [a for a in actions(policy_for(Audience.INSTANCE, scope)) if a.startswith("kms:")]


def test_the_topic_policy_admits_only_ci_publishers_and_deployer_queues() -> None:
    policy = policy_for(Audience.TOPIC, Scope(bucket="b", topic_arn=TOPIC, publishers=(CI_ROLE,)))
    denies = {s["Sid"]: s["Condition"] for s in policy["Statement"] if s["Effect"] == "Deny"}
    assert denies == {
        "OnlySqsSubscriptions": {"StringNotEquals": {"sns:Protocol": "sqs"}},
        "OnlyDeployerQueues": {"StringNotLike": {"sns:Endpoint": "arn:aws:sqs:eu-west-1:123456789012:deployer--*"}},
        "OnlyCiPublishes": {"ArnNotLike": {"aws:PrincipalArn": [CI_ROLE]}},
        "NoDeadLetterQueues": {"StringLike": {"sns:Endpoint": "*--dlq"}},
    }
    with pytest.raises(Exception, match="not an IAM role or user ARN"):
        Scope(bucket="b", topic_arn=TOPIC, publishers=("ci-deployer",))


def test_init_sets_the_topic_policy(fleet: Fleet) -> None:
    from publisher.infra import init_resources

    init_resources(fleet.clients, BUCKET, "deployer-test", publishers=(CI_ROLE,))
    stored = json.loads(fleet.clients.sns.get_topic_attributes(TopicArn=fleet.topic_arn)["Attributes"]["Policy"])
    scope = Scope(bucket=BUCKET, topic_arn=fleet.topic_arn, publishers=(CI_ROLE,))
    assert stored == policy_for(Audience.TOPIC, scope)


def test_the_readme_shows_exactly_what_iam_policy_prints() -> None:
    section = README.read_text().split("## AWS resources and IAM", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"`deployer iam-policy (--for [^`]*)`:\n+```json\n(.*?)\n```", section, re.S)
    assert [b[0].split()[1] for b in blocks] == ["ci", "instance", "gc", "trust", "bucket", "topic"]
    for flags, block in blocks:
        assert json.loads(block) == iam_policy(*shlex.split(flags), *README_ARGS), flags


def test_the_queue_policy_the_agent_sets_admits_only_the_topic_and_the_queues_carry_their_owner(fleet: Fleet) -> None:
    config = AgentConfig(stage="prod", role="web", components=("api",), bucket=BUCKET, topic_arn=fleet.topic_arn)
    owner = "AROAEXAMPLEROLEID01:i-policy"
    handle = SqsQueue(
        fleet.clients.sqs, fleet.clients.sns, config, "i-policy", FAST_POLICY, owner_userid=owner
    ).ensure()
    attrs = fleet.clients.sqs.get_queue_attributes(QueueUrl=handle.url, AttributeNames=["Policy"])["Attributes"]
    allow, deny = json.loads(attrs["Policy"])["Statement"]
    assert allow["Principal"] == {"Service": "sns.amazonaws.com"}
    assert allow["Condition"] == {"ArnEquals": {"aws:SourceArn": fleet.topic_arn}}
    # An explicit Deny: within one account an allow-only queue policy restricts nobody.
    assert (deny["Effect"], deny["Principal"], deny["Action"]) == ("Deny", "*", "sqs:SendMessage")
    assert deny["Condition"] == {"ArnNotEquals": {"aws:SourceArn": fleet.topic_arn}}
    dlq_policy = fleet.clients.sqs.get_queue_attributes(QueueUrl=handle.dlq_url, AttributeNames=["Policy"])
    [dlq_deny] = json.loads(dlq_policy["Attributes"]["Policy"])["Statement"]
    assert dlq_deny["Condition"] == {"StringNotEquals": {"aws:userid": owner}}
    for url in (handle.url, handle.dlq_url):
        assert fleet.clients.sqs.list_queue_tags(QueueUrl=url)["Tags"] == {OWNER_TAG: owner}
    attributes = fleet.clients.sns.get_subscription_attributes(SubscriptionArn=handle.subscription_arn)["Attributes"]
    assert attributes["RawMessageDelivery"] == "true"
