"""moto answers the Auto Scaling API but does not implement CompleteLifecycleAction (HTTP 500),
and puts every instance straight InService. `LifecycleFake` is an `AwsProxy` rule that answers
CompleteLifecycleAction the way AWS does, using moto's state: the hook must exist on the group,
the instance must be in the group, and each instance's launch action can be completed once
(then AWS answers "No active Lifecycle Action found"). Everything else goes to moto.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import boto3

from tests.awsproxy import Answer, Call, aws_proxy, query_error

XMLNS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"


@dataclass
class LifecycleFake:
    upstream: str
    completed: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    def before(self, call: Call) -> Answer | None:
        if (call.service, call.action) != ("autoscaling", "CompleteLifecycleAction"):
            return None
        return self.handle(call.params)

    def handle(self, params: Mapping[str, Any]) -> Answer:
        moto = boto3.client("autoscaling", endpoint_url=self.upstream)
        group, hook, instance = params["AutoScalingGroupName"], params["LifecycleHookName"], params["InstanceId"]
        hooks = moto.describe_lifecycle_hooks(AutoScalingGroupName=group, LifecycleHookNames=[hook])["LifecycleHooks"]
        members = moto.describe_auto_scaling_instances(InstanceIds=[instance])["AutoScalingInstances"]
        pending = [m for m in members if m["AutoScalingGroupName"] == group]
        if not hooks or not pending or any(c["InstanceId"] == instance for c in self.completed):
            return query_error(
                400, "ValidationError", f"No active Lifecycle Action found with instance ID {instance}", XMLNS
            )
        if params.get("LifecycleActionResult") not in ("CONTINUE", "ABANDON"):
            return query_error(400, "ValidationError", "LifecycleActionResult must be CONTINUE or ABANDON", XMLNS)
        self.completed.append({str(k): str(v) for k, v in params.items()})
        xml = (
            f'<CompleteLifecycleActionResponse xmlns="{XMLNS}"><CompleteLifecycleActionResult/>'
            "<ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></CompleteLifecycleActionResponse>"
        )
        return Answer(200, xml.encode(), {"Content-Type": "text/xml"})


@contextmanager
def lifecycle_proxy(upstream: str) -> Iterator[LifecycleFake]:
    fake = LifecycleFake(upstream)
    with aws_proxy(upstream, fake) as proxy:
        fake.url = proxy.url
        yield fake
