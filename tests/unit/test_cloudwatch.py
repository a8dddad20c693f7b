"""The CloudWatch adapter's pure part: gauges cut into PutMetricData requests within its limits."""

from __future__ import annotations

from datetime import UTC, datetime

from deployer.aws.cloudwatch import (
    MAX_METRICS_PER_PUT,
    MAX_PUT_BYTES,
    PUT_OVERHEAD_BYTES,
    Gauge,
    Unit,
    batches,
    encoded_size,
)

NOW = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)
#: stage, role and component names are at most 32 characters (deployer.protocol.names).
LONGEST_NAME = "a" * 32


def gauge(n: int, name: str = "OnCurrent", value: str = "api") -> Gauge:
    dimensions = (("Stage", "prod"), ("Role", "web"), ("Component", f"{value}{n}"))
    return Gauge(name, float(n), Unit.COUNT, dimensions, NOW)


def test_gauges_are_put_a_thousand_at_most_per_request_in_their_order() -> None:
    gauges = [gauge(n) for n in range(2 * MAX_METRICS_PER_PUT + 500)]
    cut = list(batches(gauges))
    assert [len(batch) for batch in cut] == [1000, 1000, 500]
    assert [g for batch in cut for g in batch] == gauges


def test_a_request_is_cut_before_its_payload_would_pass_the_limit() -> None:
    gauges = [gauge(n) for n in range(10)]
    room = PUT_OVERHEAD_BYTES + 3 * encoded_size(gauges[0])
    cut = list(batches(gauges, max_bytes=room))
    assert all(len(batch) <= 3 for batch in cut)
    assert [g for batch in cut for g in batch] == gauges


def test_a_thousand_of_the_widest_gauges_fit_in_one_request_so_the_count_limit_binds_first() -> None:
    widest = [
        Gauge(
            "ConvergedPercent",
            100.0 / 3,
            Unit.PERCENT,
            (("Stage", LONGEST_NAME), ("Role", LONGEST_NAME), ("Component", LONGEST_NAME)),
            NOW,
        )
    ] * MAX_METRICS_PER_PUT
    assert PUT_OVERHEAD_BYTES + sum(encoded_size(g) for g in widest) < MAX_PUT_BYTES
    assert [len(batch) for batch in batches(widest)] == [MAX_METRICS_PER_PUT]


def test_no_gauge_is_no_request() -> None:
    assert list(batches([])) == []
