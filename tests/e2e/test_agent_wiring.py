"""The agent-side wiring of issue 5, end to end with a real agent subprocess.

The wiring itself (calling `deployer.lifecycle.finish_launch` at the end of `Agent.boot` and
`deployer.lifecycle.deregister` when `Agent.run` stops) lives in deployer/agent.py, which
is owned elsewhere; remove the skip mark below together with adding it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from deployer.local.emulator import Emulator
from deployer.protocol.deploy import Deploy
from tests.asg_fake import LifecycleFake, lifecycle_proxy
from tests.support import AgentProcess, Fleet, group_with_hook, wait_until


@pytest.fixture
def asg_instance(aws_env: Emulator) -> Iterator[tuple[LifecycleFake, str]]:
    instance = group_with_hook(aws_env.url, "deployer-boot", "EC2_INSTANCE_LAUNCHING")
    with lifecycle_proxy(aws_env.url) as fake:
        yield fake, instance


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
