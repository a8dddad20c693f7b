"""Leaving cleanly: the Auto Scaling terminate lifecycle hook.

With a hook on `autoscaling:EC2_INSTANCE_TERMINATING` (`terminate_hook_name`), Auto Scaling holds
a terminating instance in `Terminating:Wait` until someone completes the action, and IMDS says
`Terminated` at `autoscaling/target-lifecycle-state` from that moment. The agent polls it (a
loopback HTTP call, no AWS request) and, when it sees it:

1. stops taking deploys, as on SIGTERM; a running apply may finish within the hook's global
   timeout (100 × HeartbeatTimeout, at most 48 h) less a margin for leaving, while a heartbeat
   (`RecordLifecycleActionHeartbeat`, every third of HeartbeatTimeout) keeps the action alive;
   past that it is abandoned exactly as a SIGTERM's grace abandons it, crash-safe;
2. takes itself out of its target groups and drains (`deployer.agent.traffic`), if it serves;
3. removes its subscription, queue and DLQ, so `gc` has nothing left to collect;
4. writes a last status report saying `terminated` (readers then count it gone, not lost);
5. completes the action with CONTINUE, and idles until the instance stops it (a restart by
   systemd must not re-create the queue: `left.json` in the state directory says it left).

Every step is best effort and logged: a step that fails leaves the rest to `gc` and to the
hook's DefaultResult, and never keeps the instance from terminating.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from deployer.agent.config import AgentConfig
from deployer.apply.fsutil import write_atomic
from deployer.aws.autoscaling import (
    GLOBAL_TIMEOUT_CAP_SECONDS,
    GLOBAL_TIMEOUT_FACTOR,
    complete_lifecycle_action,
    find_asg,
    heartbeat_timeout,
    record_heartbeat,
)
from deployer.aws.retry import RetryPolicy

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

log = structlog.get_logger(__name__)

#: What leaving takes after the apply (drain, queue removal, report, completion): the running
#: apply gets the hook's global timeout less this, or less a tenth of it if that is shorter.
LEAVE_MARGIN_SECONDS = 300.0
LEAVE_MARGIN_SHARE = 0.1
#: The marker of an agent that left its fleet (its queue is gone; it must not boot again).
LEFT_MARKER = "left.json"


def apply_grace(heartbeat_timeout_s: float) -> float:
    """How long a running apply may go on once the instance is terminating. Pure."""
    global_timeout = min(GLOBAL_TIMEOUT_FACTOR * heartbeat_timeout_s, GLOBAL_TIMEOUT_CAP_SECONDS)
    return global_timeout - min(LEAVE_MARGIN_SECONDS, LEAVE_MARGIN_SHARE * global_timeout)


def left_marker(config: AgentConfig) -> Path:
    return config.state_dir / LEFT_MARKER


def mark_left(config: AgentConfig, instance_id: str) -> None:
    write_atomic(left_marker(config), json.dumps({"instance_id": instance_id}).encode())


@dataclass
class TerminateHook:
    """The terminate hook of this instance: its group, its heartbeat timeout, the calls on it."""

    autoscaling: AutoScalingClient
    hook: str
    instance_id: str
    policy: RetryPolicy
    asg_name: str | None = None

    def group(self) -> str | None:
        if self.asg_name is None:
            self.asg_name = find_asg(self.autoscaling, self.instance_id, self.policy)
        return self.asg_name

    def heartbeat_timeout(self) -> float | None:
        group = self.group()
        if group is None:
            return None
        return heartbeat_timeout(self.autoscaling, hook=self.hook, asg=group, policy=self.policy)

    def heartbeat(self) -> bool:
        group = self.group()
        return group is not None and record_heartbeat(
            self.autoscaling, hook=self.hook, asg=group, instance_id=self.instance_id, policy=self.policy
        )

    def complete(self) -> bool:
        group = self.group()
        return group is not None and complete_lifecycle_action(
            self.autoscaling,
            hook=self.hook,
            asg=group,
            instance_id=self.instance_id,
            result="CONTINUE",
            policy=self.policy,
        )


def keep_alive(hook: TerminateHook, interval: float, applying: threading.Event, done: threading.Event) -> None:
    """While an apply runs, restart the hook's heartbeat timeout every `interval` seconds."""
    while not done.wait(interval):
        if not applying.is_set():
            continue
        try:
            recorded = hook.heartbeat()
        except Exception as exc:  # noqa: BLE001 - a missed beat only risks the hook's DefaultResult
            log.warning("lifecycle_heartbeat_failed", error=str(exc), next="beating again at the next interval")
            continue
        log.info("lifecycle_heartbeat", recorded=recorded, next="the apply goes on; the hook waits")
