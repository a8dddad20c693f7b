"""Staged rollouts against the emulator with real agent subprocesses: waves in order, automatic
rollback on failures, a dead driver that freezes the fleet, resume, supersede, a new instance
mid-rollout, and a forged cursor."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import boto3

from deployer.aws.s3 import read_pointer
from deployer.protocol.deploy import Deploy
from deployer.protocol.layout import ReportKey
from deployer.protocol.names import Channel
from deployer.protocol.rollout import PRE_AUTHORISED, Cursor, RolloutState, parse_cursor
from publisher.rollout import EXIT_ROLLED_BACK
from tests.support import REGION, AgentProcess, Fleet, artifact, cli, kill_hard, publish_args, template_file, wait_until

API = Channel("prod", "web", "api")
#: Agents heartbeat every second, so the driver's view of the fleet is fresh.
FLEET = {"heartbeat_interval_seconds": 1}
FAST = ("--heartbeat-ttl", "8", "--poll-interval", "0.3", "--timeout", "120")


def staged(fleet: Fleet, tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(*publish_args(fleet, artifact(tmp_path, name, name), "--wait", *FAST, *extra))


def driving(fleet: Fleet, tmp_path: Path, name: str, *extra: str) -> subprocess.Popen[str]:
    """`publish --waves 1,100% --wait` in the background: the driver, while the test changes the world."""
    args = publish_args(fleet, artifact(tmp_path, name, name), "--waves", "1,100%", "--wait", *FAST, *extra)
    command = [sys.executable, "-m", "deployer", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def current(fleet: Fleet) -> Deploy:
    pointer = read_pointer(fleet.clients.s3, fleet.bucket, fleet.layout, API)
    assert pointer is not None
    return pointer.deploy


def read_cursor(fleet: Fleet, deploy: Deploy) -> Cursor:
    body = fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=fleet.layout.cursor_key(API, deploy.deploy_id))["Body"]
    return parse_cursor(body.read(), deploy.deploy_id)


def apply_times(agent: AgentProcess, deploy_id: str) -> list[str]:
    return [e["timestamp"] for e in agent.events("apply_succeeded") if e.get("deploy_id") == deploy_id]


def test_a_good_release_walks_every_wave_in_order_and_a_failing_one_rolls_back_by_itself(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent(**FLEET) for _ in range(10)]
    first = cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", *FAST))
    assert first.returncode == 0, first.stdout + first.stderr
    good = staged(fleet, tmp_path, "v2", "--waves", "1,30%,100%", "--bake", "1")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "OK: rollout of prod/web/api seq 2 done in 3 waves" in good.stdout
    deploy = current(fleet)
    plan = deploy.rollout
    assert plan is not None
    assert all(agent.served() == "v2" for agent in agents)
    # No instance applied the candidate before every instance of the waves before it had.
    waves = {agent.instance_id: plan.wave_of(deploy.deploy_id, agent.instance_id or "") for agent in agents}
    done = {agent.instance_id: min(apply_times(agent, deploy.deploy_id)) for agent in agents}
    for wave in range(1, plan.last_wave + 1):
        earlier = [t for i, t in done.items() if waves[i] < wave]
        later = [t for i, t in done.items() if waves[i] == wave]
        if earlier and later:
            assert max(earlier) < min(later), (wave, waves, done)

    broken = template_file(tmp_path / "broken.yml", "exit 3")
    bad = staged(fleet, tmp_path, "v3", "--manifest", str(broken), "--waves", "1,50%,100%", "--max-failed", "0")
    assert bad.returncode == EXIT_ROLLED_BACK, bad.stdout + bad.stderr
    assert "ROLLED BACK: prod/web/api seq 3: 1 failed, 0 tolerated" in bad.stdout
    rolled = current(fleet)
    assert rolled.rollout is not None
    assert rolled.rollout.stable.release_id == deploy.release_id
    wait_until(lambda: all(agent.served() == "v2" for agent in agents), "every instance back on stable")
    tried = [a for a in agents if any(e.get("deploy_id") == rolled.deploy_id for e in a.events("apply_started"))]
    assert [a.instance_id for a in tried] == list(rolled.rollout.first)  # only wave 0 ever tried it


def test_a_dead_driver_freezes_the_fleet_a_new_instance_follows_its_wave_and_resume_finishes(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent(**FLEET) for _ in range(4)]
    assert cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", *FAST)).returncode == 0
    # The driver's CI job dies right after publishing: the cursor stays at wave 0, leased for 2 s.
    started = cli(*publish_args(fleet, artifact(tmp_path, "v2", "v2"), "--waves", "1,100%", "--lease", "2"))
    assert started.returncode == 0, started.stderr
    assert "rollout started at wave 0 of 1" in started.stdout
    deploy = current(fleet)
    assert deploy.rollout is not None
    [chosen] = deploy.rollout.first
    by_id = {a.instance_id: a for a in agents}
    wait_until(lambda: by_id[chosen].served() == "v2", "wave 0 to apply the candidate")
    others = [a for a in agents if a.instance_id != chosen]
    wait_until(lambda: all(a.component().state.value == "waiting" for a in others), "the others to wait")
    assert all(a.served() == "v1" for a in others)
    # A new instance booting now lands on the release of its wave: stable, it is not admitted yet.
    late = start_agent(**FLEET)
    wait_until(lambda: late.component().state.value == "waiting", "the new instance to hold stable")
    assert late.served() == "v1"
    status = cli("rollout", "status", "--bucket", fleet.bucket, "--topic-arn", fleet.topic_arn,
                 "--stage", "prod", "--role", "web", "--component", "api")  # fmt: skip
    assert "rolling at wave 0/1" in status.stdout, status.stdout + status.stderr
    assert "wave 0 (1): 1 instance(s), 1 ok, 0 failed, 0 waiting" in status.stdout, status.stdout
    assert "wave 1 (100%): 4 instance(s), 0 ok, 0 failed, 4 waiting" in status.stdout, status.stdout
    fleet_view = cli("status", "--bucket", fleet.bucket)
    assert "waiting (wave 1)" in fleet_view.stdout, fleet_view.stdout
    assert "1/5 on seq 2, 0 failed, 4 waiting for their wave" in fleet_view.stdout
    cursor = read_cursor(fleet, deploy)
    assert (cursor.state, cursor.wave) == (RolloutState.ROLLING, 0)  # frozen: nobody advances it
    time.sleep(max(0.0, (cursor.lease_until - datetime.now(UTC)).total_seconds()) + 1)  # the dead driver's lease lapses
    resumed = cli("rollout", "resume", "--bucket", fleet.bucket, "--topic-arn", fleet.topic_arn,
                  "--stage", "prod", "--role", "web", "--component", "api", *FAST)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert all(agent.served() == "v2" for agent in [*agents, late])


def test_a_newer_publish_supersedes_a_rollout_in_flight(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent(**FLEET) for _ in range(3)]
    assert cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", *FAST)).returncode == 0
    driver = driving(fleet, tmp_path, "v2", "--bake", "60")
    wait_until(lambda: current(fleet).rollout is not None, "the staged deploy")
    newer = cli(*publish_args(fleet, artifact(tmp_path, "v3", "v3"), "--wait", *FAST))
    assert newer.returncode == 0, newer.stdout + newer.stderr
    out, err = driver.communicate(timeout=60)
    assert driver.returncode == 7, out + err
    assert "SUPERSEDED" in out
    assert all(agent.served() == "v3" for agent in agents)


def test_an_alarm_in_alarm_rolls_the_rollout_back_and_scale_in_never_blocks_a_wave(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent(**FLEET) for _ in range(3)]
    assert cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", *FAST)).returncode == 0
    # Scale-in mid-rollout: an instance dies during wave 0's bake; wave 1 goes on without it.
    driver = driving(fleet, tmp_path, "v2", "--bake", "3")
    wait_until(lambda: current(fleet).rollout is not None, "the staged deploy")
    deploy = current(fleet)
    assert deploy.rollout is not None
    victim = next(a for a in agents if a.instance_id not in deploy.rollout.first)
    kill_hard(victim)
    out, err = driver.communicate(timeout=90)
    assert driver.returncode == 0, out + err
    survivors = [a for a in agents if a is not victim]
    assert all(a.served() == "v2" for a in survivors)
    # An alarm in ALARM during the next rollout rolls it back.
    cloudwatch = boto3.client("cloudwatch", region_name=REGION, endpoint_url=fleet.endpoint_url)
    cloudwatch.put_metric_alarm(
        AlarmName="api-5xx", MetricName="5xx", Namespace="shop", Statistic="Sum", Period=60,
        EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanThreshold",
    )  # fmt: skip
    cloudwatch.set_alarm_state(AlarmName="api-5xx", StateValue="ALARM", StateReason="injected by the test")
    alarmed = staged(fleet, tmp_path, "v3", "--waves", "1,100%", "--alarm", "api-5xx")
    assert alarmed.returncode == EXIT_ROLLED_BACK, alarmed.stdout + alarmed.stderr
    assert "alarm(s) in ALARM: api-5xx" in alarmed.stdout
    wait_until(lambda: all(a.served() == "v2" for a in survivors), "every instance on stable")


def test_zonal_waves_finish_one_availability_zone_before_the_next_starts(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    zones = ["us-east-1a", "us-east-1a", "us-east-1b", "us-east-1b", "us-east-1c"]
    agents = [start_agent(availability_zone=zone, **FLEET) for zone in zones]
    assert cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", *FAST)).returncode == 0
    done = staged(fleet, tmp_path, "v2", "--waves", "az:2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: rollout of prod/web/api seq 2 done in 2 waves" in done.stdout
    assert "wave 0/1 (us-east-1a+us-east-1b)" in done.stdout, done.stdout
    deploy = current(fleet)
    assert deploy.rollout is not None
    assert deploy.rollout.zones == (("us-east-1a", "us-east-1b"), ("us-east-1c",))
    applied = [(agent.config["availability_zone"], min(apply_times(agent, deploy.deploy_id))) for agent in agents]
    first_zones = [t for zone, t in applied if zone != "us-east-1c"]
    assert max(first_zones) < min(t for zone, t in applied if zone == "us-east-1c")
    report = agents[0].status()
    assert report is not None
    assert report.zone == "us-east-1a"


#: Agents that reconcile every 3 s: the pre-authorised abort is carried out at a reconcile.
RECONCILING = {**FLEET, "reconcile_interval_seconds": 3}


def rollout_cli(fleet: Fleet, verb: str, *extra: str) -> list[str]:
    return ["rollout", verb, "--bucket", fleet.bucket, "--topic-arn", fleet.topic_arn,
            "--stage", "prod", "--role", "web", "--component", "api", *extra]  # fmt: skip


def test_with_the_driver_dead_k_failures_send_every_admitted_instance_back_to_stable_by_themselves(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent(**RECONCILING) for _ in range(6)]
    by_id = {a.instance_id: a for a in agents}
    assert cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", *FAST)).returncode == 0
    flags = tmp_path / "flags"
    flags.mkdir()
    manifest = template_file(tmp_path / "health.yml", f'test ! -e "{flags}/fail-$DEPLOYER_INSTANCE_ID"')
    staged_args = ("--manifest", str(manifest), "--waves", "1,60%,100%", "--abort-after", "2", "--bake", "1")
    started = cli(*publish_args(fleet, artifact(tmp_path, "v2", "v2"), *staged_args, "--lease", "2"))
    assert started.returncode == 0, started.stdout + started.stderr
    deploy = current(fleet)
    plan = deploy.rollout
    assert plan is not None
    assert plan.abort_after == 2
    # Two instances of wave 1 will fail the candidate's health check; wave 0 passes, so a driver advances.
    wave1 = sorted(i for i in by_id if i and plan.wave_of(deploy.deploy_id, i) == 1)
    assert len(wave1) >= 2, wave1
    failing = wave1[:2]
    for instance in failing:
        (flags / f"fail-{instance}").touch()
    admitted = [i for i in by_id if plan.admits(deploy.deploy_id, i or "", 1)]
    driver = subprocess.Popen(
        [sys.executable, "-m", "deployer", *rollout_cli(fleet, "resume", "--force", "--lease", "2", *FAST)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: read_cursor(fleet, deploy).wave == 1 or driver.poll() is not None, "wave 1 admitted")
    finally:
        driver.kill()  # CI dies with wave 1 admitted
        out, err = driver.communicate(timeout=10)
    assert read_cursor(fleet, deploy).wave == 1, out + err
    markers = fleet.layout.event_prefix("instance-deploy-failed", "prod", "web", deploy.deploy_id)

    def told() -> list[str]:
        listed = fleet.clients.s3.list_objects_v2(Bucket=fleet.bucket, Prefix=markers).get("Contents", [])
        return [str(o["Key"]) for o in listed]

    wait_until(lambda: len(told()) >= 2, "the two failures to be told")
    kth_failure = time.monotonic()
    # Within one reconcile interval (3 s ± 10 %, after a 1 s poll) plus the switch itself, with no CI running.
    wait_until(lambda: all(by_id[i].served() == "v1" for i in admitted), "every admitted instance on stable", 12)
    took = time.monotonic() - kth_failure
    assert driver.returncode is not None
    assert took < 3 * 1.1 + 1 + 5, took
    assert all(a.served() == "v1" for a in agents)
    assert read_cursor(fleet, deploy).state is RolloutState.ROLLING  # agents never write the cursor
    status = cli(*rollout_cli(fleet, "status"))
    assert "aborted (pre-authorised): 2 admitted instance(s) failed" in status.stdout, status.stdout + status.stderr
    # The next driver writes down what the fleet already did.
    time.sleep(2.5)  # the killed driver's lease lapses
    resumed = cli(*rollout_cli(fleet, "resume", *FAST))
    assert resumed.returncode == EXIT_ROLLED_BACK, resumed.stdout + resumed.stderr
    cursor = read_cursor(fleet, deploy)
    assert cursor.state is RolloutState.ABORTED
    assert cursor.reason is not None
    assert cursor.reason.startswith(PRE_AUTHORISED)
    assert all(failing_id in cursor.reason for failing_id in failing)


def test_forged_failure_markers_below_k_or_from_one_owner_move_nothing(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent(**RECONCILING) for _ in range(4)]
    by_id = {a.instance_id: a for a in agents}
    assert cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", *FAST)).returncode == 0
    started = cli(*publish_args(fleet, artifact(tmp_path, "v2", "v2"), "--waves", "2,100%", "--abort-after", "2"))
    assert started.returncode == 0, started.stdout + started.stderr
    deploy = current(fleet)
    assert deploy.rollout is not None
    first, second = deploy.rollout.first
    outsider = next(i for i in by_id if i not in deploy.rollout.first)
    wait_until(lambda: by_id[first].served() == by_id[second].served() == "v2", "wave 0 on the candidate")
    forged = [
        # K markers from one owner: the same instance under two role ids (IAM lets an instance write
        # only its own name, so on AWS these could not even both exist).
        (first, "AROAFORGEDROLE000001"),
        (first, "AROAFORGEDROLE000002"),
        # An instance that never ran the candidate.
        (outsider, "AROAFORGEDROLE000001"),
    ]
    for instance, role_id in forged:
        key = fleet.layout.event_key(
            "instance-deploy-failed", ReportKey("prod", "web", instance or "", role_id), deploy.deploy_id
        )
        fleet.clients.s3.put_object(Bucket=fleet.bucket, Key=key, Body=b"{}", IfNoneMatch="*")
    # Another deploy's marker for the second admitted instance counts for that deploy only.
    other = fleet.layout.event_key("instance-deploy-failed", by_id[second].who, "another-deploy")
    fleet.clients.s3.put_object(Bucket=fleet.bucket, Key=other, Body=b"{}", IfNoneMatch="*")
    time.sleep(3 * 3 * 1.1 + 1)  # three reconcile intervals
    assert by_id[first].served() == by_id[second].served() == "v2"
    assert not any(a.events("rollout_aborted_by_its_plan") for a in agents)
    status = cli(*rollout_cli(fleet, "status"))
    assert "pre-authorised abort after 2 failed instance(s): 1 counted so far" in status.stdout, status.stdout
