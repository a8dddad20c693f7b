"""Completing the Auto Scaling launch hook after boot replay (moto for the group, a loopback fake for the action)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deployer.agent.config import AgentConfig, config_from_dict
from deployer.agent.launch import LaunchResult, LifecycleAction, complete_launch_action, finish_launch, launch_result
from deployer.aws.clients import autoscaling_client
from deployer.local.emulator import Emulator
from deployer.protocol.errors import ConfigError
from deployer.protocol.report import ComponentState
from tests.asg_fake import LifecycleFake, lifecycle_proxy
from tests.support import BUCKET, FAST_POLICY, REGION, Fleet, group_with_hook

HOOK = "deployer-boot"
OK, FAILED = ComponentState.OK, ComponentState.FAILED


def test_launch_continues_only_when_no_component_failed() -> None:
    assert launch_result([OK, ComponentState.PENDING]) is LaunchResult.CONTINUE
    assert launch_result([OK, FAILED]) is LaunchResult.ABANDON
    assert launch_result([ComponentState.REJECTED]) is LaunchResult.ABANDON
    assert launch_result([ComponentState.APPLYING]) is LaunchResult.ABANDON
    assert launch_result([]) is LaunchResult.CONTINUE


def test_lifecycle_settings_are_optional_and_checked(fleet: Fleet) -> None:
    base = {"stage": "prod", "role": "web", "components": ["api"], "bucket": BUCKET, "topic_arn": fleet.topic_arn}
    plain = config_from_dict(base)
    assert plain.lifecycle_hook_name is None
    assert plain.deregister_on_shutdown is False
    full = config_from_dict({**base, "lifecycle_hook_name": HOOK, "deregister_on_shutdown": True})
    assert full.lifecycle_hook_name == HOOK
    with pytest.raises(ConfigError, match="deregister_on_shutdown must be true or false"):
        config_from_dict({**base, "deregister_on_shutdown": "yes"})
    with pytest.raises(ConfigError, match="lifecycle_hook_name 'no spaces' is not a valid"):
        config_from_dict({**base, "lifecycle_hook_name": "no spaces"})
    with pytest.raises(ConfigError, match="set both or neither"):
        config_from_dict({**base, "lifecycle_asg_name": "web"})


@pytest.fixture
def asg(aws_env: Emulator) -> Iterator[tuple[LifecycleFake, str]]:
    """A group of one instance with a launch hook, in moto; yields the fake and the instance id."""
    instance = group_with_hook(aws_env.url, HOOK, "EC2_INSTANCE_LAUNCHING", 900)
    with lifecycle_proxy(aws_env.url) as fake:
        yield fake, instance


def agent_config(fleet: Fleet, endpoint: str, **extra: str) -> AgentConfig:
    return AgentConfig(
        stage="prod",
        role="web",
        components=("provision", "api"),
        bucket=BUCKET,
        topic_arn=fleet.topic_arn,
        region=REGION,
        endpoint_url=endpoint,
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.moto_only(reason="Auto Scaling lifecycle hooks: LocalStack's community core answers 501")
def test_a_healthy_boot_completes_the_launch_hook_with_continue_finding_its_group(
    fleet: Fleet, asg: tuple[LifecycleFake, str]
) -> None:
    fake, instance = asg
    cfg = agent_config(fleet, fake.url, lifecycle_hook_name=HOOK)
    client = autoscaling_client(cfg.region, cfg.endpoint_url)
    outcome = finish_launch(client, cfg, instance, {"provision": OK, "api": OK}, FAST_POLICY)
    assert outcome.action is LifecycleAction.COMPLETED
    assert outcome.asg_name == "web-asg"  # found with DescribeAutoScalingInstances, answered by moto
    assert [(c["AutoScalingGroupName"], c["LifecycleActionResult"], c["InstanceId"]) for c in fake.completed] == [
        ("web-asg", "CONTINUE", instance)
    ]
    # The long-running agent boots again after `deployer boot`: nothing pending any more, not an error.
    again = finish_launch(client, cfg, instance, {"provision": OK, "api": OK}, FAST_POLICY)
    assert again.action is LifecycleAction.NOT_WAITING
    assert len(fake.completed) == 1


@pytest.mark.moto_only(reason="Auto Scaling lifecycle hooks: LocalStack's community core answers 501")
def test_a_failed_boot_abandons_the_launch_so_auto_scaling_replaces_the_instance(
    fleet: Fleet, asg: tuple[LifecycleFake, str]
) -> None:
    fake, instance = asg
    cfg = agent_config(fleet, fake.url, lifecycle_hook_name=HOOK, lifecycle_asg_name="web-asg")
    outcome = finish_launch(
        autoscaling_client(cfg.region, cfg.endpoint_url), cfg, instance, {"provision": OK, "api": FAILED}, FAST_POLICY
    )
    assert outcome.action is LifecycleAction.COMPLETED
    assert outcome.result is LaunchResult.ABANDON
    assert fake.completed[0]["LifecycleActionResult"] == "ABANDON"


@pytest.mark.moto_only(reason="Auto Scaling lifecycle hooks: LocalStack's community core answers 501")
def test_nothing_is_called_when_disabled_and_an_instance_outside_any_group_is_skipped(
    fleet: Fleet, asg: tuple[LifecycleFake, str]
) -> None:
    fake, _ = asg
    disabled = agent_config(fleet, fake.url)
    client = autoscaling_client(disabled.region, disabled.endpoint_url)
    assert complete_launch_action(client, disabled, "i-x", LaunchResult.CONTINUE).action is LifecycleAction.DISABLED
    cfg = agent_config(fleet, fake.url, lifecycle_hook_name=HOOK)
    outcome = complete_launch_action(client, cfg, "i-notinagroup0001", LaunchResult.CONTINUE, FAST_POLICY)
    assert outcome.action is LifecycleAction.NOT_IN_ASG
    assert fake.completed == []


@pytest.mark.moto_only(reason="Auto Scaling lifecycle hooks: LocalStack's community core answers 501")
def test_aws_trouble_never_takes_the_agent_down(fleet: Fleet, asg: tuple[LifecycleFake, str], closed_port: int) -> None:
    _, instance = asg
    cfg = agent_config(fleet, f"http://127.0.0.1:{closed_port}", lifecycle_hook_name=HOOK, lifecycle_asg_name="web-asg")
    outcome = finish_launch(autoscaling_client(cfg.region, cfg.endpoint_url), cfg, instance, {"api": OK}, FAST_POLICY)
    assert outcome.action is LifecycleAction.NOT_WAITING
    assert outcome.result is LaunchResult.CONTINUE
