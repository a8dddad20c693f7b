from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState, ComponentStatus, Lifecycle
from publisher.fleet import fleet_rows, format_table, summary
from tests.support import make_deploy, report_entry

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


def test_an_instance_heartbeating_on_an_older_seq_than_the_pointer_is_behind_with_its_last_error() -> None:
    behind = {"api": ComponentStatus(state=ComponentState.OK, seq=10, last_error="manifest sha256 … does not match")}
    rows = fleet_rows(
        [
            report_entry("i-1", api(16), RECENT),
            report_entry("i-2", behind, RECENT),
            report_entry("i-3", api(9), HOURS_AGO),
        ],
        now=NOW,
        pointers={Channel("prod", "web", "api"): make_deploy(seq=16)},
    )
    by_instance = {r.instance_id: r for r in rows}
    assert (by_instance["i-2"].behind, by_instance["i-2"].error) == (True, "manifest sha256 … does not match")
    assert not by_instance["i-3"].behind  # stale, not behind: it is gone, not stuck
    assert "ok (behind 16)" in format_table(rows)
    assert summary(rows) == ["prod/web/api: 1/3 on seq 16, 0 failed, 1 behind, 1 stale"]


def test_wait_says_where_a_pending_instance_is_and_its_last_error() -> None:
    from publisher.wait import Convergence, assess
    from tests.support import make_deploy

    stuck = {"api": ComponentStatus(state=ComponentState.OK, seq=10, last_error="hook post #0 exited 4")}
    entries = {"i-2": report_entry("i-2", stuck, RECENT)}
    progress = assess(make_deploy(seq=16), frozenset(entries), entries, NOW, 600, 5)
    assert progress.outcomes == {"i-2": Convergence.PENDING}
    assert progress.errors == {"i-2": "on seq 10 (ok), last error: hook post #0 exited 4"}


def test_an_agent_that_cannot_boot_shows_boot_failed_with_the_reason_on_every_component() -> None:
    entry = report_entry("i-1", api(40), RECENT)
    assert entry.report is not None
    broken = replace(entry, report=replace(entry.report, boot_error="AwsError: AccessDenied"))
    rows = fleet_rows([broken, report_entry("i-2", api(41), RECENT)], now=NOW)
    assert [(r.instance_id, r.state, r.error) for r in rows] == [
        ("i-1", "boot_failed", "AwsError: AccessDenied"),
        ("i-2", "ok", ""),
    ]
    assert summary(rows) == ["prod/web/api: 1/2 on seq 41, 0 failed, 1 cannot boot"]


def test_warmed_and_terminated_instances_are_counted_apart_from_the_fleet() -> None:
    pointers = {Channel("prod", "web", "api"): make_deploy(seq=3)}
    entries = [
        report_entry("i-1", api(3), NOW),
        report_entry("i-2", api(2), NOW, lifecycle=Lifecycle.WARMED),
        report_entry("i-3", api(2), NOW, lifecycle=Lifecycle.TERMINATED),
    ]
    rows = fleet_rows(entries, now=NOW, pointers=pointers)
    assert [(r.instance_id, r.state, r.behind) for r in rows] == [
        ("i-1", "ok", False),
        ("i-2", "warmed", False),
        ("i-3", "terminated", False),
    ]
    assert summary(rows) == ["prod/web/api: 1/1 on seq 3, 0 failed, 1 warmed, 1 terminated"]
