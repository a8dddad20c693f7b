"""Secrets at deploy time: a real agent resolves the SSM parameter and the Secrets Manager secret
its manifest names (moto over HTTP), gives them to its hooks only, and never writes a value
anywhere else: not its log, the status report, the ledger or an error text, even when a hook
prints it and fails. A secret that does not exist is `failed` by name, and the release runs on.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from deployer.protocol.manifest import Commands, Hook, Manifest, SecretRef, SecretSource, SyncStrategy
from deployer.protocol.report import ComponentState
from tests.support import REGION, AgentProcess, Fleet, artifact, cli, publish_args, wait_until

pytestmark = pytest.mark.moto_only(reason="SSM parameters and Secrets Manager: not in the LocalStack services run here")

PASSWORD = "pw-5f1c9e0a-never-logged"
TOKEN = "tok-7a1e44b2-never-logged"
SECRETS = {
    "DB_PASSWORD": SecretRef(SecretSource.SSM, "/prod/web/db_password"),
    "API_TOKEN": SecretRef(SecretSource.SECRETS_MANAGER, "prod/web/api", key="token", file="secrets/token"),
}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def template(path: Path, *post: str, secrets: dict[str, SecretRef] = SECRETS) -> Path:
    manifest = Manifest(
        dest="/opt/api/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(post=tuple(Hook(run) for run in post)),
        secrets=secrets,
    )
    path.write_text(manifest.to_yaml())
    return path


def everything_written(agent: AgentProcess, fleet: Fleet) -> str:
    """The agent's log, its status report, its state directory and its DLQ, as text."""
    parts = [agent.log_path.read_text()]
    status = fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=fleet.layout.status_key(agent.who))
    parts.append(status["Body"].read().decode())
    parts += [p.read_text(errors="replace") for p in Path(agent.config["state_dir"]).rglob("*") if p.is_file()]
    dlq = fleet.clients.sqs.receive_message(QueueUrl=agent.queue_url("--dlq"), MaxNumberOfMessages=10)
    parts += [json.dumps(m) for m in dlq.get("Messages", [])]
    return "\n".join(parts)


def test_a_hook_gets_its_secrets_and_no_value_is_ever_written_anywhere_else(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    boto3.client("ssm", region_name=REGION, endpoint_url=fleet.endpoint_url).put_parameter(
        Name="/prod/web/db_password", Value=PASSWORD, Type="SecureString"
    )
    boto3.client("secretsmanager", region_name=REGION, endpoint_url=fleet.endpoint_url).create_secret(
        Name="prod/web/api", SecretString=json.dumps({"token": TOKEN, "other": "x"})
    )
    agent = start_agent(heartbeat_interval_seconds=1)
    # The manifest names the secrets, never holds them: the hooks check the values by digest.
    good = template(
        tmp_path / "good.yml",
        f'test "$(printf %s "$DB_PASSWORD" | sha256sum | cut -c1-64)" = {sha256(PASSWORD)}',
        f'test "$(sha256sum < "$API_TOKEN" | cut -c1-64)" = {sha256(TOKEN)}',
        'echo "connecting with $DB_PASSWORD"',  # a hook that prints a secret
    )
    assert cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--manifest", str(good))).returncode == 0
    wait_until(lambda: agent.on_seq(1), "v1 applied with its secrets")
    token_file = agent.root / "opt/api/current/secrets/token"
    assert token_file.read_text() == TOKEN
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o400
    # A release whose hook prints both secrets, then fails: its output tail is reported.
    bad = template(tmp_path / "bad.yml", 'echo "leak $DB_PASSWORD $(cat "$API_TOKEN")"; exit 3')
    assert cli(*publish_args(fleet, artifact(tmp_path, "v2", "v2"), "--manifest", str(bad))).returncode == 0
    wait_until(lambda: agent.component().state is ComponentState.FAILED, "v2 to fail")
    assert "leak *** ***" in (agent.component().output_tail or "")
    assert agent.served() == "v1"
    written = everything_written(agent, fleet)
    assert PASSWORD not in written
    assert TOKEN not in written


def test_a_secret_that_does_not_exist_fails_the_deploy_by_name_and_the_release_runs_on(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(heartbeat_interval_seconds=1)
    assert (
        cli(
            *publish_args(
                fleet,
                artifact(tmp_path, "v1", "v1"),
                "--manifest",
                str(template(tmp_path / "v1.yml", "true", secrets={})),
            )
        ).returncode
        == 0
    )
    wait_until(lambda: agent.on_seq(1), "v1")
    missing = template(
        tmp_path / "v2.yml", "true", secrets={"DB_PASSWORD": SecretRef(SecretSource.SSM, "/prod/web/nope")}
    )
    assert cli(*publish_args(fleet, artifact(tmp_path, "v2", "v2"), "--manifest", str(missing))).returncode == 0
    wait_until(lambda: agent.component().state is ComponentState.FAILED, "v2 to fail")
    assert "SSM parameter(s) /prod/web/nope do not exist" in (agent.component().error or "")
    assert agent.served() == "v1"
    assert agent.alive()
    assert not agent.events("hook_started")[1:]  # v2 ran no hook, not even a failure hook


def test_a_rotated_secret_reaches_the_running_release_through_its_hooks_on_refresh(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    ssm = boto3.client("ssm", region_name=REGION, endpoint_url=fleet.endpoint_url)
    ssm.put_parameter(Name="/prod/web/db_password", Value=PASSWORD, Type="SecureString")
    agent = start_agent(heartbeat_interval_seconds=1)
    record = 'printf %s "$DB_PASSWORD" | sha256sum | cut -c1-64 >> "$DEPLOYER_RELEASE_DIR/../../digests.log"'
    secrets = {"DB_PASSWORD": SECRETS["DB_PASSWORD"]}
    manifest = template(tmp_path / "v1.yml", record, secrets=secrets)
    assert cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--manifest", str(manifest))).returncode == 0
    wait_until(lambda: agent.on_seq(1), "v1 applied")
    ssm.put_parameter(Name="/prod/web/db_password", Value=PASSWORD + "-rotated", Type="SecureString", Overwrite=True)
    refreshed = subprocess.run(
        [*agent.command("agent"), "--refresh-secrets"], capture_output=True, text=True, timeout=60, check=False
    )
    assert refreshed.returncode == 0, refreshed.stderr
    assert "refreshed the secrets of prod/web/api" in refreshed.stdout
    digests = (agent.root / "opt/api/digests.log").read_text().split()
    assert digests == [sha256(PASSWORD), sha256(PASSWORD + "-rotated")]
    assert agent.on_seq(1)  # the running deploy is what it was; only its hooks ran again
    assert PASSWORD not in refreshed.stdout + refreshed.stderr
