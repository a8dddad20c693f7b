"""Auto Scaling lifecycle actions as AWS keeps them, on loopback, in front of moto.

moto answers the Auto Scaling API but implements neither CompleteLifecycleAction nor
RecordLifecycleActionHeartbeat (HTTP 500), puts every instance straight InService and never
terminates one through a hook. `LifecycleFake` is an `AwsProxy` rule that keeps the actions
AWS would have pending, using moto's state for the rest:

- **Launch**: an instance of a group with an `EC2_INSTANCE_LAUNCHING` hook has one launch action,
  which can be completed once (then AWS answers "No active Lifecycle Action found").
- **Terminate**: `terminate(instance)` puts it in `Terminating:Wait` for the group's
  `EC2_INSTANCE_TERMINATING` hook (what a scale-in does on AWS). The action ends with
  CompleteLifecycleAction, or with the hook's DefaultResult once HeartbeatTimeout passes
  without a RecordLifecycleActionHeartbeat; the global timeout (100 × HeartbeatTimeout, at most
  48 h) bounds the heartbeats. https://docs.aws.amazon.com/autoscaling/ec2/userguide/lifecycle-hooks-overview.html
- **Warm pools**: `warm(instance)` gives the instance a launch action into the warm pool
  (`Warmed:Pending:Wait`; completed, it is `Warmed:Stopped`), `enter_service(instance)` a new one
  out of it (`Pending:Wait`; completed, `InService`), and sets the target lifecycle state its
  IMDS answers (`Warmed:Stopped`, then `InService`). moto stores a warm pool's configuration
  only. https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html
- **Time** runs at `time_scale` (0.1: a 30 s heartbeat timeout, AWS's minimum, lasts 3 s), and
  DescribeLifecycleHooks answers with the scaled HeartbeatTimeout, so an agent that paces its
  heartbeats by it lives in the same time as the fake.

Everything else goes to moto.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import boto3

from tests.awsproxy import Answer, Call, aws_proxy, query_error

XMLNS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
#: The global timeout of a lifecycle action: 100 × HeartbeatTimeout, at most 48 hours.
GLOBAL_TIMEOUT_FACTOR = 100
GLOBAL_TIMEOUT_CAP_SECONDS = 48 * 3600.0


@dataclass
class Pending:
    """A terminating instance's action: when it ends unless a heartbeat comes, and when it ends anyway."""

    group: str
    hook: str
    default_result: str
    timeout_s: float
    deadline: float
    global_deadline: float
    heartbeats: int = 0
    #: CONTINUE / ABANDON once completed; `default:<result>` if it timed out.
    result: str | None = None


@dataclass
class LifecycleFake:
    upstream: str
    time_scale: float = 1.0
    completed: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    terminating: dict[str, Pending] = field(default_factory=dict)
    #: Launch actions given by `warm` / `enter_service`: instance → the state completion leads to.
    launching: dict[str, str] = field(default_factory=dict)
    #: Each instance's emulated lifecycle state, once a test moved it (warm pool, service).
    states: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def before(self, call: Call) -> Answer | None:
        if call.service != "autoscaling":
            return None
        if call.action == "CompleteLifecycleAction":
            return self.complete(call.params)
        if call.action == "RecordLifecycleActionHeartbeat":
            return self.heartbeat(call.params)
        if call.action == "DescribeLifecycleHooks":
            return self.describe_hooks(call.params)
        return None

    # -- what a test does ---------------------------------------------------------------------

    def terminate(self, instance: str) -> Pending:
        """Scale-in: the instance enters Terminating:Wait for its group's terminate hook."""
        [member] = self._moto().describe_auto_scaling_instances(InstanceIds=[instance])["AutoScalingInstances"]
        group = member["AutoScalingGroupName"]
        hooks = [h for h in self._hooks(group) if h["LifecycleTransition"] == TERMINATING]
        assert hooks, f"{group} has no terminate hook"
        hook = hooks[0]
        timeout = float(hook.get("HeartbeatTimeout", 3600)) * self.time_scale
        now = time.monotonic()
        global_timeout = min(GLOBAL_TIMEOUT_FACTOR * timeout, GLOBAL_TIMEOUT_CAP_SECONDS * self.time_scale)
        pending = Pending(
            group,
            hook["LifecycleHookName"],
            hook.get("DefaultResult", "ABANDON"),
            timeout,
            now + timeout,
            now + global_timeout,
        )
        with self._lock:
            self.terminating[instance] = pending
        return pending

    def warm(self, instance: str, imds: type[Any]) -> None:
        """Launched into a warm pool whose instances are stopped: Warmed:Pending:Wait until the launch hook completes."""
        with self._lock:
            self.launching[instance] = "Warmed:Stopped"
            self.states[instance] = "Warmed:Pending:Wait"
        imds.lifecycle_state = "Warmed:Stopped"

    def enter_service(self, instance: str, imds: type[Any]) -> None:
        """Scale-out takes it from the warm pool: Pending:Wait until the launch hook completes again."""
        with self._lock:
            self.launching[instance] = "InService"
            self.states[instance] = "Pending:Wait"
        imds.lifecycle_state = "InService"

    def outcome(self, instance: str) -> str | None:
        """How the instance's terminate action ended (None while it waits)."""
        with self._lock:
            pending = self.terminating[instance]
            self._expire(pending)
            return pending.result

    # -- the API ------------------------------------------------------------------------------

    def complete(self, params: Mapping[str, Any]) -> Answer:
        group, hook, instance = params["AutoScalingGroupName"], params["LifecycleHookName"], params["InstanceId"]
        result = params.get("LifecycleActionResult")
        if result not in ("CONTINUE", "ABANDON"):
            return query_error(400, "ValidationError", "LifecycleActionResult must be CONTINUE or ABANDON", XMLNS)
        with self._lock:
            pending = self._pending(instance, group, hook)
            if pending is not None:
                pending.result = str(result)
                self.completed.append({str(k): str(v) for k, v in params.items()})
                return _ok("CompleteLifecycleAction")
            if instance in self.launching:  # a warm-pool launch action, or one out of the pool
                self.states[instance] = self.launching.pop(instance) if result == "CONTINUE" else "Terminating"
                self.completed.append({str(k): str(v) for k, v in params.items()})
                return _ok("CompleteLifecycleAction")
        launch = [h for h in self._hooks(group, hook) if h["LifecycleTransition"] == LAUNCHING]
        members = self._moto().describe_auto_scaling_instances(InstanceIds=[instance])["AutoScalingInstances"]
        in_group = [m for m in members if m["AutoScalingGroupName"] == group]
        with self._lock:
            done = any(c["InstanceId"] == instance and c["LifecycleHookName"] == hook for c in self.completed)
            if not launch or not in_group or done:
                return _no_action(instance)
            self.completed.append({str(k): str(v) for k, v in params.items()})
        return _ok("CompleteLifecycleAction")

    def heartbeat(self, params: Mapping[str, Any]) -> Answer:
        instance = params["InstanceId"]
        with self._lock:
            pending = self._pending(instance, params["AutoScalingGroupName"], params["LifecycleHookName"])
            if pending is None:
                return _no_action(instance)
            pending.heartbeats += 1
            pending.deadline = min(time.monotonic() + pending.timeout_s, pending.global_deadline)
        return _ok("RecordLifecycleActionHeartbeat")

    def describe_hooks(self, params: Mapping[str, Any]) -> Answer:
        names = [v for k, v in params.items() if k.startswith("LifecycleHookNames.member.")]
        members = ""
        for hook in self._hooks(params["AutoScalingGroupName"], *names):
            fields = {k: v for k, v in hook.items() if isinstance(v, str | int)}
            for name in ("HeartbeatTimeout", "GlobalTimeout"):
                if name in fields:
                    fields[name] = max(1, math.ceil(float(fields[name]) * self.time_scale))
            members += "<member>" + "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in fields.items()) + "</member>"
        return _ok("DescribeLifecycleHooks", f"<LifecycleHooks>{members}</LifecycleHooks>")

    # -- state --------------------------------------------------------------------------------

    def _pending(self, instance: str, group: str, hook: str) -> Pending | None:
        pending = self.terminating.get(instance)
        if pending is None or (pending.group, pending.hook) != (group, hook):
            return None
        self._expire(pending)
        return pending if pending.result is None else None

    def _expire(self, pending: Pending) -> None:
        if pending.result is None and time.monotonic() >= pending.deadline:
            pending.result = f"default:{pending.default_result}"

    def _hooks(self, group: str, *names: str) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {"AutoScalingGroupName": group}
        if names:
            kwargs["LifecycleHookNames"] = list(names)
        return list(self._moto().describe_lifecycle_hooks(**kwargs)["LifecycleHooks"])

    def _moto(self) -> Any:
        return boto3.client("autoscaling", endpoint_url=self.upstream)


def _ok(action: str, result: str = "") -> Answer:
    xml = (
        f'<{action}Response xmlns="{XMLNS}"><{action}Result>{result}</{action}Result>'
        f"<ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></{action}Response>"
    )
    return Answer(200, xml.encode(), {"Content-Type": "text/xml"})


def _no_action(instance: str) -> Answer:
    return query_error(400, "ValidationError", f"No active Lifecycle Action found with instance ID {instance}", XMLNS)


@contextmanager
def lifecycle_proxy(upstream: str, time_scale: float = 1.0) -> Iterator[LifecycleFake]:
    fake = LifecycleFake(upstream, time_scale)
    with aws_proxy(upstream, fake) as proxy:
        fake.url = proxy.url
        yield fake
