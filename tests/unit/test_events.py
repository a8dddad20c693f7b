"""Deploy events: the document, its order within a deploy, its size bound, its chat line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from deployer.protocol.errors import RejectedInput
from deployer.protocol.events import (
    MAX_EVENT_ENTRY_BYTES,
    NOTIFIED,
    DeployEvent,
    EventType,
    boot_failed_event,
    deploy_event,
    entry_bytes,
    parse_event,
    step_of,
)
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.rollout import BUCKETS, Plan, Stable
from publisher.notify import Topic, Webhook, parse_notify_target
from tests.support import make_deploy

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "events.schema.json").read_text())


def every_event() -> list[DeployEvent]:
    deploy = make_deploy()
    found = []
    for kind in EventType:
        if kind is EventType.INSTANCE_BOOT_FAILED:
            found.append(boot_failed_event("prod", "web", "i-0abc", "AwsError: AccessDenied"))
        elif kind.from_instance:
            found.append(deploy_event(kind, deploy, instance="i-0abc", reason="hook post exited 3"))
        else:
            found.append(deploy_event(kind, deploy, wave=1, counts={"admitted": 2, "ok": 1}, reason="why"))
    return found


@pytest.mark.parametrize("event", every_event(), ids=lambda e: e.type.slug)
def test_every_event_type_round_trips_and_matches_the_documented_schema(event: DeployEvent) -> None:
    body = event.to_json()
    jsonschema.validate(json.loads(body), SCHEMA)
    assert parse_event(body) == event
    entry = event.entry("default")
    assert (entry["Source"], entry["DetailType"], entry["Detail"]) == ("deployer", event.type.value, body)


def test_the_schema_names_every_event_type_the_code_has() -> None:
    assert SCHEMA["properties"]["type"]["enum"] == [t.value for t in EventType]


def test_a_deploy_s_events_sort_by_step_into_the_order_they_happen_whichever_driver_sent_them() -> None:
    happened = [(EventType.DEPLOY_PUBLISHED, 0)]
    for wave in range(3):
        happened += [(EventType.ROLLOUT_HELD, wave), (EventType.WAVE_STARTED, wave), (EventType.WAVE_PASSED, wave)]
    happened.append((EventType.ROLLOUT_SUCCEEDED, 2))
    steps = [step_of(kind, wave) for kind, wave in happened]
    assert steps == sorted(steps)
    assert len(set(steps)) == len(steps)
    assert step_of(EventType.ROLLOUT_ROLLED_BACK, 0) > step_of(EventType.WAVE_PASSED, 99)


def test_a_resumed_driver_s_second_wave_started_has_the_same_id_as_the_first() -> None:
    stable = Stable("rel-stable", "deployer/releases/api/rel-stable/manifest.yml", "c" * 64)
    deploy = make_deploy(rollout=Plan(("1", "100%"), ("i-1",), (BUCKETS,), stable))
    first = deploy_event(EventType.WAVE_STARTED, deploy, wave=1)
    again = deploy_event(EventType.WAVE_STARTED, deploy, wave=1, counts={"admitted": 2})
    assert first.event_id == again.event_id == f"{deploy.deploy_id}/5"
    assert first.waves == 2


def test_a_ten_megabyte_error_is_cut_so_the_entry_fits_eventbridge_s_limit() -> None:
    event = deploy_event(EventType.DEPLOY_FAILED, make_deploy(), reason="\x01<b>" * (10 * 1024 * 1024 // 4))
    fitted = event.fitted()
    assert entry_bytes(fitted) <= MAX_EVENT_ENTRY_BYTES
    assert fitted.reason is not None
    assert fitted.reason.endswith("…")
    jsonschema.validate(json.loads(fitted.to_json()), SCHEMA)


def test_the_chat_line_escapes_markup_and_drops_control_characters() -> None:
    event = deploy_event(
        EventType.ROLLOUT_ROLLED_BACK, make_deploy(), reason="<!channel> & <script>\x1b[31mred\nline</script>"
    )
    text = event.chat_text()
    assert "<" not in text
    assert ">" not in text
    assert "\x1b" not in text
    assert "\n" not in text
    assert "&lt;!channel&gt; &amp; &lt;script&gt;" in text
    paged = DeployEvent(**{**event.__dict__, "page": "https://console.example/fleet"}).chat_text()
    assert paged.endswith(" <https://console.example/fleet|fleet page>")


def test_deployment_status_is_set_once_the_deploy_has_an_outcome() -> None:
    docs = {e.type: json.loads(e.to_json()) for e in every_event()}
    assert docs[EventType.ROLLOUT_SUCCEEDED]["deployment.status"] == "succeeded"
    assert docs[EventType.FLEET_CONVERGED]["deployment.status"] == "succeeded"
    assert docs[EventType.ROLLOUT_ROLLED_BACK]["deployment.status"] == "failed"
    assert "deployment.status" not in docs[EventType.WAVE_STARTED]
    assert docs[EventType.WAVE_STARTED]["deployment.id"] == docs[EventType.WAVE_STARTED]["deploy_id"]


def test_notifications_go_out_on_hold_rollback_failure_and_success_only() -> None:
    assert {t.value for t in NOTIFIED} == {
        "Rollout Held",
        "Rollout Rolled Back",
        "Deploy Failed",
        "Rollout Succeeded",
        "Fleet Converged",
    }


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"colour": "red"}, "unknown key(s): colour"),
        ({"v": 2}, "v must be 1"),
        ({"type": "Deploy Exploded"}, "not a deployer event type"),
        ({"seq": -1}, "seq is missing or malformed"),
        ({"instance": "i-1"}, "has no instance"),
        ({"counts": {"ok": "many"}}, "counts must map"),
        ({"id": "someone-else/0"}, "does not match"),
    ],
)
def test_a_malformed_event_is_refused_naming_what_is_wrong(change: dict[str, Any], named: str) -> None:
    doc = json.loads(deploy_event(EventType.WAVE_PASSED, make_deploy(), wave=0).to_json())
    with pytest.raises(RejectedInput, match=named.replace("(", r"\(").replace(")", r"\)")):
        parse_event(json.dumps({**doc, **change}))


def test_an_instance_event_key_names_its_owner_last_and_reads_back() -> None:
    layout = Layout("deployer")
    who = ReportKey("prod", "web", "i-0abc", "AROAEXAMPLEROLEID0001")
    key = layout.event_key(EventType.INSTANCE_DEPLOY_FAILED.slug, who, "6b1e-d1")
    assert key == "deployer/events/instance-deploy-failed/prod/web/6b1e-d1/AROAEXAMPLEROLEID0001:i-0abc.json"
    assert layout.event_object(key) == ("instance-deploy-failed", who, "6b1e-d1")
    assert layout.event_object("deployer/events/instance-deploy-failed/prod/web/x/y/i-0abc.json") is None
    assert layout.event_object("deployer/status/prod/web/i-0abc.json") is None


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("https://hooks.slack.com/services/T0/B0/secret", Webhook),
        ("http://127.0.0.1:8080/hook", Webhook),
        ("arn:aws:sns:eu-west-1:123456789012:deploys", Topic),
    ],
)
def test_a_notify_target_is_a_topic_or_an_https_webhook(spec: str, kind: type) -> None:
    assert isinstance(parse_notify_target(spec), kind)


@pytest.mark.parametrize(
    "spec", ["http://hooks.example.com/x", "ftp://x", "arn:aws:sqs:eu-west-1:123456789012:q", "slack"]
)
def test_anything_else_is_refused_and_a_webhook_s_secret_path_is_never_echoed(spec: str) -> None:
    with pytest.raises(Exception, match="--notify") as raised:
        parse_notify_target(spec)
    assert "/x" not in str(raised.value) or spec == "ftp://x"
    assert str(Webhook("https://hooks.slack.com/services/T0/B0/secret")) == "https://hooks.slack.com/…"
