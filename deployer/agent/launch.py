"""Entering service: the Auto Scaling launch lifecycle hook.

With a lifecycle hook on `autoscaling:EC2_INSTANCE_LAUNCHING`, Auto Scaling holds a new
instance in `Pending:Wait` until someone completes the action. The agent completes it with
CONTINUE once boot replay put every component on its channel's release, and with ABANDON when
a component failed, so an instance enters service only when it runs the current release (and
a broken one is replaced instead of serving). Off unless `lifecycle_hook_name` is configured.

The decision (`launch_result`) is pure; the calls are `deployer.aws.autoscaling`'s adapters.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from deployer.agent.config import AgentConfig
from deployer.aws.autoscaling import complete_lifecycle_action, find_asg
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.report import FAILING_STATES, ComponentState

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

log = structlog.get_logger(__name__)


class LaunchResult(enum.StrEnum):
    CONTINUE = "CONTINUE"
    ABANDON = "ABANDON"


class LifecycleAction(enum.StrEnum):
    COMPLETED = "completed"
    NOT_WAITING = "not_waiting"  # nothing pending for this instance
    NOT_IN_ASG = "not_in_asg"
    DISABLED = "disabled"


@dataclass(frozen=True)
class LifecycleOutcome:
    action: LifecycleAction
    result: LaunchResult | None = None
    asg_name: str | None = None


def launch_result(states: Iterable[ComponentState]) -> LaunchResult:
    """Pure: CONTINUE unless a component failed, was rejected or is still mid-apply after boot replay.

    A component still `pending` has no pointer yet (never published): nothing to run, not a failure.
    """
    bad = FAILING_STATES | {ComponentState.APPLYING}
    return LaunchResult.ABANDON if any(s in bad for s in states) else LaunchResult.CONTINUE


def complete_launch_action(
    autoscaling: AutoScalingClient,
    config: AgentConfig,
    instance_id: str,
    result: LaunchResult,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> LifecycleOutcome:
    """Complete this instance's launch lifecycle action with `result`, if one is configured and pending."""
    hook = config.lifecycle_hook_name
    if not hook:
        return LifecycleOutcome(LifecycleAction.DISABLED)
    asg = config.lifecycle_asg_name or find_asg(autoscaling, instance_id, policy)
    if asg is None:
        log.warning("lifecycle_not_in_asg", instance_id=instance_id, hook=hook, next="nothing to complete")
        return LifecycleOutcome(LifecycleAction.NOT_IN_ASG, result)
    completed = complete_lifecycle_action(
        autoscaling, hook=hook, asg=asg, instance_id=instance_id, result=result.value, policy=policy
    )
    if not completed:
        log.info("lifecycle_not_waiting", asg=asg, hook=hook, next="the instance is already past its launch hook")
        return LifecycleOutcome(LifecycleAction.NOT_WAITING, result, asg)
    event = log.info if result is LaunchResult.CONTINUE else log.error
    event(
        "lifecycle_action_completed",
        asg=asg,
        hook=hook,
        result=result.value,
        next="the instance enters service" if result is LaunchResult.CONTINUE else "Auto Scaling replaces the instance",
    )
    return LifecycleOutcome(LifecycleAction.COMPLETED, result, asg)


def finish_launch(
    autoscaling: AutoScalingClient,
    config: AgentConfig,
    instance_id: str,
    states: Mapping[str, ComponentState],
    policy: RetryPolicy = DEFAULT_POLICY,
) -> LifecycleOutcome:
    """After boot replay: CONTINUE if every component is fine, else ABANDON. Never raises for AWS
    trouble: the hook's DefaultResult applies when its heartbeat timeout runs out."""
    result = launch_result(states.values())
    try:
        return complete_launch_action(autoscaling, config, instance_id, result, policy)
    except Exception as exc:  # noqa: BLE001 - the agent must keep serving; Auto Scaling times the hook out
        log.error(
            "lifecycle_action_failed",
            error=str(exc),
            result=result.value,
            next="Auto Scaling applies the hook's DefaultResult at its heartbeat timeout",
        )
        return LifecycleOutcome(LifecycleAction.NOT_WAITING, result)
