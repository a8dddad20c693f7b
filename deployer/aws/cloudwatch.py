"""CloudWatch adapter: which of the named alarms are in ALARM (a staged rollout's optional gate),
and the fleet's gauges put as metrics (`deployer status --metrics`)."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy

if TYPE_CHECKING:
    from mypy_boto3_cloudwatch import CloudWatchClient
    from mypy_boto3_cloudwatch.type_defs import MetricDatumTypeDef

#: DescribeAlarms takes at most 100 alarm names per call.
#: https://docs.aws.amazon.com/AmazonCloudWatch/latest/APIReference/API_DescribeAlarms.html
MAX_ALARM_NAMES = 100
#: PutMetricData: "Each PutMetricData request is limited to 1 MB in size for HTTP POST requests
#: […] Each request is also limited to no more than 1000 different metrics."
#: https://docs.aws.amazon.com/AmazonCloudWatch/latest/APIReference/API_PutMetricData.html
MAX_METRICS_PER_PUT = 1000
MAX_PUT_BYTES = 1_000_000
#: What a request carries besides its data (action, version, namespace of at most 255
#: characters), kept free under MAX_PUT_BYTES.
PUT_OVERHEAD_BYTES = 4096


class Unit(enum.StrEnum):
    """The CloudWatch units the deployer's gauges use."""

    COUNT = "Count"
    PERCENT = "Percent"


@dataclass(frozen=True)
class Gauge:
    """One value of one metric at one instant: a PutMetricData `MetricDatum`, as plain data."""

    name: str
    value: float
    unit: Unit
    #: (name, value) pairs, in the order they are shown.
    dimensions: tuple[tuple[str, str], ...]
    #: When the value was true (for the fleet: when the reports were read), timezone-aware.
    timestamp: datetime


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


def put_gauges(
    cloudwatch: CloudWatchClient, namespace: str, datums: Sequence[Gauge], policy: RetryPolicy = DEFAULT_POLICY
) -> int:
    """Put every gauge into `namespace`, as few PutMetricData calls as its limits allow; how many calls.

    A retried call puts the same values at the same timestamps again: CloudWatch keeps both
    samples, and the Maximum, Minimum and Average an alarm watches stay what they were.
    """
    calls = 0
    for batch in batches(datums):
        policy.call(cloudwatch.put_metric_data, Namespace=namespace, MetricData=[_datum(g) for g in batch])
        calls += 1
    return calls


def batches(
    datums: Sequence[Gauge], max_metrics: int = MAX_METRICS_PER_PUT, max_bytes: int = MAX_PUT_BYTES
) -> Iterator[list[Gauge]]:
    """`datums` cut into requests of at most `max_metrics` gauges and `max_bytes` on the wire. Pure.

    Each gauge is measured in the query protocol's form encoding, the most verbose of the three
    botocore may speak to CloudWatch (CBOR, JSON, query), so the cut holds whichever it picks.
    """
    batch: list[Gauge] = []
    size = PUT_OVERHEAD_BYTES
    for gauge in datums:
        grows = encoded_size(gauge, max_metrics)
        if batch and (len(batch) == max_metrics or size + grows > max_bytes):
            yield batch
            batch, size = [], PUT_OVERHEAD_BYTES
        batch.append(gauge)
        size += grows
    if batch:
        yield batch


def encoded_size(gauge: Gauge, index: int = MAX_METRICS_PER_PUT) -> int:
    """Bytes `gauge` adds to a form-encoded PutMetricData as member `index` (the widest one). Pure."""
    member = f"MetricData.member.{index}."
    fields = [
        (member + "MetricName", gauge.name),
        (member + "Value", repr(float(gauge.value))),
        (member + "Unit", gauge.unit.value),
        (member + "Timestamp", gauge.timestamp.isoformat()),
    ]
    for number, (name, value) in enumerate(gauge.dimensions, 1):
        fields += [
            (f"{member}Dimensions.member.{number}.Name", name),
            (f"{member}Dimensions.member.{number}.Value", value),
        ]
    return len(urlencode(fields)) + 1  # and the `&` before it


def _datum(gauge: Gauge) -> MetricDatumTypeDef:
    return {
        "MetricName": gauge.name,
        "Dimensions": [{"Name": name, "Value": value} for name, value in gauge.dimensions],
        "Timestamp": gauge.timestamp,
        "Value": gauge.value,
        "Unit": gauge.unit.value,
    }
