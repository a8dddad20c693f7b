"""`deployer doctor` against IAM's policy simulator (a loopback fake answering from the suite's
independent evaluator, tests/iam_fake.py): what it finds, what it prints, and that it changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from click.testing import CliRunner, Result

from deployer.cli import main
from deployer.cli.fleet import DOCTOR_DENIED_EXIT
from deployer.local.emulator import Emulator
from publisher.iam import Audience, Scope, policy_for
from tests import iameval
from tests.iam_fake import FakeSimulator, serve_simulator
from tests.support import REGION

ACCOUNT = "123456789012"
TOPIC = f"arn:aws:sns:{REGION}:{ACCOUNT}:deployer"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/fleet-instance"
SCOPE = ("--bucket", "fleet-deploys", "--topic-arn", TOPIC, "--stage", "prod", "--role", "web")


@pytest.fixture
def simulator(aws_env: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSimulator]:
    """The fake simulator as IAM's endpoint; the emulator (`aws_env`) answers STS."""
    assert aws_env.url
    reason = iameval.available()
    if reason is not None:
        pytest.skip(reason)
    with serve_simulator() as fake:
        monkeypatch.setenv("AWS_ENDPOINT_URL_IAM", fake.url)
        yield fake


def doctor(*args: str) -> Result:
    return CliRunner().invoke(main, ["doctor", *args])


def instance_policy(**narrowing: Any) -> dict[str, Any]:
    scope = Scope(bucket="fleet-deploys", topic_arn=TOPIC, stage="prod", role="web", **narrowing)
    return policy_for(Audience.INSTANCE, scope)


def test_a_role_with_the_generated_policy_passes_and_only_the_simulator_was_asked(simulator: FakeSimulator) -> None:
    simulator.policies[ROLE] = [instance_policy()]
    result = doctor("--for", "instance", "--principal", ROLE, *SCOPE)
    assert result.exit_code == 0, result.output
    assert "permissions the instance role needs are allowed" in result.output
    assert set(simulator.actions) == {"SimulatePrincipalPolicy"}


def test_yesterdays_instance_policy_is_caught_with_the_statement_that_fixes_it(simulator: FakeSimulator) -> None:
    """The policy every earlier release printed: CreateQueue without TagQueue, so no instance boots."""
    policy = instance_policy()
    for statement in policy["Statement"]:
        if statement["Sid"] == "CreateQueuesTaggedAsOwn":
            statement["Action"] = ["sqs:CreateQueue"]
    simulator.policies[ROLE] = [policy]
    result = doctor("--for", "instance", "--principal", ROLE, *SCOPE)
    assert result.exit_code == DOCTOR_DENIED_EXIT, result.output
    denied = [line for line in result.output.splitlines() if line.startswith("DENIED")]
    assert denied
    assert all("sqs:TagQueue" in line for line in denied)
    assert "sqs:CreateQueue with tags also needs sqs:TagQueue" in denied[0]
    fix = next(line for line in result.output.splitlines() if line.startswith("  add "))
    assert "--for instance --stage prod --role web" in fix
    assert json.loads(fix.split(": ", 1)[1])["Sid"] == "CreateQueuesTaggedAsOwn"


def test_a_role_with_no_permissions_lists_every_missing_action_and_changes_nothing(simulator: FakeSimulator) -> None:
    simulator.policies[ROLE] = [{"Version": "2012-10-17", "Statement": []}]
    result = doctor("--for", "ci", "--principal", ROLE, "--bucket", "fleet-deploys", "--topic-arn", TOPIC)
    assert result.exit_code == DOCTOR_DENIED_EXIT, result.output
    denied = {line.split()[2] for line in result.output.splitlines() if line.startswith("DENIED")}
    expected = {a for s in policy_for(Audience.CI, Scope("fleet-deploys", TOPIC))["Statement"] for a in s["Action"]}
    assert denied == expected
    assert result.output.count("  add (from `deployer iam-policy --for ci`)") == result.output.count("DENIED")
    assert set(simulator.actions) == {"SimulatePrincipalPolicy"}


def test_a_principal_iam_does_not_know_is_a_clear_error(simulator: FakeSimulator) -> None:
    result = doctor("--for", "gc", "--principal", f"arn:aws:iam::{ACCOUNT}:role/nobody", *SCOPE[:4])
    assert simulator.actions == ["SimulatePrincipalPolicy"]
    assert result.exit_code == 1
    assert "NoSuchEntity" in result.output
    assert "nobody" in result.output


def test_a_principal_that_is_not_a_role_or_user_arn_is_refused_before_any_call(simulator: FakeSimulator) -> None:
    result = doctor("--for", "gc", "--principal", "fleet-instance", *SCOPE[:4])
    assert result.exit_code != 0
    assert "--principal 'fleet-instance' is not an IAM role or user ARN" in result.output
    assert simulator.actions == []


def test_without_principal_doctor_examines_the_role_behind_the_callers_session(
    simulator: FakeSimulator, aws_env: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    iam = boto3.client("iam", region_name=REGION, endpoint_url=aws_env.url)
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
    role = iam.create_role(RoleName="deployer-gc", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    sts = boto3.client("sts", region_name=REGION, endpoint_url=aws_env.url)
    creds = sts.assume_role(RoleArn=role, RoleSessionName="gc-job")["Credentials"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["SecretAccessKey"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", creds["SessionToken"])
    simulator.policies[role] = [policy_for(Audience.GC, Scope("fleet-deploys", TOPIC))]
    result = doctor("--for", "gc", "--bucket", "fleet-deploys", "--topic-arn", TOPIC)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith(f"{role}: all ")
