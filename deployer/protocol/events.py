"""Deploy events: the fourth wire document, one JSON object per thing that happened to a deploy.

The CLI (publish, the rollout driver, `--wait`) sends the fleet-level events to Amazon
EventBridge as `PutEvents` entries (source `deployer`, the event's type as the detail-type, this
document as the detail). Instance-level events cost instances no new permission and no request
at steady state: an agent writes the same document as a small object under `events/`, keyed by
its own identity, and the bucket's EventBridge notification carries the object's key to the rule
(docs/design.md, "Events"). Notifications (`--notify`) are the same events rendered as one line
of Slack-compatible text.

Every event says which deploy it belongs to and where it stands in it: `id` is
`<deploy id>/<step>` for fleet events, so a consumer that sees one twice (a resumed driver says
"Wave Started" again) drops the copy, and sorting by `(seq, step)` restores the deploy's order
whichever driver sent what. One writer (`DeployEvent.to_json`), one reader (`parse_event`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from deployer.protocol.decoding import json_object
from deployer.protocol.deploy import Deploy
from deployer.protocol.errors import RejectedInput
from deployer.protocol.names import INSTANCE_ID_PATTERN, NAME_PATTERN
from deployer.protocol.release import DEPLOY_ID_PATTERN, RELEASE_ID_PATTERN
from deployer.protocol.timestamps import parse_timestamp, utc_now_iso

EVENT_VERSION = 1
#: The PutEvents `Source` of every deployer event, and what the Terraform/`init` rule matches.
EVENT_SOURCE = "deployer"
#: The rule `deployer init --events-target` (or the Terraform module) puts on the default bus for
#: the CLI's own events, and the one for the objects agents write under `events/`.
FLEET_RULE = "deployer-fleet-events"
INSTANCE_RULE = "deployer-instance-events"
#: One PutEvents entry is at most 256 KB: Source, DetailType, Detail and each Resource counted in
#: UTF-8 bytes, plus 14 for a Time. A larger entry fails the whole entry.
#: https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-putevent-size.html
MAX_EVENT_ENTRY_BYTES = 256 * 1024
#: Bytes of `Time` in that count.
_TIME_BYTES = 14
#: Our own bound on the free text of one event (reason, error): an error text can be megabytes
#: (a hook's output), a chat line a screenful; the entry limit still applies to the whole.
MAX_EVENT_TEXT_CHARS = 4000


class EventType(enum.StrEnum):
    """The detail-types; fleet-level ones come from the CLI, `INSTANCE_*` from agents."""

    DEPLOY_PUBLISHED = "Deploy Published"
    WAVE_STARTED = "Wave Started"
    WAVE_PASSED = "Wave Passed"
    ROLLOUT_HELD = "Rollout Held"
    ROLLOUT_ROLLED_BACK = "Rollout Rolled Back"
    ROLLOUT_SUCCEEDED = "Rollout Succeeded"
    FLEET_CONVERGED = "Fleet Converged"
    DEPLOY_FAILED = "Deploy Failed"
    INSTANCE_DEPLOY_FAILED = "Instance Deploy Failed"
    INSTANCE_DEPLOY_REJECTED = "Instance Deploy Rejected"
    INSTANCE_BOOT_FAILED = "Instance Boot Failed"
    #: No valid signed timestamp vouches for the instance's pointer any more (the trust's freshness).
    INSTANCE_POINTER_STALE = "Instance Pointer Stale"

    @property
    def slug(self) -> str:
        """`instance-deploy-failed`: the event's name in object keys and chat lines."""
        return self.value.lower().replace(" ", "-")

    @property
    def from_instance(self) -> bool:
        return self.name.startswith("INSTANCE_")

    @property
    def status(self) -> str | None:
        """OpenTelemetry's `deployment.status` (`succeeded` or `failed`) once the deploy has one."""
        if self in (EventType.ROLLOUT_SUCCEEDED, EventType.FLEET_CONVERGED):
            return "succeeded"
        if self in (EventType.ROLLOUT_ROLLED_BACK, EventType.DEPLOY_FAILED):
            return "failed"
        return None


#: What `--notify` is told: hold, rollback, failure and success (every event reaches EventBridge).
NOTIFIED = frozenset(
    {
        EventType.ROLLOUT_HELD,
        EventType.ROLLOUT_ROLLED_BACK,
        EventType.ROLLOUT_SUCCEEDED,
        EventType.FLEET_CONVERGED,
        EventType.DEPLOY_FAILED,
    }
)

#: The step of the deploy's last event, beyond every wave's.
_FINAL = 10_000
_KEYS = frozenset(
    {
        "v",
        "id",
        "type",
        "step",
        "at",
        "stage",
        "role",
        "component",
        "seq",
        "deploy_id",
        "release_id",
        "instance",
        "wave",
        "waves",
        "counts",
        "reason",
        "by",
        "page",
        "deployment.id",
        "deployment.name",
        "deployment.status",
        "deployment.environment.name",
    }
)
_COUNT_NAME = re.compile(r"^[a-z_]{1,32}$")
# What a chat client would take for markup (Slack: &, <, >) or that breaks a line.
_CHAT_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def step_of(kind: EventType, wave: int = 0) -> int:
    """Where an event sits in its deploy: published 0; per wave w held 3w+1, started 3w+2,
    passed 3w+3; the outcome last. Pure, and the same whichever driver sends it."""
    if kind is EventType.DEPLOY_PUBLISHED:
        return 0
    offset = {EventType.ROLLOUT_HELD: 1, EventType.WAVE_STARTED: 2, EventType.WAVE_PASSED: 3}.get(kind)
    return 3 * wave + offset if offset is not None else _FINAL


@dataclass(frozen=True)
class DeployEvent:
    """One event. `counts` are the tallies the sender saw (admitted, ok, failed, pending, …)."""

    type: EventType
    at: str
    stage: str
    role: str
    #: The deploy's; None only for `Instance Boot Failed`, which is about no deploy.
    component: str | None
    seq: int | None
    deploy_id: str | None
    release_id: str | None
    step: int = 0
    instance: str | None = None
    wave: int | None = None
    waves: int | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    reason: str | None = None
    by: str | None = None
    page: str | None = None

    @property
    def event_id(self) -> str:
        """Unique per deploy and step (fleet events) or per deploy, instance and type."""
        if self.deploy_id is None:
            return f"{self.instance}/{self.type.slug}/{self.at}"
        if self.instance is not None:
            return f"{self.deploy_id}/{self.instance}/{self.type.slug}"
        return f"{self.deploy_id}/{self.step}"

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "v": EVENT_VERSION,
            "id": self.event_id,
            "type": self.type.value,
            "step": self.step,
            "at": self.at,
            "stage": self.stage,
            "role": self.role,
            "deployment.environment.name": self.stage,
        }
        if self.deploy_id is not None:
            doc.update(
                {
                    "component": self.component,
                    "seq": self.seq,
                    "deploy_id": self.deploy_id,
                    "release_id": self.release_id,
                    "deployment.id": self.deploy_id,
                    "deployment.name": f"{self.stage}/{self.role}/{self.component}",
                }
            )
        if self.type.status:
            doc["deployment.status"] = self.type.status
        optional = {
            "instance": self.instance,
            "wave": self.wave,
            "waves": self.waves,
            "counts": dict(self.counts) or None,
            "reason": self.reason,
            "by": self.by,
            "page": self.page,
        }
        doc.update({k: v for k, v in optional.items() if v is not None})
        return doc

    def to_json(self) -> str:
        return json.dumps(self.fitted().to_dict(), sort_keys=True, separators=(",", ":"))

    def entry(self, bus: str) -> dict[str, Any]:
        """The PutEvents entry for `bus` (name or ARN), cut to the entry limit."""
        return {"Source": EVENT_SOURCE, "DetailType": self.type.value, "Detail": self.to_json(), "EventBusName": bus}

    def fitted(self) -> DeployEvent:
        """This event with its free text cut so the whole PutEvents entry stays within
        MAX_EVENT_ENTRY_BYTES, however long the error it quotes. Pure."""
        event = replace(self, reason=_cut(self.reason, MAX_EVENT_TEXT_CHARS))
        while entry_bytes(event) > MAX_EVENT_ENTRY_BYTES and event.reason:
            event = replace(event, reason=_cut(event.reason, len(event.reason) // 2))
        return event

    def chat_text(self) -> str:
        """One line for a chat webhook or an SNS subscriber: what happened to which deploy, with
        anything a chat client would render as markup escaped and control characters removed."""
        where = f"{self.stage}/{self.role}" + (
            f"/{self.component} seq {self.seq} ({self.release_id})" if self.deploy_id else ""
        )
        parts = [f"[deployer] {self.type.value}: {where}"]
        if self.instance:
            parts.append(f"on {self.instance}")
        if self.wave is not None:
            parts.append(f"wave {self.wave}" + (f"/{self.waves - 1}" if self.waves else ""))
        if self.counts:
            parts.append(", ".join(f"{v} {k}" for k, v in self.counts.items()))
        if self.reason:
            parts.append(_cut(self.reason, 500) or "")
        text = _chat_safe(" - ".join(parts))
        return text + f" <{self.page}|fleet page>" if self.page else text


def deploy_event(
    kind: EventType,
    deploy: Deploy,
    *,
    wave: int | None = None,
    counts: Mapping[str, int] | None = None,
    reason: str | None = None,
    instance: str | None = None,
) -> DeployEvent:
    """The event `kind` about `deploy`, stamped now, at its place in the deploy's order. Pure but for the clock."""
    return DeployEvent(
        type=kind,
        at=utc_now_iso(),
        stage=deploy.stage,
        role=deploy.role,
        component=deploy.component,
        seq=deploy.seq,
        deploy_id=deploy.deploy_id,
        release_id=deploy.release_id,
        step=step_of(kind, wave or 0),
        instance=instance,
        wave=wave,
        waves=deploy.rollout.last_wave + 1 if deploy.rollout else None,
        counts=counts or {},
        reason=reason,
    )


def boot_failed_event(stage: str, role: str, instance: str, reason: str) -> DeployEvent:
    """`Instance Boot Failed`: about an instance that cannot join its fleet, not about a deploy."""
    return DeployEvent(
        type=EventType.INSTANCE_BOOT_FAILED,
        at=utc_now_iso(),
        stage=stage,
        role=role,
        component=None,
        seq=None,
        deploy_id=None,
        release_id=None,
        instance=instance,
        reason=reason,
    )


def entry_bytes(event: DeployEvent) -> int:
    """The entry size as EventBridge counts it (Time, Source, DetailType, Detail). Pure."""
    detail = json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":"))
    return _TIME_BYTES + len(EVENT_SOURCE) + len(event.type.value.encode()) + len(detail.encode())


def _cut(text: str | None, chars: int) -> str | None:
    if text is None or len(text) <= chars:
        return text
    return text[: max(chars - 1, 0)] + "…"


def _chat_safe(text: str) -> str:
    text = _CONTROL.sub(" ", text)
    return "".join(_CHAT_ESCAPES.get(c, c) for c in text)


def parse_event(raw: str | bytes) -> DeployEvent:
    """Read an event's detail strictly (a consumer's side, and the tests'): raise RejectedInput
    naming the bad key."""
    doc = json_object(raw, what="deploy event", limit=MAX_EVENT_ENTRY_BYTES, error=RejectedInput)
    unknown = set(doc) - _KEYS
    if unknown:
        raise RejectedInput(f"deploy event has unknown key(s): {', '.join(sorted(unknown))}")
    if doc.get("v") != EVENT_VERSION:
        raise RejectedInput(f"deploy event: v must be {EVENT_VERSION}, not {doc.get('v')!r}")
    try:
        kind = EventType(str(doc.get("type")))
    except ValueError:
        raise RejectedInput(f"deploy event: type {doc.get('type')!r} is not a deployer event type") from None
    _check_fields(doc, kind)
    instance = doc.get("instance")
    event = DeployEvent(
        type=kind,
        at=doc["at"],
        stage=doc["stage"],
        role=doc["role"],
        component=doc.get("component"),
        seq=doc.get("seq"),
        deploy_id=doc.get("deploy_id"),
        release_id=doc.get("release_id"),
        step=doc["step"],
        instance=instance,
        wave=_optional_int(doc, "wave"),
        waves=_optional_int(doc, "waves"),
        counts=doc.get("counts", {}),
        reason=_optional_text(doc, "reason"),
        by=_optional_text(doc, "by"),
        page=_optional_text(doc, "page"),
    )
    if doc.get("id") != event.event_id:
        raise RejectedInput(f"deploy event: id {doc.get('id')!r} does not match its deploy and step")
    return event


def _check_fields(doc: Mapping[str, Any], kind: EventType) -> None:
    """Every field `kind` needs is there and well-formed; none it must not have is."""
    about_deploy = kind is not EventType.INSTANCE_BOOT_FAILED
    if not about_deploy and {"component", "seq", "deploy_id", "release_id"} & set(doc):
        raise RejectedInput(f"deploy event: a {kind.value!r} event is about no deploy")
    for name in ("stage", "role", "component") if about_deploy else ("stage", "role"):
        _require(doc, name, lambda v: isinstance(v, str) and NAME_PATTERN.match(v) is not None)
    _require(doc, "at", lambda v: parse_timestamp(v) is not None)
    if about_deploy:
        _require(doc, "deploy_id", lambda v: isinstance(v, str) and DEPLOY_ID_PATTERN.match(v) is not None)
        _require(doc, "release_id", lambda v: isinstance(v, str) and RELEASE_ID_PATTERN.match(v) is not None)
    for name in ("seq", "step") if about_deploy else ("step",):
        _require(doc, name, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
    counts = doc.get("counts", {})
    if not isinstance(counts, dict) or not all(
        _COUNT_NAME.match(k) and isinstance(v, int) and not isinstance(v, bool) for k, v in counts.items()
    ):
        raise RejectedInput("deploy event: counts must map short names to integers")
    instance = doc.get("instance")
    if instance is not None and not (isinstance(instance, str) and INSTANCE_ID_PATTERN.match(instance)):
        raise RejectedInput("deploy event: instance is not an instance id")
    if kind.from_instance != (instance is not None):
        raise RejectedInput(
            f"deploy event: a {kind.value!r} event {'needs' if kind.from_instance else 'has no'} instance"
        )


def _require(doc: Mapping[str, Any], name: str, valid: Any) -> None:
    if name not in doc or not valid(doc[name]):
        raise RejectedInput(f"deploy event: {name} is missing or malformed ({doc.get(name)!r:.80})")


def _optional_int(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise RejectedInput(f"deploy event: {name} must be a non-negative integer")
    return value


def _optional_text(doc: Mapping[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is not None and not isinstance(value, str):
        raise RejectedInput(f"deploy event: {name} must be a string")
    return value
