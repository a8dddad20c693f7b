"""`deployer publish --wait`: follow one deploy across the fleet until it converged, failed or timed out.

Which instances are expected is decided once, right after the pointer moved: every instance
of the channel's stage/role whose report lists the component and whose heartbeat is younger
than the heartbeat TTL, and, with `--asg`, every InService instance of the Auto Scaling group.
Without `--asg` an instance that never wrote a report (crashed before its first write, no
credentials) is invisible; with it, such an instance is pending while the wait is younger
than the TTL and lost after. Instances that boot later are not waited for (their boot replay
puts them on the pointer anyway). An expected instance whose
heartbeat grows older than the TTL during the wait, or whose report disappears (gc, clean
deregistration), is *lost*: it died or was terminated mid-deploy, and CI cannot know whether
the release was the cause, so it counts as a failure unless the caller allows lost instances.

A report that cannot be parsed is never taken as converged: an instance whose report is
unreadable is expected if the object was written within the TTL, and stays `unreadable` (not
settled) until it reads again, so a wait it holds up ends in a timeout, not in a false OK.

The classification is pure (`classify`, `assess`); `Waiter` is the thin polling loop.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TextIO

import structlog

from deployer.aws.reports import ReportEntry
from deployer.protocol.deploy import Deploy
from deployer.protocol.events import DeployEvent, EventType, deploy_event
from deployer.protocol.layout import ReportKey
from deployer.protocol.report import ComponentState, ComponentStatus, Lifecycle
from deployer.protocol.timestamps import age_seconds

log = structlog.get_logger(__name__)

#: Exit codes CI can branch on (also in `deployer publish --help` and the README).
EXIT_CONVERGED = 0
EXIT_FAILED = 4
EXIT_TIMEOUT = 5


@dataclass(frozen=True)
class WaitOptions:
    """The --wait flags as one value (their defaults live with the flags, in `deployer.cli.options`)."""

    timeout_s: float
    heartbeat_ttl_s: float
    poll_s: float
    allow_lost: bool = False
    #: The Auto Scaling group whose InService instances are expected too (`--asg`).
    asg: str | None = None


class Convergence(enum.StrEnum):
    """Where one expected instance stands against the seq `--wait` waits for."""

    PENDING = "pending"  # not on the target seq yet, still heartbeating
    CONVERGED = "converged"  # ok on the target seq (or a newer one)
    FAILED = "failed"
    REJECTED = "rejected"
    LOST = "lost"  # heartbeat older than the TTL, or the report is gone
    UNREADABLE = "unreadable"  # the report does not parse: not converged, not settled
    LEFT = "left"  # terminated through its terminate hook (scale-in): gone cleanly, not a failure


#: Outcomes after which the wait stops watching an instance.
SETTLED = frozenset(
    {Convergence.CONVERGED, Convergence.FAILED, Convergence.REJECTED, Convergence.LOST, Convergence.LEFT}
)


def is_live(entry: ReportEntry, now: datetime, ttl_s: float) -> bool:
    """Heartbeat younger than the TTL; for an unreadable report, the object's own age."""
    written = entry.report.heartbeat_at if entry.report is not None else entry.last_modified
    return age_seconds(written, now) <= ttl_s


def expected_instances(
    entries: Mapping[str, ReportEntry], deploy: Deploy, now: datetime, ttl_s: float
) -> frozenset[str]:
    """Live instances of the deploy's stage/role that list its component (or whose report is
    unreadable), in service: not asleep in a warm pool (it catches up when it wakes), not gone."""
    return frozenset(
        instance
        for instance, entry in entries.items()
        if (entry.who.stage, entry.who.role) == (deploy.stage, deploy.role)
        and (entry.report is None or deploy.component in entry.report.components)
        and (entry.report is None or entry.report.lifecycle is None)
        and is_live(entry, now, ttl_s)
    )


def classify(entry: ReportEntry | None, deploy: Deploy, now: datetime, ttl_s: float) -> Convergence:
    if entry is None:
        return Convergence.LOST
    if entry.report is None:
        return Convergence.UNREADABLE if is_live(entry, now, ttl_s) else Convergence.LOST
    status = entry.report.components.get(deploy.component)
    seq, state = (status.seq, status.state) if status else (None, None)
    if seq is not None and seq >= deploy.seq and state is ComponentState.OK:
        return Convergence.CONVERGED
    if entry.report.lifecycle is Lifecycle.TERMINATED:
        return Convergence.LEFT
    if seq == deploy.seq and state is ComponentState.FAILED:
        return Convergence.FAILED
    if seq == deploy.seq and state is ComponentState.REJECTED:
        return Convergence.REJECTED
    if not is_live(entry, now, ttl_s):
        return Convergence.LOST
    return Convergence.PENDING


@dataclass(frozen=True)
class Progress:
    deploy: Deploy
    outcomes: Mapping[str, Convergence]
    errors: Mapping[str, str]
    elapsed_s: float
    allow_lost: bool = False
    #: Expected instances whose pointer no valid signed timestamp vouches for (the trust's freshness).
    stale_pointers: frozenset[str] = frozenset()

    def count(self, *outcomes: Convergence) -> int:
        return sum(1 for o in self.outcomes.values() if o in outcomes)

    @property
    def settled(self) -> bool:
        return all(o in SETTLED for o in self.outcomes.values())

    @property
    def failed(self) -> int:
        bad = {Convergence.FAILED, Convergence.REJECTED} | (set() if self.allow_lost else {Convergence.LOST})
        return self.count(*bad)

    def line(self) -> str:
        total = len(self.outcomes)
        return (
            f"{self.deploy.channel} seq {self.deploy.seq}: {self.count(Convergence.CONVERGED)}/{total} converged, "
            f"{self.count(Convergence.FAILED, Convergence.REJECTED)} failed, {self.count(Convergence.LOST)} lost, "
            f"{self.count(Convergence.PENDING)} pending"
            + (f", {unreadable} unreadable" if (unreadable := self.count(Convergence.UNREADABLE)) else "")
            + (f", {left} left (scale-in)" if (left := self.count(Convergence.LEFT)) else "")
            + (f", {len(self.stale_pointers)} with a stale pointer" if self.stale_pointers else "")
            + f" ({self.elapsed_s:.0f}s)"
        )

    def exit_code(self, timed_out: bool) -> int:
        """0 all converged; 4 any failed/rejected (or lost, unless allowed); 5 timed out with only pending left."""
        if self.failed:
            return EXIT_FAILED
        if timed_out and not self.settled:
            return EXIT_TIMEOUT
        return EXIT_CONVERGED


def assess(
    deploy: Deploy,
    expected: frozenset[str],
    entries: Mapping[str, ReportEntry],
    now: datetime,
    ttl_s: float,
    elapsed_s: float,
    allow_lost: bool = False,
    unreported: frozenset[str] = frozenset(),
) -> Progress:
    """Each expected instance's outcome and why. `unreported` are group members that never wrote a
    report during this wait: pending for one heartbeat TTL (they may be booting), then lost."""
    outcomes = {i: classify(entries.get(i), deploy, now, ttl_s) for i in sorted(expected)}
    errors = {}
    for instance, outcome in outcomes.items():
        entry = entries.get(instance)
        if entry is None and instance in unreported:
            booting = elapsed_s < ttl_s
            outcomes[instance] = Convergence.PENDING if booting else Convergence.LOST
            errors[instance] = (
                "in service but no status report yet" if booting else "in service but never wrote a status report"
            )
        elif outcome in (Convergence.FAILED, Convergence.REJECTED) and entry is not None and entry.report is not None:
            status = entry.report.components.get(deploy.component)
            errors[instance] = (status.error if status else None) or ""
        elif outcome is Convergence.UNREADABLE and entry is not None:
            errors[instance] = f"unreadable report: {entry.error}"
        elif outcome is Convergence.PENDING and entry is not None and entry.report is not None:
            if entry.report.boot_error is not None:
                errors[instance] = f"the agent cannot boot (it retries): {entry.report.boot_error}"
            else:
                errors[instance] = _behind(entry.report.components.get(deploy.component))
        elif outcome is Convergence.LOST:
            errors[instance] = _lost_reason(entry)
    stale = frozenset(
        instance
        for instance in outcomes
        if (entry := entries.get(instance)) is not None
        and entry.report is not None
        and (status := entry.report.components.get(deploy.component)) is not None
        and status.stale_since
    )
    return Progress(deploy, outcomes, errors, elapsed_s, allow_lost, stale)


def _behind(status: ComponentStatus | None) -> str:
    """Where a pending instance is, and the last error that may say why it is not further."""
    if status is None:
        return "has not reported the component yet"
    where = f"on seq {status.seq if status.seq is not None else '-'} ({status.state.value})"
    return where + (f", last error: {status.last_error}" if status.last_error else "")


def _lost_reason(entry: ReportEntry | None) -> str:
    if entry is None:
        return "status report removed"
    if entry.report is None:
        return f"unreadable report not rewritten since {entry.last_modified:%Y-%m-%dT%H:%M:%SZ}"
    return f"no heartbeat since {entry.report.heartbeat_at:%Y-%m-%dT%H:%M:%SZ}"


@dataclass(frozen=True)
class WaitResult:
    progress: Progress
    timed_out: bool

    @property
    def exit_code(self) -> int:
        return self.progress.exit_code(self.timed_out)

    def event(self) -> DeployEvent:
        """`Fleet Converged`, or `Deploy Failed` (failures, losses or a timeout), with the tallies."""
        progress = self.progress
        kind = EventType.FLEET_CONVERGED if self.exit_code == EXIT_CONVERGED else EventType.DEPLOY_FAILED
        counts = {o.value: n for o in Convergence if (n := progress.count(o))}
        reason = None if kind is EventType.FLEET_CONVERGED else verdict_line(self)
        if reason and progress.errors:
            reason += "; " + "; ".join(f"{i}: {e}" for i, e in sorted(progress.errors.items())[:3])
        return deploy_event(kind, progress.deploy, counts={"expected": len(progress.outcomes), **counts}, reason=reason)


class Snapshots(Protocol):
    """Where the waiter reads the fleet from (`deployer.aws.reports.ReportReader`)."""

    def refresh(self) -> Mapping[ReportKey, ReportEntry]: ...


@dataclass
class Waiter:
    """Polls the status reports (GETting only changed ones) until the deploy settles or times out."""

    reader: Snapshots
    options: WaitOptions
    #: InService instances of `options.asg`, read when the wait starts: expected whether or not they reported.
    members: frozenset[str] = frozenset()
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def wait(self, deploy: Deploy, on_progress: Callable[[Progress], None]) -> WaitResult:
        started = self.clock()
        ttl, timeout = self.options.heartbeat_ttl_s, self.options.timeout_s
        entries = self._snapshot(deploy)
        expected = expected_instances(entries, deploy, self.now(), ttl) | self.members
        unreported = self.members - set(entries)
        log.info("wait_started", seq=deploy.seq, channel=str(deploy.channel), expected=sorted(expected))
        while True:
            elapsed = self.clock() - started
            unreported = unreported - set(entries)  # once seen, a vanished report is lost, not booting
            progress = assess(deploy, expected, entries, self.now(), ttl, elapsed, self.options.allow_lost, unreported)
            on_progress(progress)
            if progress.settled:
                return WaitResult(progress, timed_out=False)
            if elapsed >= timeout:
                return WaitResult(progress, timed_out=True)
            self.sleep(min(self.options.poll_s, max(0.0, timeout - elapsed)))
            entries = self._snapshot(deploy)

    def _snapshot(self, deploy: Deploy) -> dict[str, ReportEntry]:
        return {
            who.instance_id: entry
            for who, entry in self.reader.refresh().items()
            if (who.stage, who.role) == (deploy.stage, deploy.role)
        }


class ProgressPrinter:
    """A live line on a terminal; on anything else (CI logs) one plain line per change.

    Non-TTY output repeats an unchanged line every `quiet_every_s`, so CI logs show it is alive.
    """

    def __init__(self, stream: TextIO, tty: bool | None = None, quiet_every_s: float = 30.0) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.quiet_every_s = quiet_every_s
        self._last: tuple[int, ...] | None = None
        self._last_elapsed = 0.0

    def __call__(self, progress: Progress) -> None:
        counts = tuple(progress.count(o) for o in Convergence)
        if self.tty:
            self.stream.write("\r\x1b[K" + progress.line())
        elif counts != self._last or progress.elapsed_s - self._last_elapsed >= self.quiet_every_s:
            self.stream.write(progress.line() + "\n")
            self._last_elapsed = progress.elapsed_s
        else:
            return
        self._last = counts
        self.stream.flush()

    def finish(self, result: WaitResult) -> None:
        progress = result.progress
        if self.tty:
            self.stream.write("\n")
        for instance, outcome in progress.outcomes.items():
            if outcome is not Convergence.CONVERGED:
                detail = progress.errors.get(instance, "")
                self.stream.write(f"  {instance}: {outcome.value}{': ' + detail if detail else ''}\n")
        self.stream.write(verdict_line(result) + "\n")
        self.stream.flush()


def verdict_line(result: WaitResult) -> str:
    progress = result.progress
    total = len(progress.outcomes)
    converged = progress.count(Convergence.CONVERGED)
    if total == 0:
        return f"no live instance of {progress.deploy.stage}/{progress.deploy.role} runs {progress.deploy.component}; nothing to wait for"
    if result.exit_code == EXIT_FAILED:
        return f"FAILED: {converged}/{total} converged on seq {progress.deploy.seq}, {progress.failed} failed or lost"
    if result.exit_code == EXIT_TIMEOUT:
        return f"TIMEOUT after {progress.elapsed_s:.0f}s: {converged}/{total} converged on seq {progress.deploy.seq}, {progress.count(Convergence.PENDING, Convergence.UNREADABLE)} pending"
    lost, left = progress.count(Convergence.LOST), progress.count(Convergence.LEFT)
    notes = ([f"{lost} lost, allowed"] if lost else []) + ([f"{left} left through scale-in"] if left else [])
    return f"OK: {converged}/{total - left} converged on seq {progress.deploy.seq}" + (
        f" ({', '.join(notes)})" if notes else ""
    )
