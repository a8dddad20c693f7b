"""One publish across two regions and two accounts, with real agents in each: targets move as waves,
in order; a target that fails (its fleet, or its topic) rolls every moved target back."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from deployer.aws.clients import make_clients
from deployer.protocol.names import Channel
from deployer.protocol.targets import MoveState, RecordState, parse_record
from publisher.infra import init_resources
from publisher.rollout import EXIT_ROLLED_BACK
from tests.awsproxy import aws_proxy, sns_error
from tests.limits import Refuse
from tests.support import (
    FAST_AGENT,
    REGION,
    AgentProcess,
    Fleet,
    InstanceRole,
    artifact,
    cli,
    template_file,
    wait_until,
)

pytestmark = pytest.mark.moto_only("a second account through STS AssumeRole, and a second region")

API = Channel("prod", "web", "api")
OTHER_ACCOUNT, OTHER_REGION = "222222222222", "us-west-2"
CI_ROLE = f"arn:aws:iam::{OTHER_ACCOUNT}:role/deployer-ci"
EXTERNAL_ID = "fleet-deployer-test"
FAST = ("--heartbeat-ttl", "8", "--poll-interval", "0.3", "--timeout", "60")


@dataclass(frozen=True)
class Remote:
    """The second target: a bucket and topic in another account and region, and its instance role."""

    bucket: str
    topic_arn: str
    role: InstanceRole


def as_other_account(endpoint_url: str) -> boto3.session.Session:
    sts = boto3.client("sts", region_name=REGION, endpoint_url=endpoint_url)
    creds = sts.assume_role(RoleArn=CI_ROLE, RoleSessionName="setup", ExternalId=EXTERNAL_ID)["Credentials"]
    return boto3.session.Session(
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        region_name=OTHER_REGION,
    )


@pytest.fixture
def remote(fleet: Fleet) -> Remote:
    session = as_other_account(fleet.endpoint_url)
    made = init_resources(make_clients(OTHER_REGION, fleet.endpoint_url, session), "deploys-us-west", "deployer")
    iam = session.client("iam", endpoint_url=fleet.endpoint_url)
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
    }
    role = iam.create_role(RoleName="fleet-instance", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    return Remote(made.bucket, made.topic_arn, InstanceRole(fleet.endpoint_url, role["Arn"], role["RoleId"]))


def fleet_file(tmp_path: Path, fleet: Fleet, remote: Remote) -> Path:
    path = tmp_path / "fleet.yml"
    path.write_text(
        "targets:\n"
        f"  - {{name: east, region: {REGION}, bucket: {fleet.bucket}, topic: '{fleet.topic_arn}'}}\n"
        f"  - {{name: west, region: {OTHER_REGION}, bucket: {remote.bucket}, topic: '{remote.topic_arn}',\n"
        f"     role: '{CI_ROLE}', external_id: {EXTERNAL_ID}}}\n"
    )
    return path


def publish_everywhere(targets: Path, art: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = cli(
        "publish", "--targets", str(targets), "--stage", "prod", "--role", "web", "--component", "api",
        "--artifact", str(art), "--wait", *FAST, *extra, env=env,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def record_of(fleet: Fleet) -> dict[str, object]:
    listed = fleet.clients.s3.list_objects_v2(Bucket=fleet.bucket, Prefix=fleet.layout.targets_records_prefix(API))
    newest = max(o["Key"] for o in listed["Contents"])
    record = parse_record(fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=newest)["Body"].read())
    return {"state": record.state, **{name: (m.seq, m.state) for name, m in record.moves.items()}}


def first_apply(agent: AgentProcess, release: str) -> str:
    return min(str(e["timestamp"]) for e in agent.events("apply_succeeded") if e.get("release_id") == release)


def test_a_release_reaches_two_regions_and_accounts_in_order_and_a_failing_one_rolls_both_back(
    fleet: Fleet, remote: Remote, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    east = [start_agent(**FAST_AGENT) for _ in range(2)]
    west = [
        start_agent(
            role=remote.role, bucket=remote.bucket, topic_arn=remote.topic_arn, region=OTHER_REGION, **FAST_AGENT
        )
        for _ in range(2)
    ]
    targets = fleet_file(tmp_path, fleet, remote)
    code, out = publish_everywhere(targets, artifact(tmp_path, "v1", "v1"), "--release-id", "rel-1")
    assert code == 0, out
    assert "stored release rel-1 in 2 target(s)" in out
    assert "OK: prod/web/api release rel-1 is on every target (2)" in out
    assert all(a.served() == "v1" for a in [*east, *west])
    # West's wave starts once east's converged.
    assert max(first_apply(a, "rel-1") for a in east) < min(first_apply(a, "rel-1") for a in west)
    assert record_of(fleet) == {"state": RecordState.DONE, "east": (1, MoveState.PASSED), "west": (1, MoveState.PASSED)}
    seen = cli("status", "--targets", str(targets))
    assert "== east (us-east-1, 123456789012)" in seen.stdout, seen.stdout + seen.stderr
    assert "== west (us-west-2, 222222222222)" in seen.stdout
    assert seen.stdout.count("prod/web/api: 2/2 on seq 1, 0 failed") == 2
    page = tmp_path / "fleet.html"
    drawn = cli("status", "--targets", str(targets), "--html", str(page))
    assert drawn.returncode == 0, drawn.stderr
    assert page.read_text().count('<h2 class="target">') == 2
    assert "west (us-west-2, 222222222222)" in page.read_text()
    told = cli("history", "--targets", str(targets), "--stage", "prod", "--role", "web", "--component", "api", "--json")
    assert {name: doc["current_seq"] for name, doc in json.loads(told.stdout).items()} == {
        "east (us-east-1, 123456789012)": 1,
        "west (us-west-2, 222222222222)": 1,
    }
    swept = cli("gc", "releases", "--targets", str(targets), "--dry-run")
    assert swept.returncode == 0, swept.stderr
    assert "== west (us-west-2, 222222222222)" in swept.stdout

    flags = tmp_path / "flags"
    flags.mkdir()
    for agent in west:
        (flags / f"fail-{agent.instance_id}").touch()
    broken = template_file(tmp_path / "west-fails.yml", f'test ! -e "{flags}/fail-$DEPLOYER_INSTANCE_ID"')
    code, out = publish_everywhere(
        targets, artifact(tmp_path, "v2", "v2"), "--release-id", "rel-2", "--manifest", str(broken)
    )
    assert code == EXIT_ROLLED_BACK, out
    assert "[east] rolled back to rel-1 as seq 3" in out
    assert "[west] rolled back to rel-1 as seq 3" in out
    assert "ROLLED BACK: prod/web/api release rel-2 across targets: west (us-west-2, 222222222222):" in out
    wait_until(lambda: all(a.served() == "v1" for a in [*east, *west]), "every instance of both targets on rel-1")
    assert record_of(fleet) == {
        "state": RecordState.ROLLED_BACK,
        "east": (2, MoveState.ROLLED_BACK),
        "west": (2, MoveState.ROLLED_BACK),
    }
    shown = cli(
        "rollout", "status", "--targets", str(targets), "--stage", "prod", "--role", "web", "--component", "api"
    )
    assert "release rel-2 across 2 target(s): rolled_back" in shown.stdout, shown.stdout + shown.stderr
    assert "[west] west (us-west-2, 222222222222): seq 2 rolled_back; pointer at seq 3 (rel-1)" in shown.stdout


def test_a_topic_that_refuses_the_deploy_stops_the_waves_and_moves_the_first_region_back(
    fleet: Fleet, remote: Remote, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    east = [start_agent(**FAST_AGENT) for _ in range(2)]
    targets = fleet_file(tmp_path, fleet, remote)
    code, out = publish_everywhere(targets, artifact(tmp_path, "v1", "v1"), "--release-id", "rel-1")
    assert code == 0, out
    refused = Refuse(
        lambda call: (
            call.service == "sns" and call.action == "Publish" and call.params.get("TopicArn") == remote.topic_arn
        ),
        lambda: sns_error(403, "AuthorizationError", "User is not authorized to perform: SNS:Publish"),
    )
    with aws_proxy(fleet.endpoint_url, refused) as proxy:
        code, out = publish_everywhere(
            targets, artifact(tmp_path, "v2", "v2"), "--release-id", "rel-2", env={"AWS_ENDPOINT_URL": proxy.url}
        )
    assert code == EXIT_ROLLED_BACK, out
    assert refused.refused >= 1
    assert (
        "stopping: west (us-west-2, 222222222222): its topic refused the deploy (AwsError: AWS Publish failed: AuthorizationError"
        in out
    )
    assert "[east] rolled back to rel-1 as seq 3" in out
    assert "[west] rolled back to rel-1 as seq 3" in out
    wait_until(lambda: all(a.served() == "v1" for a in east), "the first region back on rel-1")
    assert record_of(fleet) == {
        "state": RecordState.ROLLED_BACK,
        "east": (2, MoveState.ROLLED_BACK),
        "west": (2, MoveState.ROLLED_BACK),
    }


def test_a_publish_whose_driver_died_between_targets_is_resumed_from_its_record(
    fleet: Fleet, remote: Remote, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    east = [start_agent(**FAST_AGENT) for _ in range(2)]
    west = start_agent(
        role=remote.role, bucket=remote.bucket, topic_arn=remote.topic_arn, region=OTHER_REGION, **FAST_AGENT
    )
    targets = fleet_file(tmp_path, fleet, remote)
    args = ["publish", "--targets", str(targets), "--stage", "prod", "--role", "web", "--component", "api",
            "--artifact", str(artifact(tmp_path, "v1", "v1")), "--release-id", "rel-1", "--wait", *FAST]  # fmt: skip
    driver = subprocess.Popen([sys.executable, "-m", "deployer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _has_record(fleet) and "east" in record_of(fleet), "east to be moved")
    finally:
        driver.kill()  # CI dies with east moved and west untouched
        driver.communicate(timeout=10)
    assert "west" not in record_of(fleet)
    resumed = cli("rollout", "resume", "--targets", str(targets), "--stage", "prod", "--role", "web",
                  "--component", "api", "--wait", *FAST)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert record_of(fleet) == {"state": RecordState.DONE, "east": (1, MoveState.PASSED), "west": (1, MoveState.PASSED)}
    assert all(a.served() == "v1" for a in [*east, west])


def _has_record(fleet: Fleet) -> bool:
    listed = fleet.clients.s3.list_objects_v2(Bucket=fleet.bucket, Prefix=fleet.layout.targets_records_prefix(API))
    return bool(listed.get("Contents"))
