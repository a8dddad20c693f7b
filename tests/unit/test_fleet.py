from __future__ import annotations

from datetime import UTC, datetime, timedelta

from deployer.protocol.report import ComponentState, ComponentStatus
from publisher.fleet import fleet_rows, format_table, summary
from tests.support import report_entry

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
RECENT = NOW - timedelta(seconds=60)
HOURS_AGO = NOW - timedelta(hours=3)


def api(seq: int, state: ComponentState = ComponentState.OK) -> dict[str, ComponentStatus]:
    return {"api": ComponentStatus(state=state, release_id=f"r{seq}", seq=seq)}


def test_summary_counts_instances_on_the_newest_seq_and_failures() -> None:
    rows = fleet_rows(
        [
            report_entry("i-1", api(41), RECENT),
            report_entry("i-2", api(41), RECENT),
            report_entry("i-3", api(40, ComponentState.FAILED), RECENT),
            report_entry("i-4", api(41), HOURS_AGO),
        ],
        now=NOW,
    )
    assert summary(rows) == ["prod/web/api: 3/4 on seq 41, 1 failed, 1 stale"]


def test_the_table_marks_stale_instances_and_shows_ages() -> None:
    rows = fleet_rows([report_entry("i-1", api(2), RECENT), report_entry("i-2", api(2), HOURS_AGO)], now=NOW)
    table = format_table(rows)
    assert "INSTANCE" in table.splitlines()[0]
    assert "ok (stale)" in table.splitlines()[2]
    assert "60s" in table.splitlines()[1]


def test_a_component_filter_keeps_only_that_component() -> None:
    both = {**api(1), "web": ComponentStatus(state=ComponentState.OK, release_id="w", seq=9)}
    assert [r.component for r in fleet_rows([report_entry("i-1", both, RECENT)], component="web", now=NOW)] == ["web"]


def test_an_unreadable_report_is_a_row_of_its_own_and_counted_in_the_summary() -> None:
    rows = fleet_rows(
        [report_entry("i-1", api(3), RECENT), report_entry("i-bad", {}, RECENT, error="heartbeat_at 'x' is not…")],
        now=NOW,
    )
    bad = next(r for r in rows if r.instance_id == "i-bad")
    assert (bad.state, bad.error, bad.stale) == ("unreadable", "heartbeat_at 'x' is not…", False)
    assert summary(rows) == [
        "prod/web/api: 1/1 on seq 3, 0 failed",
        "prod/web: 1 unreadable report(s) (see the ERROR column)",
    ]
