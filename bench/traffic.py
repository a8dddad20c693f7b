"""Figure 8: behind a load balancer. Out of service → healthy again for one instance, against the same
target group run as CodeDeploy does it; and a warm-pool instance into service against a cold launch.

Both on the emulated timings (`tests/elb_fake.py`, `tests/asg_fake.py`), with AWS's defaults
for an Application Load Balancer's target group scaled down by SCALE, and reported back in
AWS seconds (measured ÷ SCALE) beside the ratio, which scaling does not change.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import boto3

from bench.common import (
    BUCKET,
    PYTHON,
    REGION,
    ROLE,
    STAGE,
    AgentProc,
    Bench,
    LogWatcher,
    big_artifact,
    event_time,
    median,
    sec,
    stop_all,
    wait_for,
)
from bench.report import Section, Table, Target
from deployer.protocol.manifest import Commands, Hook, Manifest, SyncStrategy
from deployer.protocol.names import Channel
from publisher.pack import pack_directory
from publisher.publish import Publisher
from tests import webapp
from tests.asg_fake import LifecycleFake
from tests.elb_fake import DEREGISTRATION_DELAY, TargetHealthFake, elb_proxy
from tests.support import kill_pid_file, serve_imds
from tests.webapp import RESTART

WEBAPP = webapp.__file__

#: Emulated time runs at 1/50: ALB's 30 s health-check interval is 0.6 s, its 300 s delay 6 s.
SCALE = 0.02
#: ALB target group defaults: interval 30 s, healthy after 5 passing checks, deregistration delay 300 s.
#: https://docs.aws.amazon.com/elasticloadbalancing/latest/application/target-group-health-checks.html
ALB_INTERVAL_S, ALB_HEALTHY, ALB_UNHEALTHY, ALB_TIMEOUT_S, ALB_DELAY_S = 30, 5, 2, 5, 300
#: The agent's pace in the same scaled time (5 s between ELB questions on AWS).
AGENT_POLL_S = 5 * SCALE


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _target_group(url: str) -> str:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=url)
    group = elbv2.create_target_group(
        Name="bench", Protocol="HTTP", Port=80, VpcId=vpc, TargetType="instance", HealthCheckPath="/health",
        HealthCheckIntervalSeconds=ALB_INTERVAL_S, HealthCheckTimeoutSeconds=ALB_TIMEOUT_S,
        HealthyThresholdCount=ALB_HEALTHY, UnhealthyThresholdCount=ALB_UNHEALTHY,
    )["TargetGroups"][0]["TargetGroupArn"]  # fmt: skip
    elbv2.modify_target_group_attributes(
        TargetGroupArn=group, Attributes=[{"Key": DEREGISTRATION_DELAY, "Value": str(ALB_DELAY_S)}]
    )
    return str(group)


def _wait_state(fake: TargetHealthFake, group: str, instance: str, wanted: str, timeout: float) -> None:
    wait_for(lambda: fake.state(group, instance) == wanted, f"{instance} {wanted}", timeout)


def _codedeploy_cycle(fake: TargetHealthFake, group: str, instance: str, restart: Callable[[], None]) -> float:
    """BlockTraffic, the same app restart, then AllowTraffic, as CodeDeploy runs them: deregister
    and wait until ELB has completed the deregistration (the full delay: ELB shows `draining`
    until it ends), restart, register and wait until `healthy`. Seconds, scaled time."""
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=fake.url)
    started = time.monotonic()
    elbv2.deregister_targets(TargetGroupArn=group, Targets=[{"Id": instance}])
    _wait_state(fake, group, instance, "unused", ALB_DELAY_S * SCALE * 3)
    restart()
    elbv2.register_targets(TargetGroupArn=group, Targets=[{"Id": instance}])
    _wait_state(fake, group, instance, "healthy", (ALB_HEALTHY + 2) * ALB_INTERVAL_S * SCALE * 3)
    return time.monotonic() - started


def _release(bench: Bench, name: str, component: str = "api", artifact: Path | None = None) -> None:
    build = bench.workdir / "traffic" / f"build-{component}-{name}"
    build.mkdir(parents=True, exist_ok=True)
    (build / "index.html").write_text(name)
    packed = artifact or pack_directory(build, bench.workdir / "traffic" / f"{component}-{name}.tar.gz").path
    template = Manifest(
        dest=f"/opt/{component}/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(post=(Hook(RESTART),) if component == "api" else (Hook("true"),)),
    )
    publisher = Publisher(bench.clients, BUCKET, bench.topic_arn, bench.layout)
    publisher.publish(Channel(STAGE, ROLE, component), packed, template=template, release_id=f"{component}-{name}")


def _out_of_service(bench: Bench, reps: int) -> tuple[list[float], list[float]]:
    """(ours, CodeDeploy's) deregister → healthy again, scaled seconds, `reps` each on one instance."""
    ours: list[float] = []
    theirs: list[float] = []
    with elb_proxy(bench.emulator.url, time_scale=SCALE, unused_when_drained=False) as fake:
        group = _target_group(fake.url)
        instance = "i-benchtraffic0001"
        port = _port()
        fake.bind(instance, port)
        home = bench.dir("traffic-agent")
        pidfile = home / "app.pid"
        agent = AgentProc(
            bench, home, instance, ["api"], endpoint_url=fake.url, target_group_arns=[group], traffic_port=port,
            traffic_poll_seconds=AGENT_POLL_S, heartbeat_interval_seconds=60, poll_wait_seconds=2,
        )  # fmt: skip
        agent.env.update(APP_PORT=str(port), APP_PIDFILE=str(pidfile))
        agent.start()
        try:
            _release(bench, "r0")

            def applied(name: str) -> bool:
                return agent.watcher.find("apply_succeeded", release_id=f"api-{name}") is not None

            wait_for(lambda: applied("r0"), "r0", 60, [agent])
            boto3.client("elbv2", region_name=REGION, endpoint_url=fake.url).register_targets(
                TargetGroupArn=group, Targets=[{"Id": instance}]
            )
            _wait_state(fake, group, instance, "healthy", 60)
            for rep in range(reps):
                name = f"r{rep + 1}"
                _release(bench, name)
                wait_for(functools.partial(applied, name), name, 120, [agent])
                left = [e for e in agent.watcher.events if e.get("event") == "traffic_deregistered"][-1]
                back = [e for e in agent.watcher.events if e.get("event") == "traffic_healthy"][-1]
                ours.append(event_time(back) - event_time(left))
                current = (agent.root / "opt/api/current").resolve()

                def restart(current: Path = current) -> None:
                    subprocess.run([PYTHON, WEBAPP, "restart", str(current)], env=agent.env, check=True)

                theirs.append(_codedeploy_cycle(fake, group, instance, restart))
        finally:
            stop_all([agent])
            kill_pid_file(pidfile)
    return ours, theirs


def _into_service(bench: Bench, reps: int) -> tuple[list[float], list[float]]:
    """(warm, cold): seconds from the agent's start to the launch hook completed into service,
    with the current releases; warm had converged in the pool before the api changed."""
    warm_runs: list[float] = []
    cold_runs: list[float] = []
    big = big_artifact(bench.workdir, bench.quick)
    lifecycle = LifecycleFake(bench.emulator.url, time_scale=SCALE)
    with elb_proxy(bench.emulator.url, lifecycle, time_scale=SCALE) as proxy:
        autoscaling = boto3.client("autoscaling", region_name=REGION, endpoint_url=bench.emulator.url)
        autoscaling.create_launch_configuration(
            LaunchConfigurationName="bench", ImageId="ami-03cf127a", InstanceType="t3.micro"
        )
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName="bench", LaunchConfigurationName="bench", MinSize=0, MaxSize=1,
            AvailabilityZones=["us-east-1a"],
        )  # fmt: skip
        autoscaling.put_lifecycle_hook(
            LifecycleHookName="boot", AutoScalingGroupName="bench",
            LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING", HeartbeatTimeout=900, DefaultResult="ABANDON",
        )  # fmt: skip
        for rep in range(reps):
            _release(bench, f"p{rep}", component="provision", artifact=big.path)
            _release(bench, f"a{rep}")
            for kind in ("warm", "cold"):
                instance = f"i-bench{kind}{rep:010d}"
                home = bench.dir(f"traffic-{kind}-{rep}")
                with serve_imds() as imds:
                    agent = AgentProc(
                        bench, home, instance, ["provision", "api"], endpoint_url=proxy.url,
                        metadata_endpoint=imds.url, lifecycle_hook_name="boot", lifecycle_asg_name="bench",
                        lifecycle_poll_seconds=0.2, heartbeat_interval_seconds=60, poll_wait_seconds=2,
                    )  # fmt: skip
                    agent.env.update(APP_PORT=str(_port()), APP_PIDFILE=str(home / "app.pid"))

                    def reached(state: str, instance: str = instance) -> bool:
                        return lifecycle.states.get(instance) == state

                    if kind == "warm":
                        # Launched into the pool, converged, stopped (its app with it); the api
                        # changes while it sleeps.
                        lifecycle.warm(instance, imds)
                        agent.start()
                        wait_for(lambda: reached("Warmed:Stopped"), "warm", 120, [agent])
                        stop_all([agent])
                        kill_pid_file(home / "app.pid")
                        _release(bench, f"a{rep}-late")
                        agent.watcher = LogWatcher(agent.log_path)
                    lifecycle.enter_service(instance, imds)
                    started = time.monotonic()
                    agent.start()
                    wait_for(lambda: reached("InService"), kind, 300, [agent])
                    (warm_runs if kind == "warm" else cold_runs).append(time.monotonic() - started)
                    stop_all([agent])
                    kill_pid_file(home / "app.pid")
    return warm_runs, cold_runs


def run(bench: Bench) -> Section:
    bench.fresh()
    reps = 1 if bench.quick else 3
    ours, theirs = _out_of_service(bench, reps)
    ratio = median(ours) / median(theirs)
    aws = (ALB_DELAY_S + ALB_HEALTHY * ALB_INTERVAL_S) / 60
    out_table = Table(
        ["", "measured (scaled time)", "as on AWS (÷ scale)", "runs"],
        [
            ["agent: deregister → healthy again", sec(median(ours)), sec(median(ours) / SCALE), ", ".join(sec(v) for v in ours)],
            ["CodeDeploy's BlockTraffic + AllowTraffic", sec(median(theirs)), sec(median(theirs) / SCALE),
             ", ".join(sec(v) for v in theirs)],
        ],
        caption=f"One instance, one target group with ALB's defaults (interval {ALB_INTERVAL_S} s, healthy after "
        f"{ALB_HEALTHY}, deregistration delay {ALB_DELAY_S} s) at {SCALE:g}× time, an idle app, median of {reps}. "
        "Both include the same app restart between leaving and rejoining; it runs in real time, so its share "
        "is inflated 1/scale times in the AWS column.",
    )  # fmt: skip
    warm, cold = _into_service(bench, reps)
    start_ratio = median(warm) / median(cold)
    warm_table = Table(
        ["start", "agent start → launch hook completed (InService)", "runs"],
        [
            ["warm pool (provision on disk, api changed while asleep)", sec(median(warm)), ", ".join(sec(v) for v in warm)],
            ["cold launch (nothing on disk)", sec(median(cold)), ", ".join(sec(v) for v in cold)],
        ],
        caption="Two components: `provision` (the big artifact of figure 2, unchanged) and `api` (changed while the "
        f"warm instance slept). Median of {reps}.",
    )  # fmt: skip
    targets = [
        Target(
            "out of service ≤ 0.5× CodeDeploy's on ALB defaults",
            ratio <= 0.5,
            f"{ratio:.2f}× ({sec(median(ours) / SCALE)} against {sec(median(theirs) / SCALE)} in AWS seconds; "
            f"CodeDeploy's floor is the full delay + {ALB_HEALTHY} × {ALB_INTERVAL_S} s ≈ {aws:.1f} min)",
        ),
        Target(
            "warm pool into service faster than a cold launch",
            start_ratio < 1,
            f"{start_ratio:.2f}× ({sec(median(warm))} against {sec(median(cold))}): the warm instance skips the "
            "queue's creation and the unchanged component's download",
        ),
    ]
    meaning = (
        "What a rolling deploy behind a load balancer costs per instance, and what a warm pool buys. The agent "
        "drains until its app has no established connection (an idle instance does not wait the 300 s delay) "
        "and is back once ELB's own checks pass; CodeDeploy's BlockTraffic waits for the deregistration to "
        "complete, which ELB reports only when the delay ends, then AllowTraffic waits HealthyThresholdCount "
        "intervals. A warm-pool instance has its unchanged components on disk and its queue already made."
    )
    notes = [
        "Both cycles run against the same emulated target group on the same machine, one after the other; "
        "ELB's health checks run on their own clock in both, so the ratio, not the absolute time, is the figure.",
        "The agent's own time is the `traffic_deregistered` → `traffic_healthy` events in its log; CodeDeploy's "
        "is a client doing its two lifecycle steps with boto3.",
    ]
    moves = (
        "The healthy wait is ELB's (HealthyThresholdCount × interval): a group with a shorter interval and "
        "threshold 2 halves it. A warm pool with `Warmed:Running` keeps applying deploys and skips the catch-up."
    )
    return Section("traffic", "8. Behind a load balancer", meaning, [out_table, warm_table], targets, notes, moves)
