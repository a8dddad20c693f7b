from __future__ import annotations

from datetime import UTC, datetime

from deployer.fleet import fleet_rows, format_table, summary

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def report(instance: str, seq: int, state: str = "ok", heartbeat: str = "2026-11-26T11:59:00Z") -> dict[str, object]:
    return {
        "instance_id": instance,
        "stage": "prod",
        "role": "web",
        "heartbeat_at": heartbeat,
        "components": {"api": {"release_id": f"r{seq}", "seq": seq, "state": state, "error": None}},
    }


def test_summary_counts_instances_on_the_newest_seq_and_failures() -> None:
    rows = fleet_rows(
        [
            report("i-1", 41),
            report("i-2", 41),
            report("i-3", 40, "failed"),
            report("i-4", 41, heartbeat="2026-11-26T09:00:00Z"),
        ],
        now=NOW,
    )
    assert summary(rows) == ["prod/web/api: 3/4 on seq 41, 1 failed, 1 stale"]


def test_the_table_marks_stale_instances_and_shows_ages() -> None:
    rows = fleet_rows([report("i-1", 2), report("i-2", 2, heartbeat="2026-11-26T09:00:00Z")], now=NOW)
    table = format_table(rows)
    assert "INSTANCE" in table.splitlines()[0]
    assert "ok (stale)" in table.splitlines()[2]
    assert "60s" in table.splitlines()[1]


def test_a_component_filter_keeps_only_that_component() -> None:
    doc = report("i-1", 1)
    doc["components"]["web"] = {"release_id": "w", "seq": 9, "state": "ok"}  # type: ignore[index]
    assert [r.component for r in fleet_rows([doc], component="web", now=NOW)] == ["web"]
