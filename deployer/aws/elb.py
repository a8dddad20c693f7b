"""Elastic Load Balancing (v2) adapters: one instance's targets, their health, a group's settings.

Thin calls, no decisions: `deployer.agent.traffic` decides when to leave and rejoin, and the
rollout driver (`publisher.rollout`) reads a group's health before it admits a wave. A target
group that does not exist is `TrafficUnavailable` (`target_group_not_found`): it says nothing
about a release, and a group created later (Terraform applied after the fleet) is picked up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import AwsError, TrafficUnavailable

if TYPE_CHECKING:
    from mypy_boto3_elbv2 import ElasticLoadBalancingv2Client

#: The attribute, and its AWS default when a group does not list it.
#: https://docs.aws.amazon.com/elasticloadbalancing/latest/application/edit-target-group-attributes.html#deregistration-delay
DEREGISTRATION_DELAY = "deregistration_delay.timeout_seconds"
DEFAULT_DEREGISTRATION_DELAY_SECONDS = 300
#: What ELB answers for a group ARN it does not know.
#: https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/API_DescribeTargetHealth.html#API_DescribeTargetHealth_Errors
GROUP_NOT_FOUND = "TargetGroupNotFound"


class TargetState:
    """`TargetHealth.State` values. https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/API_TargetHealth.html"""

    INITIAL = "initial"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNHEALTHY_DRAINING = "unhealthy.draining"
    UNUSED = "unused"
    DRAINING = "draining"
    UNAVAILABLE = "unavailable"


#: A target in one of these gets no new request from the load balancer.
OUT_OF_SERVICE = frozenset({TargetState.UNUSED, TargetState.DRAINING, TargetState.UNHEALTHY_DRAINING})
#: A target in one of these is registered (whatever its health): the load balancer routes to it once healthy.
REGISTERED = frozenset({TargetState.INITIAL, TargetState.HEALTHY, TargetState.UNHEALTHY, TargetState.UNAVAILABLE})


@dataclass(frozen=True)
class Target:
    """One registration of an instance: a group and the port the group sends it requests on."""

    group_arn: str
    instance_id: str
    port: int


@dataclass(frozen=True)
class Health:
    target: Target
    state: str
    reason: str = ""
    description: str = ""


@dataclass(frozen=True)
class GroupSettings:
    """What timing a group's target goes through: how long draining lasts at most, how long a
    registered target takes to be healthy at the least (HealthyThresholdCount × interval)."""

    arn: str
    port: int
    interval_s: float
    healthy_threshold: int
    deregistration_delay_s: float


def _not_found(exc: AwsError, group_arn: str) -> TrafficUnavailable:
    return TrafficUnavailable(f"target_group_not_found: target group {group_arn} does not exist ({exc})")


def target_health(
    elbv2: ElasticLoadBalancingv2Client,
    group_arn: str,
    instance_id: str | None = None,
    ports: Iterable[int] = (),
    policy: RetryPolicy = DEFAULT_POLICY,
) -> list[Health]:
    """The group's targets (all of them, or one instance's, on `ports` or every port it is registered on)."""
    kwargs: dict[str, object] = {"TargetGroupArn": group_arn}
    if instance_id is not None:
        wanted = [{"Id": instance_id, "Port": port} for port in ports] or [{"Id": instance_id}]
        kwargs["Targets"] = wanted
    try:
        found = policy.call(elbv2.describe_target_health, **kwargs)
    except AwsError as exc:
        if exc.code == GROUP_NOT_FOUND:
            raise _not_found(exc, group_arn) from None
        raise
    health = []
    for entry in found["TargetHealthDescriptions"]:
        target = entry.get("Target", {})
        state = entry.get("TargetHealth", {})
        health.append(
            Health(
                Target(group_arn, str(target.get("Id", "")), int(target.get("Port", 0))),
                str(state.get("State", TargetState.UNAVAILABLE)),
                str(state.get("Reason", "")),
                str(state.get("Description", "")),
            )
        )
    return health


def deregister(elbv2: ElasticLoadBalancingv2Client, target: Target, policy: RetryPolicy = DEFAULT_POLICY) -> None:
    _change(elbv2.deregister_targets, target, policy)


def register(elbv2: ElasticLoadBalancingv2Client, target: Target, policy: RetryPolicy = DEFAULT_POLICY) -> None:
    """Idempotent, as AWS documents: registering a registered target changes nothing."""
    _change(elbv2.register_targets, target, policy)


def _change(operation: object, target: Target, policy: RetryPolicy) -> None:
    try:
        policy.call(
            operation,  # type: ignore[arg-type]
            TargetGroupArn=target.group_arn,
            Targets=[{"Id": target.instance_id, "Port": target.port}],
        )
    except AwsError as exc:
        if exc.code == GROUP_NOT_FOUND:
            raise _not_found(exc, target.group_arn) from None
        raise


def group_settings(
    elbv2: ElasticLoadBalancingv2Client, group_arn: str, policy: RetryPolicy = DEFAULT_POLICY
) -> GroupSettings:
    try:
        groups = policy.call(elbv2.describe_target_groups, TargetGroupArns=[group_arn])["TargetGroups"]
        attributes = policy.call(elbv2.describe_target_group_attributes, TargetGroupArn=group_arn)["Attributes"]
    except AwsError as exc:
        if exc.code == GROUP_NOT_FOUND:
            raise _not_found(exc, group_arn) from None
        raise
    if not groups:
        raise TrafficUnavailable(f"target_group_not_found: target group {group_arn} does not exist")
    group = groups[0]
    delay = next(
        (a.get("Value") for a in attributes if a.get("Key") == DEREGISTRATION_DELAY),
        DEFAULT_DEREGISTRATION_DELAY_SECONDS,
    )
    return GroupSettings(
        arn=group_arn,
        port=int(group.get("Port") or 0),
        interval_s=float(group.get("HealthCheckIntervalSeconds") or 30),
        healthy_threshold=int(group.get("HealthyThresholdCount") or 5),
        deregistration_delay_s=float(delay or DEFAULT_DEREGISTRATION_DELAY_SECONDS),
    )


@dataclass(frozen=True)
class Membership:
    """Who a target group routes to now (healthy) out of who is registered in it (any health)."""

    group_arn: str
    registered: frozenset[str]
    healthy: frozenset[str]


def membership(elbv2: ElasticLoadBalancingv2Client, group_arn: str, policy: RetryPolicy = DEFAULT_POLICY) -> Membership:
    """One DescribeTargetHealth of the whole group, by instance id."""
    health = target_health(elbv2, group_arn, policy=policy)
    registered = frozenset(h.target.instance_id for h in health if h.state in REGISTERED)
    healthy = frozenset(h.target.instance_id for h in health if h.state == TargetState.HEALTHY)
    return Membership(group_arn, registered, healthy)
