"""The Auto Scaling lifecycle, the pure parts: what a state change asks, the apply's grace when
terminating, the report's lifecycle."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from deployer.agent.lifecycle import Step, step_for
from deployer.agent.termination import apply_grace
from deployer.protocol.errors import InvalidReport
from deployer.protocol.layout import ReportKey
from deployer.protocol.report import Lifecycle, StatusReport, parse_report

WHO = ReportKey("prod", "web", "i-0123456789abcdef0")


def test_a_running_apply_gets_the_global_timeout_less_a_margin_for_leaving() -> None:
    assert apply_grace(3600) == 48 * 3600 - 300  # 100 × 1 h is past the 48 h cap
    assert apply_grace(30) == 3000 - 300  # AWS's shortest heartbeat timeout
    assert apply_grace(3) == 300 - 30  # a tenth of it when that is shorter (the emulator's 0.1× time)


def test_the_lifecycle_is_written_only_when_set_and_read_back_strictly() -> None:
    plain = StatusReport(WHO, datetime(2026, 12, 7, tzinfo=UTC))
    assert "lifecycle" not in json.loads(plain.to_json())  # agents before it read the report unchanged
    left = StatusReport(WHO, datetime(2026, 12, 7, tzinfo=UTC), lifecycle=Lifecycle.TERMINATED)
    assert parse_report(left.to_json(), WHO) == left
    doc = json.loads(left.to_json())
    doc["lifecycle"] = "Terminating:Wait"
    with pytest.raises(InvalidReport, match="lifecycle 'Terminating:Wait' is not one of terminated, warmed"):
        parse_report(json.dumps(doc).encode(), WHO)


def test_each_change_of_target_lifecycle_state_asks_one_step_and_unknown_changes_nothing() -> None:
    assert step_for(None, "InService") is Step.NOTHING  # booted in service: the launch hook is boot's
    assert step_for(None, "Warmed:Stopped") is Step.WARMED
    assert step_for("Warmed:Running", "Warmed:Stopped") is Step.NOTHING
    assert step_for("Warmed:Running", "InService") is Step.ENTERED_SERVICE
    assert step_for("InService", "Terminated") is Step.TERMINATING
    assert step_for("Warmed:Running", "Terminated") is Step.TERMINATING  # a warm pool shrinks too
    assert step_for("InService", None) is Step.NOTHING  # IMDS did not answer this time
    assert step_for("InService", "InService") is Step.NOTHING
