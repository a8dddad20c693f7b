"""Fleet view for `deployer status`: status reports → table rows and a summary. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from deployer.status import age_seconds


@dataclass(frozen=True)
class Row:
    instance_id: str
    stage: str
    role: str
    component: str
    release_id: str
    seq: int | None
    state: str
    error: str
    heartbeat_age_s: float | None
    stale: bool
    deploy_id: str | None = None
    output_tail: str | None = None
    updated_at: str | None = None
    agent_version: str | None = None
    heartbeat_at: str | None = None


def fleet_rows(
    reports: Iterable[Mapping[str, Any]],
    *,
    component: str | None = None,
    stale_after_s: float = 3600.0,
    now: datetime | None = None,
) -> list[Row]:
    rows: list[Row] = []
    for report in reports:
        age = age_seconds(report.get("heartbeat_at"), now)
        stale = age is None or age > stale_after_s
        for name, status in sorted(report.get("components", {}).items()):
            if component and name != component:
                continue
            rows.append(
                Row(
                    instance_id=str(report.get("instance_id", "?")),
                    stage=str(report.get("stage", "?")),
                    role=str(report.get("role", "?")),
                    component=name,
                    release_id=status.get("release_id") or "-",
                    seq=status.get("seq"),
                    state=str(status.get("state", "?")),
                    error=status.get("error") or "",
                    heartbeat_age_s=age,
                    stale=stale,
                    deploy_id=status.get("deploy_id"),
                    output_tail=status.get("output_tail"),
                    updated_at=status.get("updated_at"),
                    agent_version=report.get("agent_version"),
                    heartbeat_at=report.get("heartbeat_at"),
                )
            )
    rows.sort(key=lambda r: (r.stage, r.role, r.component, r.instance_id))
    return rows


def summary(rows: Iterable[Row]) -> list[str]:
    """One line per channel: "prod/web/api: 12/12 on seq 41, 0 failed"."""
    by_channel: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        by_channel.setdefault((row.stage, row.role, row.component), []).append(row)
    lines = []
    for (stage, role, component), members in sorted(by_channel.items()):
        top = max((r.seq for r in members if r.seq is not None), default=None)
        on_top = sum(1 for r in members if r.seq == top and r.state == "ok")
        failed = sum(1 for r in members if r.state in ("failed", "rejected"))
        stale = sum(1 for r in members if r.stale)
        line = f"{stage}/{role}/{component}: {on_top}/{len(members)} on seq {top if top is not None else '-'}, {failed} failed"
        if stale:
            line += f", {stale} stale"
        lines.append(line)
    return lines


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def format_table(rows: list[Row]) -> str:
    header = ("INSTANCE", "STAGE", "ROLE", "COMPONENT", "RELEASE", "SEQ", "STATE", "AGE", "ERROR")
    body = [
        (
            r.instance_id,
            r.stage,
            r.role,
            r.component,
            r.release_id,
            str(r.seq) if r.seq is not None else "-",
            r.state + (" (stale)" if r.stale else ""),
            format_age(r.heartbeat_age_s),
            r.error[:60],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    )
