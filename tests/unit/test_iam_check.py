"""The suite's IAM check (tests/iam_check.py) judges each call in the account it was made in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from publisher.iam_model import Role
from tests import iameval
from tests.iam_check import check

TEST = "tests/e2e/test_example.py::test_a_publish_across_targets"
HOME, OTHER = "123456789012", "222222222222"
TARGET_ROLE = f"arn:aws:iam::{OTHER}:role/deployer-ci-west"
SESSION = {
    "UserId": "AROATARGETROLE0000001:deployer-ci",
    "Arn": f"arn:aws:sts::{OTHER}:assumed-role/deployer-ci-west/deployer-ci",
    "Account": OTHER,
}
TOPICS = {"east": f"arn:aws:sns:us-east-1:{HOME}:deployer", "west": f"arn:aws:sns:us-west-2:{OTHER}:deployer"}


@pytest.fixture(autouse=True)
def _evaluator_installed() -> None:
    reason = iameval.available()
    if reason is not None:
        pytest.skip(reason)


def call(when: float, target: str, service: str, operation: str, **params: Any) -> dict[str, Any]:
    """A CI call as tests/iam_record.py writes it: target east with the job's own credentials,
    west as the target role it assumed."""
    return {
        "test": TEST,
        "role": "ci",
        "service": service,
        "operation": operation,
        "region": "us-east-1" if target == "east" else "us-west-2",
        "params": params,
        "caller": {} if target == "east" else SESSION,
        "scope": None,
        "command": "publish",
        "time": when,
        "error": "",
        "status": 200,
    }


def test_a_publish_across_targets_is_judged_at_home_even_when_a_target_account_is_named_first(
    tmp_path: Path,
) -> None:
    """`publish --targets` stores to its targets in parallel: the other account's bucket and topic
    may be recorded before the first target's, and must not become the home deployment's."""
    records = [call(1.0, "east", "sts", "AssumeRole", RoleArn=TARGET_ROLE, ExternalId="fleet-deployer")]
    for when, target in ((2.0, "west"), (3.0, "east")):
        bucket = f"deploys-{target}"
        records += [
            call(when, target, "s3", "HeadBucket", Bucket=bucket),
            call(when + 0.1, target, "sns", "GetTopicAttributes", TopicArn=TOPICS[target]),
            call(
                when + 0.2,
                target,
                "s3",
                "PutObject",
                Bucket=bucket,
                Key="deployer/releases/api/r1/manifest.yml",
                IfNoneMatch="*",
            ),
        ]
    (tmp_path / "calls-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    outcome = check(tmp_path)
    assert outcome.failures == []
    # Every call was judged (none set aside), each as at least one IAM request.
    assert (sum(outcome.not_evaluated.values()), outcome.requests[Role.CI] >= len(records)) == (0, True)
