from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from deployer.aws.cloudwatch import Gauge, Unit
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState, ComponentStatus, Lifecycle
from publisher.fleet import fleet_gauges, fleet_rows, format_table, summary
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


# -- the gauges `status --metrics` puts into CloudWatch -----------------------------------------


def gauges_of(gauges: list[Gauge], component: str = "api", role: str = "web") -> dict[str, float]:
    """One channel's gauges by metric name."""
    wanted = (("Stage", "prod"), ("Role", role), ("Component", component))
    return {g.name: g.value for g in gauges if g.dimensions == wanted}


def test_an_instance_behind_the_pointer_counts_as_behind_not_converged() -> None:
    behind = {"api": ComponentStatus(state=ComponentState.OK, release_id="r10", seq=10)}
    rows = fleet_rows(
        [
            report_entry("i-1", api(16), RECENT),
            report_entry("i-2", behind, RECENT),
            report_entry("i-3", api(9), HOURS_AGO),  # stale: gone, neither live nor behind
        ],
        now=NOW,
        pointers={Channel("prod", "web", "api"): make_deploy(seq=16)},
    )
    gauges = fleet_gauges(rows, NOW)
    assert gauges_of(gauges) == {
        "OnCurrent": 1,
        "Behind": 1,
        "Failed": 0,
        "Stale": 1,
        "Live": 2,
        "ConvergedPercent": 50,
    }
    assert {g.timestamp for g in gauges} == {NOW}
    assert {g.name: g.unit for g in gauges}["ConvergedPercent"] is Unit.PERCENT
    assert {g.unit for g in gauges if g.name != "ConvergedPercent"} == {Unit.COUNT}


def test_a_fleet_on_the_pointer_is_fully_converged() -> None:
    rows = fleet_rows(
        [report_entry("i-1", api(5), RECENT), report_entry("i-2", api(5), RECENT)],
        now=NOW,
        pointers={Channel("prod", "web", "api"): make_deploy(seq=5)},
    )
    assert gauges_of(fleet_gauges(rows, NOW)) == {
        "OnCurrent": 2,
        "Behind": 0,
        "Failed": 0,
        "Stale": 0,
        "Live": 2,
        "ConvergedPercent": 100,
    }


def test_a_channel_with_no_live_instance_is_converged_so_its_alarm_watches_live_instead() -> None:
    rows = fleet_rows([report_entry("i-1", api(4), HOURS_AGO), report_entry("i-2", api(3), HOURS_AGO)], now=NOW)
    found = gauges_of(fleet_gauges(rows, NOW))
    assert (found["Live"], found["Stale"], found["OnCurrent"], found["ConvergedPercent"]) == (0, 2, 0, 100)


def test_failed_and_rejected_count_as_failed_and_an_instance_that_cannot_boot_only_lowers_convergence() -> None:
    cannot_boot = report_entry("i-4", api(7), RECENT)
    assert cannot_boot.report is not None
    cannot_boot = replace(cannot_boot, report=replace(cannot_boot.report, boot_error="AwsError: AccessDenied"))
    rows = fleet_rows(
        [
            report_entry("i-1", api(7), RECENT),
            report_entry("i-2", api(7, ComponentState.FAILED), RECENT),
            report_entry("i-3", api(7, ComponentState.REJECTED), RECENT),
            cannot_boot,
        ],
        now=NOW,
        pointers={Channel("prod", "web", "api"): make_deploy(seq=7)},
    )
    found = gauges_of(fleet_gauges(rows, NOW))
    assert (found["OnCurrent"], found["Failed"], found["Live"], found["ConvergedPercent"]) == (1, 2, 4, 25)


def test_warmed_and_terminated_instances_are_in_no_gauge() -> None:
    rows = fleet_rows(
        [
            report_entry("i-1", api(3), RECENT),
            report_entry("i-2", api(2), RECENT, lifecycle=Lifecycle.WARMED),
            report_entry("i-3", api(2), HOURS_AGO, lifecycle=Lifecycle.TERMINATED),
        ],
        now=NOW,
        pointers={Channel("prod", "web", "api"): make_deploy(seq=3)},
    )
    found = gauges_of(fleet_gauges(rows, NOW))
    assert (found["Live"], found["Stale"], found["ConvergedPercent"]) == (1, 0, 100)


def test_without_a_pointer_the_newest_seq_reported_is_current_as_in_the_summary() -> None:
    rows = fleet_rows([report_entry("i-1", api(41), RECENT), report_entry("i-2", api(40), RECENT)], now=NOW)
    found = gauges_of(fleet_gauges(rows, NOW))
    assert (found["OnCurrent"], found["Behind"], found["ConvergedPercent"]) == (1, 0, 50)
    assert summary(rows) == ["prod/web/api: 1/2 on seq 41, 0 failed"]


def test_each_channel_has_its_own_six_gauges_and_an_unreadable_report_counts_in_none() -> None:
    both = {**api(2), "assets": ComponentStatus(state=ComponentState.OK, release_id="a", seq=9)}
    rows = fleet_rows(
        [
            report_entry("i-1", both, RECENT),
            report_entry("i-2", api(2), RECENT, role="worker"),
            report_entry("i-bad", {}, RECENT, error="not JSON"),
        ],
        now=NOW,
    )
    gauges = fleet_gauges(rows, NOW)
    channels = {tuple(value for _, value in g.dimensions) for g in gauges}
    assert channels == {("prod", "web", "api"), ("prod", "web", "assets"), ("prod", "worker", "api")}
    assert len(gauges) == 6 * len(channels)
    assert {name for g in gauges for name, _ in g.dimensions} == {"Stage", "Role", "Component"}
    assert sum(g.value for g in gauges if g.name == "Live") == 3  # i-bad is in no channel
    assert fleet_gauges([], NOW) == []
