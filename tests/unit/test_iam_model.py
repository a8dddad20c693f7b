"""The IAM model (`publisher.iam_model`): complete for the code as written, and right about the
dependent actions only the API reference names."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path
from typing import Any

import boto3
import pytest

from publisher.iam_model import (
    ABORT_ON_FAILURE,
    ABSENCE_NEEDS_LIST,
    OPERATIONS,
    TAG_ON_CREATE,
    Call,
    Need,
    UnknownOperation,
    needs,
)

REPO = Path(__file__).parents[2]
#: The clients the product builds (deployer/aws/clients.py).
SERVICES = ("s3", "sqs", "sns", "sts", "kms", "autoscaling", "cloudwatch", "iam")
#: Calls made for the product by s3transfer (uploads: single, multipart, and the abort of a failed one).
TRANSFER = {("s3", op) for op in ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")}
TRANSFER |= {("s3", "AbortMultipartUpload")}
#: Method names the sweep finds that are not AWS calls, with what they are.
NOT_AWS = {"verify": "cryptography's public-key verify: agents verify signatures offline, never with kms:Verify"}


def product_sources() -> list[Path]:
    return sorted((REPO / "deployer").rglob("*.py")) + sorted((REPO / "publisher").rglob("*.py"))


def test_every_client_method_the_product_code_names_is_in_the_model() -> None:
    """A static sweep, so an operation no test exercises still cannot reach a fleet unmodelled."""
    defined = {
        node.name
        for path in product_sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
    }
    named = set()
    for path in product_sources():
        text = path.read_text()
        named |= set(re.findall(r"\.([a-z][a-z0-9_]+)\b", text))
        named |= set(re.findall(r"""(?:get_paginator|generate_presigned_url)\(\s*["']([a-z0-9_]+)["']""", text))
    used = set(TRANSFER)
    for service in SERVICES:
        session = boto3.session.Session(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        client: Any = session.client(service)  # type: ignore[call-overload]
        mapping = client.meta.method_to_api_mapping
        used |= {(service, mapping[name]) for name in (named - defined - set(NOT_AWS)) & set(mapping)}
        client.close()
    assert sorted(used - set(OPERATIONS)) == []
    assert ("sqs", "CreateQueue") in used  # the sweep sees what it should


def call(service: str, operation: str, **params: object) -> Call:
    return Call(service, operation, params, "us-east-1", "123456789012")


def test_a_tagged_create_queue_also_needs_tag_queue_with_the_request_tags() -> None:
    found = needs(call("sqs", "CreateQueue", QueueName="q", tags={"deployer-owner": "AROA:i-1"}))
    assert [n.action for n in found] == ["sqs:CreateQueue", "sqs:TagQueue"]
    assert found[1].why == TAG_ON_CREATE
    assert found[1].context == {"aws:RequestTag/deployer-owner": "AROA:i-1", "aws:TagKeys": ("deployer-owner",)}
    assert [n.action for n in needs(call("sqs", "CreateQueue", QueueName="q"))] == ["sqs:CreateQueue"]


def test_a_multipart_upload_needs_the_abort_that_s3transfer_runs_when_it_fails() -> None:
    found = needs(call("s3", "CreateMultipartUpload", Bucket="b", Key="k"))
    assert Need("s3:AbortMultipartUpload", "arn:aws:s3:::b/k", why=ABORT_ON_FAILURE) in found


def test_a_read_that_found_nothing_needs_the_list_that_makes_it_a_404() -> None:
    found = needs(Call("s3", "GetObject", {"Bucket": "b", "Key": "p/k"}, "us-east-1", "1", missing=True))
    assert found[1] == Need("s3:ListBucket", "arn:aws:s3:::b", {"s3:prefix": "p/k"}, ABSENCE_NEEDS_LIST)
    assert len(needs(call("s3", "GetObject", Bucket="b", Key="p/k"))) == 1


def test_conditional_writes_carry_their_condition_keys() -> None:
    [put] = needs(call("s3", "PutObject", Bucket="b", Key="k", IfNoneMatch="*"))
    assert put.context == {"s3:if-none-match": "*"}


def test_a_call_the_model_does_not_know_is_refused_by_name() -> None:
    with pytest.raises(UnknownOperation, match="sqs PurgeQueue is not in the IAM model"):
        needs(call("sqs", "PurgeQueue", QueueUrl="https://sqs/1/q"))


def test_every_instance_option_only_adds_statements_so_a_policy_is_the_union_of_its_options_by_sid() -> None:
    """What lets the Terraform module compose the instance policy from one template per option,
    rendered as scripts/terraform-policies renders them: the union by Sid of any of them is the
    policy of all those options at once, and a Sid is written the same way wherever it appears."""
    from publisher.iam import Audience, Scope, policy_for

    group = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/web/0123456789abcdef"
    base: dict[str, Any] = {
        "bucket": "b", "topic_arn": "arn:aws:sns:eu-west-1:123456789012:deployer", "stage": "prod", "role": "web",
    }  # fmt: skip
    # Each template: the options it is printed with (scripts/terraform-policies).
    templates: dict[str, dict[str, Any]] = {
        "instance": {},
        "instance-deregister": {"deregister": True},
        "instance-traffic": {"target_groups": (group,)},
        "instance-hook": {"asg_name": "web"},
        "instance-terminate": {"asg_name": "web", "terminate": True},
        "instance-protect": {"asg_name": "web", "protect": True},
        "instance-parameters": {"secrets": ("arn:aws:ssm:eu-west-1:123456789012:parameter/prod/db",)},
        "instance-secrets": {"secrets": ("arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/api-AbCdEf",)},
    }
    # What the module's variables ask for together: the group named, the launch hook on.
    together = {"asg_name": "web", "lifecycle": True}
    rendered = {
        name: policy_for(Audience.INSTANCE, Scope(**base, **opts))["Statement"] for name, opts in templates.items()
    }
    for chosen in itertools.chain.from_iterable(itertools.combinations(list(templates)[1:], n) for n in range(1, 8)):
        union: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for name in ("instance", *chosen):
            options |= {k: options.get(k, ()) + v if k == "secrets" else v for k, v in templates[name].items()}
            for statement in rendered[name]:
                assert union.setdefault(statement["Sid"], statement) == statement, (chosen, statement["Sid"])
        if "asg_name" in options:
            options |= together if "instance-hook" in chosen else {}
        whole = policy_for(Audience.INSTANCE, Scope(**base, **options))["Statement"]
        assert {s["Sid"]: s for s in whole} == union, chosen
