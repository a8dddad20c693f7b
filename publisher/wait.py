"""`deployer publish --wait`: follow one deploy across the fleet until it converged, failed or timed out.

Which instances are expected is decided once, from the status reports read right after the
pointer moved: every instance of the channel's stage/role whose report lists the component
and whose heartbeat is younger than the heartbeat TTL. Instances that boot later are not
waited for (their boot replay puts them on the pointer anyway). An expected instance whose
heartbeat grows older than the TTL during the wait, or whose report disappears (gc, clean
deregistration), is *lost*: it died or was terminated mid-deploy, and CI cannot know whether
the release was the cause, so it counts as a failure unless the caller allows lost instances.

The classification is pure (`classify`, `assess`); `Waiter` is the thin polling loop.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

from deployer.protocol import Deploy
from deployer.status import ReportCache, age_seconds

log = structlog.get_logger(__name__)

#: Exit codes CI can branch on (also in `deployer publish --help` and the README).
EXIT_CONVERGED = 0
EXIT_FAILED = 4
EXIT_TIMEOUT = 5

#: Default heartbeat TTL: two default heartbeat intervals (900 s) plus a minute of slack.
DEFAULT_HEARTBEAT_TTL_SECONDS = 2 * 900 + 60
DEFAULT_WAIT_TIMEOUT_SECONDS = 900.0
DEFAULT_POLL_SECONDS = 5.0


class Outcome(enum.StrEnum):
    PENDING = "pending"  # not on the target seq yet, still heartbeating
    CONVERGED = "converged"  # ok on the target seq (or a newer one)
    FAILED = "failed"
    REJECTED = "rejected"
    LOST = "lost"  # heartbeat older than the TTL, or the report is gone


#: Outcomes after which the wait stops watching an instance.
SETTLED = frozenset({Outcome.CONVERGED, Outcome.FAILED, Outcome.REJECTED, Outcome.LOST})


def is_live(report: Mapping[str, Any], now: datetime, ttl_s: float) -> bool:
    age = age_seconds(report.get("heartbeat_at"), now)
    return age is not None and age <= ttl_s


def expected_instances(
    reports: Mapping[str, Mapping[str, Any]], deploy: Deploy, now: datetime, ttl_s: float
) -> frozenset[str]:
    """Instances of the deploy's stage/role that list its component and heartbeat within the TTL."""
    return frozenset(
        instance
        for instance, report in reports.items()
        if report.get("stage") == deploy.stage
        and report.get("role") == deploy.role
        and deploy.component in report.get("components", {})
        and is_live(report, now, ttl_s)
    )


def classify(report: Mapping[str, Any] | None, deploy: Deploy, now: datetime, ttl_s: float) -> Outcome:
    if report is None:
        return Outcome.LOST
    status = report.get("components", {}).get(deploy.component, {})
    seq, state = status.get("seq"), status.get("state")
    if isinstance(seq, int) and seq >= deploy.seq and state == "ok":
        return Outcome.CONVERGED
    if seq == deploy.seq and state in (Outcome.FAILED.value, Outcome.REJECTED.value):
        return Outcome(state)
    if not is_live(report, now, ttl_s):
        return Outcome.LOST
    return Outcome.PENDING


@dataclass(frozen=True)
class Progress:
    deploy: Deploy
    outcomes: Mapping[str, Outcome]
    errors: Mapping[str, str]
    elapsed_s: float
    allow_lost: bool = False

    def count(self, *outcomes: Outcome) -> int:
        return sum(1 for o in self.outcomes.values() if o in outcomes)

    @property
    def settled(self) -> bool:
        return all(o in SETTLED for o in self.outcomes.values())

    @property
    def failed(self) -> int:
        bad = {Outcome.FAILED, Outcome.REJECTED} | (set() if self.allow_lost else {Outcome.LOST})
        return self.count(*bad)

    def line(self) -> str:
        total = len(self.outcomes)
        return (
            f"{self.deploy.channel} seq {self.deploy.seq}: {self.count(Outcome.CONVERGED)}/{total} converged, "
            f"{self.count(Outcome.FAILED, Outcome.REJECTED)} failed, {self.count(Outcome.LOST)} lost, "
            f"{self.count(Outcome.PENDING)} pending ({self.elapsed_s:.0f}s)"
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
    reports: Mapping[str, Mapping[str, Any]],
    now: datetime,
    ttl_s: float,
    elapsed_s: float,
    allow_lost: bool = False,
) -> Progress:
    outcomes = {i: classify(reports.get(i), deploy, now, ttl_s) for i in sorted(expected)}
    errors = {}
    for instance, outcome in outcomes.items():
        if outcome in (Outcome.FAILED, Outcome.REJECTED):
            status = reports[instance].get("components", {}).get(deploy.component, {})
            errors[instance] = str(status.get("error") or "")
        elif outcome is Outcome.LOST:
            report = reports.get(instance)
            errors[instance] = f"no heartbeat since {report.get('heartbeat_at')}" if report else "status report removed"
    return Progress(deploy, outcomes, errors, elapsed_s, allow_lost)


@dataclass(frozen=True)
class WaitResult:
    progress: Progress
    timed_out: bool

    @property
    def exit_code(self) -> int:
        return self.progress.exit_code(self.timed_out)


@dataclass
class Waiter:
    """Polls the status reports (GETting only changed ones) until the deploy settles or times out."""

    cache: ReportCache
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_SECONDS
    poll_s: float = DEFAULT_POLL_SECONDS
    allow_lost: bool = False
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def wait(self, deploy: Deploy, timeout_s: float, on_progress: Callable[[Progress], None]) -> WaitResult:
        started = self.clock()
        reports = self.cache.refresh()
        expected = expected_instances(reports, deploy, self.now(), self.heartbeat_ttl_s)
        log.info("wait_started", seq=deploy.seq, channel=str(deploy.channel), expected=sorted(expected))
        while True:
            elapsed = self.clock() - started
            progress = assess(deploy, expected, reports, self.now(), self.heartbeat_ttl_s, elapsed, self.allow_lost)
            on_progress(progress)
            if progress.settled:
                return WaitResult(progress, timed_out=False)
            if elapsed >= timeout_s:
                return WaitResult(progress, timed_out=True)
            self.sleep(min(self.poll_s, max(0.0, timeout_s - elapsed)))
            reports = self.cache.refresh()


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
        counts = tuple(progress.count(o) for o in Outcome)
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
            if outcome is not Outcome.CONVERGED:
                detail = progress.errors.get(instance, "")
                self.stream.write(f"  {instance}: {outcome.value}{': ' + detail if detail else ''}\n")
        self.stream.write(verdict_line(result) + "\n")
        self.stream.flush()


def verdict_line(result: WaitResult) -> str:
    progress = result.progress
    total = len(progress.outcomes)
    converged = progress.count(Outcome.CONVERGED)
    if total == 0:
        return f"no live instance of {progress.deploy.stage}/{progress.deploy.role} runs {progress.deploy.component}; nothing to wait for"
    if result.exit_code == EXIT_FAILED:
        return f"FAILED: {converged}/{total} converged on seq {progress.deploy.seq}, {progress.failed} failed or lost"
    if result.exit_code == EXIT_TIMEOUT:
        return f"TIMEOUT after {progress.elapsed_s:.0f}s: {converged}/{total} converged on seq {progress.deploy.seq}, {progress.count(Outcome.PENDING)} pending"
    lost = progress.count(Outcome.LOST)
    return f"OK: {converged}/{total} converged on seq {progress.deploy.seq}" + (
        f" ({lost} lost, allowed)" if lost else ""
    )
