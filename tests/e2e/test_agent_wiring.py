"""The agent-side wiring of issue 5, end to end with a real agent subprocess.

The wiring itself (calling `deployer.lifecycle.finish_launch` at the end of `Agent.boot` and
`deployer.lifecycle.deregister` when `Agent.run` stops) lives in deployer/agent.py, which
is owned elsewhere; remove the skip mark below together with adding it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import boto3
import pytest

from deployer.local.emulator import Emulator
from deployer.protocol.deploy import Deploy
from tests.asg_fake import LifecycleFake, lifecycle_proxy
from tests.support import REGION, AgentProcess, Fleet, wait_until


@pytest.fixture
def asg_instance(aws_env: Emulator) -> Iterator[tuple[LifecycleFake, str]]:
    moto = boto3.client("autoscaling", region_name=REGION, endpoint_url=aws_env.url)
    moto.create_launch_configuration(LaunchConfigurationName="web", ImageId="ami-03cf127a", InstanceType="t3.micro")
    moto.create_auto_scaling_group(
        AutoScalingGroupName="web-asg",
        LaunchConfigurationName="web",
        MinSize=1,
        MaxSize=1,
        AvailabilityZones=["us-east-1a"],
    )
    moto.put_lifecycle_hook(
        LifecycleHookName="deployer-boot",
        AutoScalingGroupName="web-asg",
        LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
        DefaultResult="ABANDON",
    )
    [instance] = moto.describe_auto_scaling_instances()["AutoScalingInstances"]
    with lifecycle_proxy(aws_env.url) as fake:
        yield fake, instance["InstanceId"]


@pytest.mark.moto_only(reason="Auto Scaling lifecycle hooks: LocalStack's community core answers 501")
def test_boot_replay_then_the_launch_hook_is_completed_and_a_clean_stop_deregisters(
    fleet: Fleet,
    asg_instance: tuple[LifecycleFake, str],
    start_agent: Callable[..., AgentProcess],
    publish: Callable[..., Deploy],
) -> None:
    fake, instance_id = asg_instance
    deploy = publish("in service")
    agent = start_agent(
        instance_id,
        endpoint_url=fake.url,  # everything goes to moto through the fake, which answers CompleteLifecycleAction
        lifecycle_hook_name="deployer-boot",
        deregister_on_shutdown=True,
    )
    wait_until(lambda: agent.on_seq(deploy.seq), "boot replay")
    wait_until(lambda: len(fake.completed) == 1, "the launch hook to be completed")
    assert fake.completed[0]["LifecycleActionResult"] == "CONTINUE"
    assert fake.completed[0]["AutoScalingGroupName"] == "web-asg"
    assert agent.stop() == 0
    agent.process = None
    assert agent.status() is None
    queues = fleet.clients.sqs.list_queues().get("QueueUrls", [])
    assert not [q for q in queues if instance_id in q]
    assert fleet.clients.sns.list_subscriptions_by_topic(TopicArn=fleet.topic_arn)["Subscriptions"] == []
