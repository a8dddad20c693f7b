"""publish --wait, the pure part: who is expected, what each instance's outcome is, the exit code."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from deployer.aws.reports import ReportEntry
from deployer.protocol.deploy import Deploy
from deployer.protocol.layout import ReportKey
from deployer.protocol.report import ComponentState, ComponentStatus, Lifecycle
from publisher.wait import (
    EXIT_CONVERGED,
    EXIT_FAILED,
    EXIT_TIMEOUT,
    Convergence,
    ProgressPrinter,
    Waiter,
    WaitOptions,
    WaitResult,
    assess,
    classify,
    expected_instances,
)
from tests.support import make_deploy, report_entry

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
TTL = 60.0


def report(
    instance: str,
    seq: int | None = 1,
    state: str = "ok",
    age: float = 5,
    role: str = "web",
    error: str | None = None,
    components: dict[str, ComponentStatus] | None = None,
) -> ReportEntry:
    status = ComponentStatus(state=ComponentState(state), seq=seq, release_id="r", error=error)
    return report_entry(instance, components or {"api": status}, NOW - timedelta(seconds=age), role=role)


def deploy(seq: int = 2) -> Deploy:
    return make_deploy(seq=seq)


def test_expected_instances_are_the_live_ones_of_the_channel_that_run_the_component() -> None:
    reports = {
        "i-live": report("i-live"),
        "i-stale": report("i-stale", age=TTL + 1),
        "i-other-role": report("i-other-role", role="worker"),
        "i-no-api": report("i-no-api", components={"provision": ComponentStatus()}),
    }
    assert expected_instances(reports, deploy(), NOW, TTL) == {"i-live"}


def test_an_instance_on_the_target_seq_or_newer_and_ok_has_converged() -> None:
    assert classify(report("i", seq=2), deploy(2), NOW, TTL) is Convergence.CONVERGED
    assert classify(report("i", seq=3), deploy(2), NOW, TTL) is Convergence.CONVERGED
    assert classify(report("i", seq=2, state="applying"), deploy(2), NOW, TTL) is Convergence.PENDING
    assert classify(report("i", seq=1), deploy(2), NOW, TTL) is Convergence.PENDING


def test_failed_and_rejected_count_only_for_the_target_seq() -> None:
    assert classify(report("i", seq=2, state="failed"), deploy(2), NOW, TTL) is Convergence.FAILED
    assert classify(report("i", seq=2, state="rejected"), deploy(2), NOW, TTL) is Convergence.REJECTED
    # An older deploy's failure says nothing about this one yet.
    assert classify(report("i", seq=1, state="failed"), deploy(2), NOW, TTL) is Convergence.PENDING


def test_an_instance_whose_heartbeat_went_stale_or_whose_report_vanished_is_lost() -> None:
    assert classify(report("i", seq=1, state="applying", age=TTL + 1), deploy(2), NOW, TTL) is Convergence.LOST
    assert classify(None, deploy(2), NOW, TTL) is Convergence.LOST
    # A converged instance stays converged even if it stops heartbeating afterwards.
    assert classify(report("i", seq=2, age=TTL + 1), deploy(2), NOW, TTL) is Convergence.CONVERGED


def test_exit_codes_all_converged_zero_failures_four_timeout_five() -> None:
    target = deploy(2)
    ok = {"a": report("a", seq=2), "b": report("b", seq=2)}
    assert assess(target, frozenset(ok), ok, NOW, TTL, 1).exit_code(timed_out=False) == EXIT_CONVERGED
    failed = {**ok, "b": report("b", seq=2, state="failed", error="hook post failed")}
    progress = assess(target, frozenset(failed), failed, NOW, TTL, 1)
    assert progress.settled
    assert progress.exit_code(timed_out=False) == EXIT_FAILED
    assert progress.errors == {"b": "hook post failed"}
    pending = {**ok, "b": report("b", seq=1, state="applying")}
    assert assess(target, frozenset(pending), pending, NOW, TTL, 9).exit_code(timed_out=True) == EXIT_TIMEOUT
    # A failure decides the verdict even if others are still pending at the timeout.
    mixed = {**failed, "c": report("c", seq=1)}
    assert assess(target, frozenset(mixed), mixed, NOW, TTL, 9).exit_code(timed_out=True) == EXIT_FAILED


def test_lost_instances_fail_the_wait_unless_allowed() -> None:
    target = deploy(2)
    reports = {"a": report("a", seq=2)}
    expected = frozenset({"a", "gone"})
    assert assess(target, expected, reports, NOW, TTL, 1).exit_code(timed_out=False) == EXIT_FAILED
    allowed = assess(target, expected, reports, NOW, TTL, 1, allow_lost=True)
    assert allowed.exit_code(timed_out=False) == EXIT_CONVERGED
    assert allowed.errors == {"gone": "status report removed"}


def test_an_instance_gone_through_scale_in_has_left_and_one_asleep_in_a_warm_pool_is_not_expected() -> None:
    target = deploy(2)
    left = report_entry("left", {"api": ComponentStatus(seq=1)}, NOW, lifecycle=Lifecycle.TERMINATED)
    warmed = report_entry("warm", {"api": ComponentStatus(seq=1)}, NOW, lifecycle=Lifecycle.WARMED)
    reports = {"a": report("a", seq=2), "left": left, "warm": warmed}
    assert expected_instances(reports, target, NOW, TTL) == {"a"}
    assert classify(left, target, NOW, TTL) is Convergence.LEFT
    # Expected when the wait began, then scaled in: settled, and no failure.
    progress = assess(target, frozenset({"a", "left"}), reports, NOW, TTL, 1)
    assert progress.settled
    assert progress.exit_code(timed_out=False) == EXIT_CONVERGED
    assert "1 left (scale-in)" in progress.line()


class FakeCache:
    def __init__(self, *snapshots: dict[str, ReportEntry]) -> None:
        self.snapshots = list(snapshots)

    def refresh(self) -> dict[ReportKey, ReportEntry]:
        snapshot = self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]
        return {entry.who: entry for entry in snapshot.values()}


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def run_wait(cache: FakeCache, timeout: float) -> tuple[WaitResult, list[str]]:
    clock = FakeClock()
    options = WaitOptions(timeout_s=timeout, heartbeat_ttl_s=TTL, poll_s=1.0)
    waiter = Waiter(cache, options, clock=clock, sleep=clock.sleep, now=lambda: NOW)
    lines: list[str] = []
    result = waiter.wait(deploy(2), lambda p: lines.append(p.line()))
    return result, lines


def test_the_waiter_follows_the_instances_expected_at_publish_until_they_settle() -> None:
    first = {"a": report("a", seq=1), "b": report("b", seq=1)}
    later = {"a": report("a", seq=2), "b": report("b", seq=2), "new": report("new", seq=1)}
    result, lines = run_wait(FakeCache(first, first, later), timeout=30)
    assert result.exit_code == EXIT_CONVERGED
    # An instance that appeared after the publish is not waited for.
    assert set(result.progress.outcomes) == {"a", "b"}
    assert lines[0].startswith("prod/web/api seq 2: 0/2 converged")
    assert lines[-1].startswith("prod/web/api seq 2: 2/2 converged, 0 failed, 0 lost, 0 pending")


def test_the_waiter_times_out_with_exit_five() -> None:
    result, _ = run_wait(FakeCache({"a": report("a", seq=1, state="applying")}), timeout=3)
    assert result.timed_out
    assert result.exit_code == EXIT_TIMEOUT
    assert result.progress.elapsed_s == 3


def test_nobody_live_means_nothing_to_wait_for() -> None:
    result, _ = run_wait(FakeCache({}), timeout=3)
    assert result.exit_code == EXIT_CONVERGED
    assert result.progress.outcomes == {}


def test_progress_is_a_live_line_on_a_tty_and_plain_lines_elsewhere() -> None:
    target = deploy(2)
    pending = {"a": report("a", seq=1)}
    done = {"a": report("a", seq=2)}
    tty, plain = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (plain, False)):
        printer = ProgressPrinter(stream, tty=is_tty)
        for snapshot, elapsed in ((pending, 1), (pending, 2), (done, 3)):
            printer(assess(target, frozenset({"a"}), snapshot, NOW, TTL, elapsed))
        printer.finish(WaitResult(assess(target, frozenset({"a"}), done, NOW, TTL, 3), timed_out=False))
    assert tty.getvalue().count("\r") == 3
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue()
    # Unchanged counts are not repeated in a log.
    assert lines == [
        "prod/web/api seq 2: 0/1 converged, 0 failed, 0 lost, 1 pending (1s)",
        "prod/web/api seq 2: 1/1 converged, 0 failed, 0 lost, 0 pending (3s)",
        "OK: 1/1 converged on seq 2",
    ]


def test_an_unreadable_report_is_expected_while_fresh_and_never_counts_as_converged() -> None:
    unreadable = report_entry("i-bad", {}, NOW - timedelta(seconds=5), error="heartbeat_at 'soon' is not a timestamp")
    entries = {"i-ok": report("i-ok", seq=2), "i-bad": unreadable}
    expected = expected_instances(entries, deploy(2), NOW, TTL)
    assert expected == {"i-ok", "i-bad"}
    progress = assess(deploy(2), expected, entries, NOW, TTL, 1)
    assert progress.outcomes == {"i-bad": Convergence.UNREADABLE, "i-ok": Convergence.CONVERGED}
    assert not progress.settled
    assert progress.errors == {"i-bad": "unreadable report: heartbeat_at 'soon' is not a timestamp"}
    assert progress.exit_code(timed_out=True) == EXIT_TIMEOUT
    assert "1 unreadable" in progress.line()


def test_the_waiter_times_out_on_an_unreadable_report_instead_of_saying_ok() -> None:
    unreadable = report_entry("i-bad", {}, NOW - timedelta(seconds=5), error="not JSON")
    result, _ = run_wait(FakeCache({"a": report("a", seq=2), "i-bad": unreadable}), timeout=3)
    assert result.exit_code == EXIT_TIMEOUT


def test_a_group_member_without_a_report_is_pending_for_one_ttl_then_lost() -> None:
    target, entries = deploy(2), {"a": report("a", seq=2)}
    expected, unreported = frozenset({"a", "i-silent"}), frozenset({"i-silent"})
    booting = assess(target, expected, entries, NOW, TTL, TTL - 1, unreported=unreported)
    assert booting.outcomes["i-silent"] is Convergence.PENDING
    assert booting.errors["i-silent"] == "in service but no status report yet"
    silent = assess(target, expected, entries, NOW, TTL, TTL, unreported=unreported)
    assert silent.outcomes["i-silent"] is Convergence.LOST
    assert silent.errors["i-silent"] == "in service but never wrote a status report"
    assert silent.exit_code(timed_out=False) == EXIT_FAILED


def test_the_waiter_expects_the_groups_members_and_a_member_that_reported_then_vanished_is_lost() -> None:
    clock = FakeClock()
    options = WaitOptions(timeout_s=30, heartbeat_ttl_s=TTL, poll_s=1.0, asg="web")
    first = {"a": report("a", seq=1), "late": report("late", seq=1)}
    cache = FakeCache({"a": report("a", seq=1)}, first, {"a": report("a", seq=2)})
    waiter = Waiter(cache, options, frozenset({"a", "late"}), clock=clock, sleep=clock.sleep, now=lambda: NOW)
    result = waiter.wait(deploy(2), lambda _p: None)
    assert result.progress.outcomes == {"a": Convergence.CONVERGED, "late": Convergence.LOST}
    assert result.progress.errors["late"] == "status report removed"


def test_an_agent_that_cannot_boot_is_pending_with_the_reason_never_converged() -> None:
    entry = report("i-broken", seq=None, state="pending")
    assert entry.report is not None
    broken = replace(entry, report=replace(entry.report, boot_error="AwsError: AccessDenied"))
    progress = assess(deploy(2), frozenset({"i-broken"}), {"i-broken": broken}, NOW, TTL, 1)
    assert progress.outcomes == {"i-broken": Convergence.PENDING}
    assert progress.errors == {"i-broken": "the agent cannot boot (it retries): AwsError: AccessDenied"}
    assert progress.exit_code(timed_out=True) == EXIT_TIMEOUT
