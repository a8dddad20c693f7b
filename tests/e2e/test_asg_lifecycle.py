"""Real agents through the Auto Scaling lifecycle: scale-in through the terminate hook, scale-in
protection while deploying, and a warm pool (asleep while releases are published, then into service).

The groups and hooks are moto's; lifecycle actions (Terminating:Wait, heartbeats, the default
result at the heartbeat timeout, warm-pool launches) are `tests/asg_fake.py`'s, and target
health is `tests/elb_fake.py`'s, both at 0.1× (a 30 s heartbeat timeout lasts 3 s). IMDS is a
loopback fake whose `autoscaling/target-lifecycle-state` the test (or the lifecycle fake) sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from deployer.protocol.report import Lifecycle
from tests.asg_fake import LifecycleFake
from tests.elb_fake import AGENT_BEHIND_FAKE, create_target_group, elb_proxy
from tests.support import (
    REGION,
    AgentProcess,
    Fleet,
    cli,
    free_port,
    group_with_hook,
    kill_hard,
    kill_pid_file,
    make_asg,
    make_tree,
    publish_args,
    serve_imds,
    wait_until,
)
from tests.webapp import template_file

pytestmark = pytest.mark.moto_only(reason="Auto Scaling and ELBv2: LocalStack's community core has neither")

HOOK = "deployer-leave"


def test_a_terminating_instance_finishes_its_apply_heartbeating_then_leaves_and_completes_the_hook(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    instance = group_with_hook(fleet.endpoint_url, HOOK, "EC2_INSTANCE_TERMINATING", 30)
    lifecycle = LifecycleFake(fleet.endpoint_url, time_scale=0.1)
    with elb_proxy(fleet.endpoint_url, lifecycle) as elb, serve_imds() as imds:
        group = create_target_group(elb.url)
        port = free_port()
        elb.bind(instance, port)
        env = {"APP_PORT": str(port), "APP_PIDFILE": str(tmp_path / "app.pid")}
        agent = start_agent(
            instance, env=env, endpoint_url=elb.url, metadata_endpoint=imds.url, terminate_hook_name=HOOK,
            lifecycle_poll_seconds=0.2, target_group_arns=[group], traffic_port=port, **AGENT_BEHIND_FAKE,
        )  # fmt: skip
        try:
            assert _publish(fleet, elb.url, tmp_path, "v1") == 0
            boto3.client("elbv2", region_name=REGION, endpoint_url=elb.url).register_targets(
                TargetGroupArn=group, Targets=[{"Id": instance}]
            )
            wait_until(lambda: elb.state(group, instance) == "healthy", "the instance in service")
            # A release whose post hook takes 6 s, twice the (scaled) heartbeat timeout.
            slow = ("sleep 6",)
            assert _publish(fleet, elb.url, tmp_path, "v2", first=slow) == 0
            wait_until(
                lambda: any(e.get("release_id") == "v2" for e in agent.events("apply_started")), "the apply of v2"
            )
            time.sleep(0.5)  # into its slow post hook
            imds.lifecycle_state = "Terminated"
            pending = lifecycle.terminate(instance)
            wait_until(lambda: lifecycle.outcome(instance) is not None, "the terminate action to end", timeout=60)
            assert lifecycle.outcome(instance) == "CONTINUE", agent.log_path.read_text()[-3000:]
            assert pending.heartbeats >= 1  # the apply outlived one heartbeat timeout: the hook was kept alive
            assert agent.served() == "v2"  # the running apply finished before the instance left
            report = agent.status()
            assert report is not None
            assert report.lifecycle is Lifecycle.TERMINATED
            assert elb.state(group, instance) in ("draining", "unused")
            with pytest.raises(ClientError, match=r"NonExistentQueue|QueueDoesNotExist"):
                agent.queue_url()
            topic = fleet.clients.sns.list_subscriptions_by_topic(TopicArn=fleet.topic_arn)["Subscriptions"]
            assert topic == []
            assert agent.alive()  # idle until the instance stops it: a systemd restart must not re-join
            agent.stop()
            agent.start()
            # Once the restarted agent has decided (its start-up can take seconds on a busy
            # machine: a fixed 1.5 s sleep raced it), it must have created nothing.
            wait_until(lambda: bool(agent.events("agent_already_left")), "the restarted agent to stay out")
            with pytest.raises(ClientError, match=r"NonExistentQueue|QueueDoesNotExist"):
                agent.queue_url()
        finally:
            kill_pid_file(tmp_path / "app.pid")


def _publish(fleet: Fleet, endpoint: str, tmp_path: Path, name: str, first: tuple[str, ...] = ()) -> int:
    build = make_tree(tmp_path / f"build-{name}", {"index.html": name})
    template = template_file(tmp_path / f"{name}.yml", first=first)
    args = publish_args(fleet, build, "--manifest", str(template), "--release-id", name)
    return cli(*args, env={"AWS_ENDPOINT_URL": endpoint}).returncode


def test_an_instance_is_protected_from_scale_in_only_while_it_deploys_even_across_a_kill(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    [instance] = make_asg(fleet.endpoint_url, "web-asg", 1)
    autoscaling = boto3.client("autoscaling", region_name=REGION, endpoint_url=fleet.endpoint_url)

    def protected() -> bool:
        [member] = autoscaling.describe_auto_scaling_instances(InstanceIds=[instance])["AutoScalingInstances"]
        return bool(member["ProtectedFromScaleIn"])

    agent = start_agent(instance, scale_in_protection=True, heartbeat_interval_seconds=1)
    marker = Path(agent.config["state_dir"]) / "protection.json"
    # The first run of the post hook hangs (the agent is killed then); the resumed run does not.
    once = 'test -f "$DEPLOYER_RELEASE_DIR/../../slept" || { touch "$DEPLOYER_RELEASE_DIR/../../slept"; sleep 30; }'
    build = make_tree(tmp_path / "build-v1", {"index.html": "v1"})
    template = template_file(tmp_path / "v1.yml", first=(once,), restart=False)
    assert cli(*publish_args(fleet, build, "--manifest", str(template), "--release-id", "v1")).returncode == 0
    wait_until(lambda: bool(agent.events("hook_started")), "the apply to run its hooks")
    assert protected()
    assert marker.exists()
    kill_hard(agent)
    assert protected()  # left on by the kill: the marker says this agent set it
    agent.start()
    wait_until(lambda: agent.served() == "v1" and not marker.exists(), "the resumed apply to finish")
    assert not protected()
    assert not agent.events("scale_in_protection_failed")


def test_a_warm_pool_instance_converges_sleeps_with_its_queue_then_catches_up_before_entering_service(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    instance = group_with_hook(fleet.endpoint_url, "deployer-boot", "EC2_INSTANCE_LAUNCHING", 300)
    lifecycle = LifecycleFake(fleet.endpoint_url, time_scale=0.1)
    with elb_proxy(fleet.endpoint_url, lifecycle) as elb, serve_imds() as imds:
        group = create_target_group(elb.url)
        port = free_port()
        elb.bind(instance, port)
        assert _publish(fleet, elb.url, tmp_path, "v1") == 0
        lifecycle.warm(instance, imds)
        env = {"APP_PORT": str(port), "APP_PIDFILE": str(tmp_path / "app.pid")}
        agent = start_agent(
            instance, env=env, endpoint_url=elb.url, metadata_endpoint=imds.url, lifecycle_hook_name="deployer-boot",
            lifecycle_poll_seconds=0.2, target_group_arns=[group], traffic_port=port, deregister_on_shutdown=True,
            **AGENT_BEHIND_FAKE,
        )  # fmt: skip
        try:
            wait_until(lambda: lifecycle.states.get(instance) == "Warmed:Stopped", "the warm-pool launch hook")
            assert agent.served() == "v1"
            report = agent.status()
            assert report is not None
            assert report.lifecycle is Lifecycle.WARMED
            status = cli("status", "--bucket", fleet.bucket)
            assert "prod/web/api: 0/0 on seq 1, 0 failed, 1 warmed" in status.stdout, status.stdout
            # The pool stops the instance: its agent stops, and keeps its queue (it is only asleep).
            assert agent.stop() == 0
            agent.process = None
            queue = agent.queue_url()
            # Published while it sleeps: v2, then v3. It wakes to v3, never applying v2.
            assert _publish(fleet, elb.url, tmp_path, "v2") == 0
            assert _publish(fleet, elb.url, tmp_path, "v3") == 0
            lifecycle.enter_service(instance, imds)
            agent.start()
            wait_until(lambda: lifecycle.states.get(instance) == "InService", "the launch hook out of the pool")
            assert agent.served() == "v3"
            assert agent.queue_url() == queue
            assert not [e for e in agent.events("apply_started") if e.get("release_id") == "v2"]
            report = agent.status()
            assert report is not None
            assert report.lifecycle is None
            # Auto Scaling registers it with its target groups once the hook completed.
            assert elb.state(group, instance) == "unused"
            boto3.client("elbv2", region_name=REGION, endpoint_url=elb.url).register_targets(
                TargetGroupArn=group, Targets=[{"Id": instance}]
            )
            wait_until(lambda: elb.state(group, instance) == "healthy", "the instance serving v3")
            assert [c["LifecycleActionResult"] for c in lifecycle.completed] == ["CONTINUE", "CONTINUE"]
        finally:
            kill_pid_file(tmp_path / "app.pid")
