"""An instance's life in the fleet, beyond its queue: the Auto Scaling launch hook and leaving cleanly.

Launch: with a lifecycle hook on `autoscaling:EC2_INSTANCE_LAUNCHING`, Auto Scaling holds a new
instance in `Pending:Wait` until someone completes the action. The agent completes it with
CONTINUE once boot replay put every component on its channel's release, and with ABANDON when
a component failed, so an instance enters service only when it runs the current release (and
a broken one is replaced instead of serving). Off unless `lifecycle_hook_name` is configured.

Leave: `deregister` removes what `queue.py` created at boot, in the order `deployer gc` uses:
subscription first (a subscription to a deleted queue breaks publishing on the local emulator
and is an error source on AWS), then the queue and its DLQ, then the status report last, so an
interrupted removal is still seen as this instance and finished by the next `gc`.

The decision (`launch_result`) is pure; the rest are thin adapters over injected clients.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import ClientError

from deployer import __version__
from deployer.aws import Clients, resolve_region
from deployer.config import DLQ_SUFFIX, AgentConfig
from deployer.errors import AwsError
from deployer.layout import Layout
from deployer.pointers import error_code
from deployer.retry import DEFAULT_POLICY, RetryPolicy
from deployer.status import ComponentState

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

log = structlog.get_logger(__name__)

#: What Auto Scaling answers when the instance has no pending action (already InService,
#: completed before, timed out, or no hook): not an error for an agent that restarts.
NO_ACTIVE_ACTION = "No active Lifecycle Action found"


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
    bad = {ComponentState.FAILED, ComponentState.REJECTED, ComponentState.APPLYING}
    return LaunchResult.ABANDON if any(s in bad for s in states) else LaunchResult.CONTINUE


def autoscaling_client(config: AgentConfig) -> AutoScalingClient:
    """Built like `aws.make_clients` (botocore retries off: our RetryPolicy is the one retry layer)."""
    session = boto3.session.Session(region_name=resolve_region(config.region))
    return session.client(
        "autoscaling",
        endpoint_url=config.endpoint_url,
        config=Config(
            retries={"total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=30,
            user_agent_extra=f"deployer/{__version__}",
        ),
    )


def find_asg(autoscaling: AutoScalingClient, instance_id: str, policy: RetryPolicy = DEFAULT_POLICY) -> str | None:
    found = policy.call(autoscaling.describe_auto_scaling_instances, InstanceIds=[instance_id])
    instances = found.get("AutoScalingInstances", [])
    return instances[0]["AutoScalingGroupName"] if instances else None


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
    try:
        policy.call(
            autoscaling.complete_lifecycle_action,
            LifecycleHookName=hook,
            AutoScalingGroupName=asg,
            LifecycleActionResult=result.value,
            InstanceId=instance_id,
        )
    except ClientError as exc:
        message = str(exc.response.get("Error", {}).get("Message", ""))
        if error_code(exc) == "ValidationError" and NO_ACTIVE_ACTION in message:
            log.info("lifecycle_not_waiting", asg=asg, hook=hook, next="the instance is already past its launch hook")
            return LifecycleOutcome(LifecycleAction.NOT_WAITING, result, asg)
        raise AwsError(f"cannot complete lifecycle action {hook} on {asg}: {error_code(exc)}: {message}") from None
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


# -- leaving the fleet ---------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    """What removing one instance's registration did (or would do, in a dry run)."""

    instance_id: str
    stage: str
    role: str
    subscriptions: tuple[str, ...]
    queues: tuple[str, ...]
    status_key: str
    dry_run: bool


def queue_arn(topic_arn: str, queue_name: str) -> str:
    """The queue's ARN, derived from the topic's region and account (both live in one account).

    Derived rather than looked up so a subscription whose queue is already gone is still found.
    """
    _, partition, _, region, account, _ = topic_arn.split(":", 5)
    return f"arn:{partition}:sqs:{region}:{account}:{queue_name}"


def subscriptions_by_endpoint(
    clients: Clients, topic_arn: str, policy: RetryPolicy = DEFAULT_POLICY
) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    token: str | None = None
    while True:
        kwargs = {"TopicArn": topic_arn, **({"NextToken": token} if token else {})}
        page = policy.call(clients.sns.list_subscriptions_by_topic, **kwargs)
        for sub in page.get("Subscriptions", []):
            if sub.get("Protocol") == "sqs" and sub.get("SubscriptionArn", "").startswith("arn:"):
                found.setdefault(sub["Endpoint"], []).append(sub["SubscriptionArn"])
        token = page.get("NextToken")
        if not token:
            return found


def remove_registration(
    clients: Clients,
    *,
    bucket: str,
    layout: Layout,
    topic_arn: str,
    queue_name: str,
    stage: str,
    role: str,
    instance_id: str,
    subscription_arns: Iterable[str],
    dry_run: bool = False,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Removal:
    """Unsubscribe, delete queue + DLQ, delete the status report. Idempotent: missing pieces are skipped."""
    subscriptions = tuple(subscription_arns)
    queues = tuple(name for name in (queue_name, queue_name + DLQ_SUFFIX) if _queue_url(clients, name, policy))
    removal = Removal(
        instance_id, stage, role, subscriptions, queues, layout.status_key(stage, role, instance_id), dry_run
    )
    if dry_run:
        return removal
    for arn in subscriptions:
        try:
            policy.call(clients.sns.unsubscribe, SubscriptionArn=arn)
        except ClientError as exc:
            if error_code(exc) not in ("NotFound", "NotFoundException"):
                raise
    for name in queues:
        url = _queue_url(clients, name, policy)
        if url:
            try:
                policy.call(clients.sqs.delete_queue, QueueUrl=url)
            except ClientError as exc:
                if "NonExistentQueue" not in error_code(exc) and error_code(exc) != "QueueDoesNotExist":
                    raise
    policy.call(clients.s3.delete_object, Bucket=bucket, Key=removal.status_key)
    log.info(
        "instance_deregistered",
        instance_id=instance_id,
        stage=stage,
        role=role,
        subscriptions=len(subscriptions),
        queues=list(queues),
    )
    return removal


def deregister(
    clients: Clients,
    config: AgentConfig,
    instance_id: str,
    *,
    subscription_arn: str | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Removal:
    """An agent leaving the fleet on clean shutdown (opt-in: `deregister_on_shutdown`).

    With the subscription ARN from boot, no ListSubscriptionsByTopic is needed.
    """
    name = config.queue_name(instance_id)
    if subscription_arn:
        subscriptions = [subscription_arn]
    else:
        subscriptions = subscriptions_by_endpoint(clients, config.topic_arn, policy).get(
            queue_arn(config.topic_arn, name), []
        )
    return remove_registration(
        clients,
        bucket=config.bucket,
        layout=Layout(config.prefix),
        topic_arn=config.topic_arn,
        queue_name=name,
        stage=config.stage,
        role=config.role,
        instance_id=instance_id,
        subscription_arns=subscriptions,
        policy=policy,
    )


def _queue_url(clients: Clients, name: str, policy: RetryPolicy) -> str | None:
    try:
        return policy.call(clients.sqs.get_queue_url, QueueName=name)["QueueUrl"]
    except ClientError as exc:
        if "NonExistentQueue" in error_code(exc) or error_code(exc) == "QueueDoesNotExist":
            return None
        raise
