"""CloudWatch adapter: which of the named alarms are in ALARM (a staged rollout's optional gate)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy

if TYPE_CHECKING:
    from mypy_boto3_cloudwatch import CloudWatchClient

#: DescribeAlarms takes at most 100 alarm names per call.
#: https://docs.aws.amazon.com/AmazonCloudWatch/latest/APIReference/API_DescribeAlarms.html
MAX_ALARM_NAMES = 100


def alarms_in_alarm(
    cloudwatch: CloudWatchClient, names: Sequence[str], policy: RetryPolicy = DEFAULT_POLICY
) -> list[str]:
    """The names among `names` whose alarm is in state ALARM (metric or composite)."""
    firing: list[str] = []
    for start in range(0, len(names), MAX_ALARM_NAMES):
        found = policy.call(
            cloudwatch.describe_alarms,
            AlarmNames=list(names[start : start + MAX_ALARM_NAMES]),
            StateValue="ALARM",
            AlarmTypes=["MetricAlarm", "CompositeAlarm"],
        )
        firing += [a["AlarmName"] for a in found.get("MetricAlarms", [])]
        firing += [a["AlarmName"] for a in found.get("CompositeAlarms", [])]
    return sorted(firing)
