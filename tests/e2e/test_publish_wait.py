"""`deployer publish --wait` and `deployer status` with real agent subprocesses on the emulator."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from deployer.aws.clients import make_clients
from deployer.aws.reports import ReportReader
from deployer.protocol.deploy import Deploy
from deployer.protocol.layout import Layout
from deployer.protocol.manifest import Manifest, SyncStrategy
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState
from publisher.pack import artifact_file
from publisher.publish import Publisher
from publisher.wait import EXIT_CONVERGED, EXIT_FAILED, EXIT_TIMEOUT, Convergence, Waiter, WaitOptions
from tests.support import (
    BUCKET,
    FAST_AGENT,
    REGION,
    AgentProcess,
    Fleet,
    add_file,
    cli,
    kill_hard,
    kill_pid_file,
    make_tree,
    publish_args,
    tar_bytes,
    template_file,
    wait_until,
)

FAST_WAIT = ("--wait", "--poll-interval", "0.3")


def status_rows(component: str = "api") -> list[dict[str, object]]:
    result = cli("status", "--bucket", BUCKET, "--component", component, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["instances"]  # type: ignore[no-any-return]


def test_publish_wait_exits_zero_when_every_live_instance_converged(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent(**FAST_AGENT) for _ in range(2)]
    build = make_tree(tmp_path / "build", {"index.html": "waited for"})
    result = cli(*publish_args(fleet, build, *FAST_WAIT, "--timeout", "30", "--heartbeat-ttl", "20"))
    assert result.returncode == EXIT_CONVERGED, result.stdout + result.stderr
    assert "as seq 1" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "OK: 2/2 converged on seq 1"
    # Not a TTY: plain progress lines, no carriage returns.
    assert "\r" not in result.stdout
    assert "prod/web/api seq 1: 2/2 converged, 0 failed, 0 lost, 0 pending" in result.stdout
    assert all(a.served() == "waited for" for a in agents)
    rows = status_rows()
    assert [(r["state"], r["seq"]) for r in rows] == [("ok", 1), ("ok", 1)]
    assert all(r["agent_version"] and r["deploy_id"] and not r["stale"] for r in rows)


def test_publish_wait_exits_four_on_a_failed_hook_and_status_shows_the_error_and_output(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(**FAST_AGENT)
    build = make_tree(tmp_path / "build", {"index.html": "broken"})
    template = template_file(tmp_path / "deploy.yml", "echo migration exploded >&2; exit 3")
    result = cli(
        *publish_args(fleet, build, "--manifest", str(template), *FAST_WAIT, "--timeout", "30", "--heartbeat-ttl", "20")
    )
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    assert f"{agent.instance_id}: failed" in result.stdout
    assert "FAILED: 0/1 converged on seq 1, 1 failed or lost" in result.stdout
    [row] = status_rows()
    assert row["state"] == "failed"
    assert row["seq"] == 1
    assert row["error"]
    assert "migration exploded" in str(row["output_tail"])
    table = cli("status", "--bucket", BUCKET)
    assert "prod/web/api: 0/1 on seq 1, 1 failed" in table.stdout


def test_publish_wait_exits_five_when_the_timeout_runs_out_first(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(**FAST_AGENT)
    build = make_tree(tmp_path / "build", {"index.html": "slow"})
    template = template_file(tmp_path / "deploy.yml", "sleep 4")
    result = cli(
        *publish_args(fleet, build, "--manifest", str(template), *FAST_WAIT, "--timeout", "1", "--heartbeat-ttl", "30")
    )
    assert result.returncode == EXIT_TIMEOUT, result.stdout + result.stderr
    assert f"{agent.instance_id}: pending" in result.stdout
    assert "TIMEOUT after 1s: 0/1 converged on seq 1, 1 pending" in result.stdout


def test_an_instance_that_dies_mid_deploy_is_reported_lost_and_fails_the_wait(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    healthy = start_agent(**FAST_AGENT)
    doomed = start_agent(**FAST_AGENT)
    pid_file = tmp_path / "hook.pid"
    # Only the doomed instance's hook hangs (and records its pid so the test can clean it up).
    hang = f'if [ "$DEPLOYER_INSTANCE_ID" = {doomed.instance_id} ]; then echo $$ > {pid_file}; exec sleep 30; fi'
    template = template_file(tmp_path / "deploy.yml", hang)
    build = make_tree(tmp_path / "build", {"index.html": "v1"})
    args = publish_args(
        fleet, build, "--manifest", str(template), *FAST_WAIT, "--timeout", "40", "--heartbeat-ttl", "3"
    )
    waiting = subprocess.Popen(
        [sys.executable, "-m", "deployer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ),
    )  # fmt: skip
    try:
        wait_until(
            lambda: doomed.component().state is ComponentState.APPLYING and pid_file.exists(), "the hook to hang"
        )
        kill_hard(doomed)
        out, err = waiting.communicate(timeout=30)
    finally:
        kill_pid_file(pid_file)
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == EXIT_FAILED, out + err
    assert f"{doomed.instance_id}: lost: no heartbeat since" in out
    assert "FAILED: 1/2 converged on seq 1, 1 failed or lost" in out
    assert healthy.on_seq(1)
    # The dead instance shows as stale in the fleet view, still "applying".
    doomed_row = next(r for r in status_rows() if r["instance_id"] == doomed.instance_id)
    assert doomed_row["state"] == "applying"


def test_a_rejected_release_is_reported_rejected_by_status_and_wait(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(**FAST_AGENT)
    # `deployer publish` refuses unsafe archives, so publish one past it (an `Artifact` that claims
    # to be checked), as a hostile bucket writer could.
    path = tmp_path / "evil.tar.gz"
    path.write_bytes(tar_bytes(lambda archive: add_file(archive, "../escape.txt", b"x")))
    unchecked = artifact_file(path)
    publisher = Publisher(fleet.clients, BUCKET, fleet.topic_arn, fleet.layout)
    deploy: Deploy = publisher.publish(
        Channel("prod", "web", "api"),
        dataclasses.replace(unchecked, checked=True),
        template=Manifest(sync_strategy=SyncStrategy.SYMLINK),
        release_id="evil",
    ).deploy
    waiter = Waiter(
        ReportReader(make_clients(REGION, fleet.endpoint_url).s3, BUCKET, Layout(), "prod", "web"),
        WaitOptions(timeout_s=30, heartbeat_ttl_s=20, poll_s=0.3),
    )
    result = waiter.wait(deploy, lambda _progress: None)
    assert result.exit_code == EXIT_FAILED
    assert result.progress.outcomes == {agent.instance_id: Convergence.REJECTED}
    [row] = status_rows()
    assert row["state"] == "rejected"
    assert ".." in str(row["error"])
