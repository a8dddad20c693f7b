"""The independent IAM evaluator (tests/iameval.py) is real: it allows, denies and lints as IAM does."""

from __future__ import annotations

from typing import Any

import pytest

from tests import iameval
from tests.iameval import Request

ACCOUNT = "123456789012"
USERID = "AROAEXAMPLEROLEID:i-0abc"
OTHER_USERID = "AROAEXAMPLEROLEID:i-0def"
PRINCIPAL = f"arn:aws:sts::{ACCOUNT}:assumed-role/fleet-instance/i-0abc"
QUEUE = f"arn:aws:sqs:us-east-1:{ACCOUNT}:deployer--prod--web--i-0abc"
TOPIC = f"arn:aws:sns:us-east-1:{ACCOUNT}:deployer"


@pytest.fixture(autouse=True)
def _evaluator_installed() -> None:
    reason = iameval.available()
    if reason is not None and not iameval.NODE_MODULES.is_dir():
        pytest.skip(reason)


def _policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def _request(
    rid: str, action: str, identity: dict[str, Any], context: dict[str, str | list[str]], **kw: Any
) -> Request:
    return Request(
        id=rid,
        principal=PRINCIPAL,
        identity_policies=(identity,),
        resource_policy=kw.pop("resource_policy", None),
        action=action,
        resource=kw.pop("resource", QUEUE),
        context=context,
        **kw,
    )


def test_a_policy_granting_only_create_queue_does_not_grant_the_tag_queue_it_implies() -> None:
    identity = _policy({"Sid": "CreateOnly", "Effect": "Allow", "Action": "sqs:CreateQueue", "Resource": QUEUE})
    tags: dict[str, str | list[str]] = {"aws:RequestTag/deployer-owner": USERID, "aws:TagKeys": ["deployer-owner"]}
    create, tag = iameval.evaluate(
        [_request("create", "sqs:CreateQueue", identity, tags), _request("tag", "sqs:TagQueue", identity, tags)]
    )
    assert (create.decision, create.errors) == ("Allowed", ()), create
    assert "CreateOnly" in create.explain
    assert (tag.decision, tag.errors) == ("ImplicitlyDenied", ()), tag


def test_the_owner_tag_policy_variable_admits_the_owner_and_no_other_userid() -> None:
    identity = _policy(
        {
            "Sid": "UseOwnQueues",
            "Effect": "Allow",
            "Action": "sqs:ReceiveMessage",
            "Resource": QUEUE,
            "Condition": {"StringEquals": {"aws:ResourceTag/deployer-owner": "${aws:userid}"}},
        }
    )
    owned_by_me = {"aws:ResourceTag/deployer-owner": USERID}
    owner, other = iameval.evaluate(
        [
            _request("owner", "sqs:ReceiveMessage", identity, {**owned_by_me, "aws:userid": USERID}),
            _request("other", "sqs:ReceiveMessage", identity, {**owned_by_me, "aws:userid": OTHER_USERID}),
        ]
    )
    assert (owner.decision, owner.errors) == ("Allowed", ()), owner
    assert "UseOwnQueues" in owner.explain
    assert (other.decision, other.errors) == ("ImplicitlyDenied", ()), other
    assert "aws:ResourceTag/deployer-owner" in other.explain


def test_an_explicit_deny_in_the_resource_policy_beats_an_identity_allow() -> None:
    identity = _policy({"Sid": "SendAnywhere", "Effect": "Allow", "Action": "sqs:SendMessage", "Resource": "*"})
    queue_policy = _policy(
        {"Sid": "NobodySends", "Effect": "Deny", "Principal": "*", "Action": "sqs:SendMessage", "Resource": QUEUE}
    )
    (denied,) = iameval.evaluate(
        [_request("send", "sqs:SendMessage", identity, {}, resource_policy=queue_policy, resource_account=ACCOUNT)]
    )
    assert (denied.decision, denied.errors) == ("ExplicitlyDenied", ()), denied
    assert not denied.allowed
    assert "NobodySends" in denied.explain


def test_a_source_arn_deny_matches_a_request_without_the_key_and_spares_the_topic() -> None:
    identity = _policy({"Sid": "SendAnywhere", "Effect": "Allow", "Action": "sqs:SendMessage", "Resource": "*"})
    queue_policy = _policy(
        {
            "Sid": "OnlyTheTopicSends",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "sqs:SendMessage",
            "Resource": QUEUE,
            "Condition": {"ArnNotEquals": {"aws:SourceArn": TOPIC}},
        }
    )
    missing, from_topic = iameval.evaluate(
        [
            _request("missing", "sqs:SendMessage", identity, {}, resource_policy=queue_policy),
            _request("topic", "sqs:SendMessage", identity, {"aws:SourceArn": TOPIC}, resource_policy=queue_policy),
        ]
    )
    assert (missing.decision, missing.errors) == ("ExplicitlyDenied", ()), missing
    assert "OnlyTheTopicSends" in missing.explain
    assert (from_topic.decision, from_topic.errors) == ("Allowed", ()), from_topic


def test_a_context_key_that_does_not_apply_to_the_action_is_reported_not_dropped() -> None:
    identity = _policy({"Sid": "Read", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"})
    (decision,) = iameval.evaluate(
        [_request("get", "s3:GetObject", identity, {"s3:prefix": "deployer/"}, resource="arn:aws:s3:::b/k")]
    )
    assert decision.allowed
    assert any("s3:prefix" in e for e in decision.errors), decision


def test_lint_flags_a_key_and_a_resource_the_action_does_not_take_and_passes_a_correct_policy() -> None:
    wrong = _policy(
        {
            "Sid": "PrefixOnGet",
            "Effect": "Allow",
            "Action": "s3:GetObject",
            "Resource": "arn:aws:s3:::b/deployer/*",
            "Condition": {"StringLike": {"s3:prefix": "deployer/*"}},
        },
        {"Sid": "QueueAsObject", "Effect": "Allow", "Action": "s3:GetObject", "Resource": QUEUE},
    )
    right = _policy(
        {"Sid": "Read", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/deployer/*"},
        {
            "Sid": "List",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": "arn:aws:s3:::b",
            "Condition": {"StringLike": {"s3:prefix": "deployer/*"}},
        },
        {
            "Sid": "UseOwnQueues",
            "Effect": "Allow",
            "Action": ["sqs:Receive*", "sqs:DeleteMessage"],
            "Resource": QUEUE,
            "Condition": {"StringEquals": {"aws:ResourceTag/deployer-owner": "${aws:userid}"}},
        },
    )
    problems = iameval.lint([("wrong", wrong, "identity"), ("right", right, "identity")])
    assert len(problems) == 2, problems
    assert any(p.startswith("wrong [PrefixOnGet]") and "s3:prefix" in p and "s3:GetObject" in p for p in problems)
    assert any(p.startswith("wrong [QueueAsObject]") and QUEUE in p and "s3:GetObject" in p for p in problems)
