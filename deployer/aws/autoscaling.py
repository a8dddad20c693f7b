"""Auto Scaling adapters: find an instance's group, complete its launch lifecycle action, list a group's
InService instances (the fleet `publish --wait --asg` expects) and its load balancer target groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import AwsError, ConfigError

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

#: What Auto Scaling answers when the instance has no pending action (already InService,
#: completed before, timed out, or no hook): not an error for an agent that restarts.
NO_ACTIVE_ACTION = "No active Lifecycle Action found"
#: A lifecycle hook's HeartbeatTimeout when it sets none (30..7200 s); the action then ends with
#: its DefaultResult unless a heartbeat restarts the timeout, at most until the global timeout,
#: 100 × HeartbeatTimeout or 48 hours, whichever is smaller.
#: https://docs.aws.amazon.com/autoscaling/ec2/userguide/lifecycle-hooks-overview.html
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 3600.0
GLOBAL_TIMEOUT_FACTOR = 100
GLOBAL_TIMEOUT_CAP_SECONDS = 48 * 3600.0


def find_asg(autoscaling: AutoScalingClient, instance_id: str, policy: RetryPolicy = DEFAULT_POLICY) -> str | None:
    found = policy.call(autoscaling.describe_auto_scaling_instances, InstanceIds=[instance_id])
    instances = found.get("AutoScalingInstances", [])
    return instances[0]["AutoScalingGroupName"] if instances else None


def complete_lifecycle_action(
    autoscaling: AutoScalingClient,
    *,
    hook: str,
    asg: str,
    instance_id: str,
    result: str,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> bool:
    """Complete the instance's pending action; False when none was pending. Other failures raise AwsError."""
    try:
        return _on_pending_action(
            policy,
            autoscaling.complete_lifecycle_action,
            LifecycleHookName=hook,
            AutoScalingGroupName=asg,
            LifecycleActionResult=result,
            InstanceId=instance_id,
        )
    except AwsError as exc:
        raise AwsError(f"cannot complete lifecycle action {hook} on {asg}: {exc}", code=exc.code) from None


def _on_pending_action(policy: RetryPolicy, call: Callable[..., object], **params: str) -> bool:
    """Make a call on the instance's pending lifecycle action: False when it has none (already
    completed, timed out, or no hook), which an agent that restarts meets as a matter of course."""
    try:
        policy.call(call, **params)
    except AwsError as exc:
        if exc.code == "ValidationError" and NO_ACTIVE_ACTION in str(exc):
            return False
        raise
    return True


def in_service_instances(
    autoscaling: AutoScalingClient, group: str, policy: RetryPolicy = DEFAULT_POLICY
) -> frozenset[str]:
    """The group's instances in `InService` (not Pending, not Terminating): the fleet a deploy must reach.

    Raises ConfigError when the group does not exist: a misspelt --asg must not wait for nobody.
    """
    found = policy.call(autoscaling.describe_auto_scaling_groups, AutoScalingGroupNames=[group])
    groups = found.get("AutoScalingGroups", [])
    if not groups:
        raise ConfigError(f"Auto Scaling group {group!r} not found")
    return frozenset(i["InstanceId"] for i in groups[0].get("Instances", []) if i.get("LifecycleState") == "InService")


def load_balancing_of(
    autoscaling: AutoScalingClient, group: str, policy: RetryPolicy = DEFAULT_POLICY
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The group's ELBv2 target group ARNs and its Classic Load Balancer names.

    Raises ConfigError when the group does not exist.
    """
    found = policy.call(autoscaling.describe_auto_scaling_groups, AutoScalingGroupNames=[group])
    groups = found.get("AutoScalingGroups", [])
    if not groups:
        raise ConfigError(f"Auto Scaling group {group!r} not found")
    return tuple(groups[0].get("TargetGroupARNs", [])), tuple(groups[0].get("LoadBalancerNames", []))


def record_heartbeat(
    autoscaling: AutoScalingClient, *, hook: str, asg: str, instance_id: str, policy: RetryPolicy = DEFAULT_POLICY
) -> bool:
    """Restart the hook's heartbeat timeout for this instance's pending action; False when none is pending."""
    return _on_pending_action(
        policy,
        autoscaling.record_lifecycle_action_heartbeat,
        LifecycleHookName=hook,
        AutoScalingGroupName=asg,
        InstanceId=instance_id,
    )


def heartbeat_timeout(
    autoscaling: AutoScalingClient, *, hook: str, asg: str, policy: RetryPolicy = DEFAULT_POLICY
) -> float:
    """The hook's HeartbeatTimeout in seconds. Raises ConfigError when the group has no such hook."""
    found = policy.call(autoscaling.describe_lifecycle_hooks, AutoScalingGroupName=asg, LifecycleHookNames=[hook])
    hooks = found.get("LifecycleHooks", [])
    if not hooks:
        raise ConfigError(f"Auto Scaling group {asg!r} has no lifecycle hook {hook!r}")
    return float(hooks[0].get("HeartbeatTimeout") or DEFAULT_HEARTBEAT_TIMEOUT_SECONDS)


def set_protection(
    autoscaling: AutoScalingClient, *, asg: str, instance_id: str, protected: bool, policy: RetryPolicy = DEFAULT_POLICY
) -> None:
    """Protect the instance from scale-in (or stop protecting it)."""
    policy.call(
        autoscaling.set_instance_protection,
        InstanceIds=[instance_id],
        AutoScalingGroupName=asg,
        ProtectedFromScaleIn=protected,
    )
