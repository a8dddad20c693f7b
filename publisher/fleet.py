"""Fleet view for `deployer status`: status reports → table rows and a summary. Pure.

A report that cannot be read is one row of its own, state `unreadable`, with the parse error,
and is counted in the summary: an operator sees it instead of the command crashing or
silently showing one instance fewer.

Each row is compared with its channel's pointer: an instance that heartbeats but sits on an
older seq is `behind`, shown with the last error it reported, however `ok` its own state says
it is — an instance silently behind must not look healthy.

`fleet_gauges` turns the same rows into per-channel gauges for CloudWatch (`status --metrics`),
so an alarm can watch convergence with the numbers the table shows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from deployer.aws.cloudwatch import Gauge, Unit
from deployer.aws.reports import ReportEntry
from deployer.protocol.deploy import Deploy
from deployer.protocol.names import Channel
from deployer.protocol.report import FAILING_STATES, ComponentState, Lifecycle
from deployer.protocol.timestamps import TIMESTAMP_FORMAT, age_seconds
from publisher.text import render_table

#: The state shown for a report whose body could not be parsed.
UNREADABLE = "unreadable"
#: The component cell of an unreadable report's row.
NO_COMPONENT = "-"
#: The state shown for every component of an agent that cannot finish boot (it retries).
BOOT_FAILED = "boot_failed"
#: A row's state for an instance asleep in a warm pool, or one that left through its terminate hook.
WARMED, TERMINATED = Lifecycle.WARMED.value, Lifecycle.TERMINATED.value
#: The row states that count as failed (failed, rejected).
FAILING = frozenset(state.value for state in FAILING_STATES)
#: The dimensions of every fleet gauge, in this order: one metric per channel.
DIMENSIONS = ("Stage", "Role", "Component")
#: The gauges `status --metrics` puts per channel (docs in README, "Where is the fleet?").
ON_CURRENT, BEHIND, FAILED, STALE, LIVE, CONVERGED_PERCENT = (
    "OnCurrent",
    "Behind",
    "Failed",
    "Stale",
    "Live",
    "ConvergedPercent",
)


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
    #: The channel's pointer seq, when it was read.
    pointer_seq: int | None = None
    #: Heartbeating, but not on the pointer's seq.
    behind: bool = False
    #: The wave that admits this instance, while the channel's pointer is a staged rollout.
    wave: int | None = None
    #: Since when no valid signed timestamp vouches for its pointer (the trust's freshness).
    pointer_stale_since: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as `status --json` prints it. Every field is a plain value, so a copy of them
        does what `dataclasses.asdict` does at a seventh of its cost (0.16 s at 10,000 rows)."""
        return {name: getattr(self, name) for name in ROW_FIELDS}


#: Row's field names, in order (`Row.as_dict`).
ROW_FIELDS = tuple(field.name for field in dataclasses.fields(Row))


def fleet_rows(
    entries: Iterable[ReportEntry],
    *,
    component: str | None = None,
    stale_after_s: float = 3600.0,
    now: datetime | None = None,
    pointers: Mapping[Channel, Deploy] | None = None,
) -> list[Row]:
    rows: list[Row] = []
    for entry in entries:
        who, report = entry.who, entry.report
        if report is None:
            age = age_seconds(entry.last_modified, now)
            rows.append(
                Row(
                    who.instance_id,
                    who.stage,
                    who.role,
                    NO_COMPONENT,
                    "-",
                    None,
                    UNREADABLE,
                    entry.error or "",
                    age,
                    age > stale_after_s,
                )
            )
            continue
        age = age_seconds(report.heartbeat_at, now)
        for name, status in sorted(report.components.items()):
            if component and name != component:
                continue
            deploy = (pointers or {}).get(Channel(who.stage, who.role, name))
            pointer = deploy.seq if deploy else None
            behind = pointer is not None and age <= stale_after_s and (status.seq or 0) < pointer
            wave = (
                deploy.rollout.wave_of(deploy.deploy_id, who.instance_id, report.zone)
                if deploy and deploy.rollout
                else None
            )
            state, error = status.state.value, status.error or (status.last_error or "" if behind else "")
            if report.boot_error is not None:
                state, error = BOOT_FAILED, report.boot_error
            if report.lifecycle is not None:  # terminated or warmed: not expected to follow the pointer now
                state, behind = report.lifecycle.value, False
            rows.append(
                Row(
                    instance_id=who.instance_id,
                    stage=who.stage,
                    role=who.role,
                    component=name,
                    release_id=status.release_id or "-",
                    seq=status.seq,
                    state=state,
                    error=error,
                    heartbeat_age_s=age,
                    stale=age > stale_after_s,
                    deploy_id=status.deploy_id,
                    output_tail=status.output_tail,
                    updated_at=status.updated_at,
                    agent_version=report.agent_version,
                    heartbeat_at=report.heartbeat_at.strftime(TIMESTAMP_FORMAT),
                    pointer_seq=pointer,
                    behind=behind,
                    wave=wave,
                    pointer_stale_since=status.stale_since,
                )
            )
    rows.sort(key=lambda r: (r.stage, r.role, r.component, r.instance_id))
    return rows


def channels_of(entries: Iterable[ReportEntry]) -> set[Channel]:
    """Every channel some readable report names: the pointers a fleet view compares with. Pure."""
    return {
        Channel(entry.who.stage, entry.who.role, name)
        for entry in entries
        if entry.report is not None
        for name in entry.report.components
    }


def _by_channel(rows: Iterable[Row]) -> dict[Channel, list[Row]]:
    """The readable rows of each channel (an unreadable report names no component)."""
    by_channel: dict[Channel, list[Row]] = {}
    for row in rows:
        if row.state != UNREADABLE:
            by_channel.setdefault(Channel(row.stage, row.role, row.component), []).append(row)
    return by_channel


def _current_seq(everyone: Iterable[Row]) -> int | None:
    """The seq a channel's instances should be on: its pointer's, else the newest any of them reports."""
    rows = list(everyone)
    pointer = next((r.pointer_seq for r in rows if r.pointer_seq is not None), None)
    return pointer if pointer is not None else max((r.seq for r in rows if r.seq is not None), default=None)


def fleet_gauges(rows: Iterable[Row], read_at: datetime) -> list[Gauge]:
    """Per channel, the gauges an alarm watches convergence with, stamped `read_at`. Pure.

    Counted over the channel's members (warmed and terminated instances are apart, as in the
    summary): `Stale` those whose heartbeat is older than --stale-after, `Live` the others, and
    among the live ones `OnCurrent` (state ok on the current seq: the pointer's, else the newest
    reported), `Behind` (heartbeating on an older seq than the pointer) and `Failed` (failed or
    rejected; an agent that cannot boot is live and not on current, so it lowers
    `ConvergedPercent` without counting as failed). The counts may overlap (a failed instance
    can be behind too). `ConvergedPercent` is OnCurrent / Live × 100, and 100 with no live
    instance: nobody is behind in a channel scaled to zero, so a convergence alarm stays quiet
    there; a fleet that vanished is what `Live` is for. An unreadable report names no component,
    so no channel counts it: the table shows it.
    """
    gauges: list[Gauge] = []
    for channel, everyone in sorted(_by_channel(rows).items()):
        members = [r for r in everyone if r.state not in (WARMED, TERMINATED)]
        live = [r for r in members if not r.stale]
        current = _current_seq(everyone)
        on_current = sum(1 for r in live if r.seq == current and r.state == ComponentState.OK)
        counts = {
            ON_CURRENT: on_current,
            BEHIND: sum(1 for r in live if r.behind),
            FAILED: sum(1 for r in live if r.state in FAILING),
            STALE: len(members) - len(live),
            LIVE: len(live),
        }
        dimensions = tuple(zip(DIMENSIONS, (channel.stage, channel.role, channel.component), strict=True))
        gauges += [Gauge(name, float(n), Unit.COUNT, dimensions, read_at) for name, n in counts.items()]
        percent = 100.0 * on_current / len(live) if live else 100.0
        gauges.append(Gauge(CONVERGED_PERCENT, percent, Unit.PERCENT, dimensions, read_at))
    return gauges


def summary(rows: Iterable[Row]) -> list[str]:
    """One line per channel: "prod/web/api: 12/12 on seq 41, 0 failed"; one per fleet with unreadable reports."""
    by_channel: dict[tuple[str, str, str], list[Row]] = {}
    unreadable: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.state == UNREADABLE:
            unreadable[(row.stage, row.role)] = unreadable.get((row.stage, row.role), 0) + 1
            continue
        by_channel.setdefault((row.stage, row.role, row.component), []).append(row)
    lines = []
    for (stage, role, component), everyone in sorted(by_channel.items()):
        # Asleep in a warm pool or gone through scale-in: counted apart, not in the fleet's share.
        apart = {state: sum(1 for r in everyone if r.state == state) for state in (WARMED, TERMINATED)}
        members = [r for r in everyone if r.state not in apart]
        top = max((r.seq for r in everyone if r.seq is not None), default=None)
        on_top = sum(1 for r in members if r.seq == top and r.state == ComponentState.OK)
        failed = sum(1 for r in members if r.state in FAILING)
        pointer = next((r.pointer_seq for r in everyone if r.pointer_seq is not None), None)
        if pointer is not None:
            top = pointer
            on_top = sum(1 for r in members if r.seq == pointer and r.state == ComponentState.OK)
        line = f"{stage}/{role}/{component}: {on_top}/{len(members)} on seq {top if top is not None else '-'}, {failed} failed"
        notes = {
            "waiting for their wave": sum(1 for r in members if r.state == ComponentState.WAITING),
            "cannot boot": sum(1 for r in members if r.state == BOOT_FAILED),
            "behind": sum(1 for r in members if r.behind),
            "stale": sum(1 for r in members if r.stale),
            "with a stale pointer (timestamp expired)": sum(
                1 for r in members if r.pointer_stale_since and not r.stale
            ),
            **apart,
        }
        lines.append(line + "".join(f", {n} {what}" for what, n in notes.items() if n))
    for (stage, role), count in sorted(unreadable.items()):
        lines.append(f"{stage}/{role}: {count} unreadable report(s) (see the ERROR column)")
    return lines


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _note(row: Row) -> str:
    if row.stale:
        return " (stale)"
    if row.pointer_stale_since:
        return " (stale pointer)"
    if row.behind:
        return f" (behind {row.pointer_seq})"
    return f" (wave {row.wave})" if row.wave is not None else ""


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
            r.state + _note(r),
            format_age(r.heartbeat_age_s),
            r.error[:60],
        )
        for r in rows
    ]
    return render_table(header, body)
