"""The status report: the third wire document, one JSON object per instance under `status/`.

One writer (the agent's reporter) and every reader (`deployer status`, `publish --wait`,
`deployer gc`, the demo) go through this module: `StatusReport.to_json` writes it,
`parse_report` reads it strictly, naming the bad key. Who a report is about comes from its S3
key (`Layout.report_key`), never from its body; a body that names another instance, stage or
role than its key is not believed (docs/design.md, "The status report").
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from deployer.protocol.decoding import json_object
from deployer.protocol.errors import InvalidReport
from deployer.protocol.layout import ReportKey
from deployer.protocol.names import NAME_PATTERN, ZONE_PATTERN
from deployer.protocol.release import DEPLOY_ID_PATTERN, RELEASE_ID_PATTERN
from deployer.protocol.timestamps import TIMESTAMP_FORMAT, parse_timestamp

#: Short fields shown as they are (versions, timestamps): printable ASCII, no control characters.
PRINTABLE = re.compile(r"^[\x20-\x7e]{0,64}$")

STATUS_VERSION = 1
#: Bound on one report; a real one is ~1 KiB plus at most one 4 KiB output tail per component.
MAX_REPORT_BYTES = 256 * 1024
#: How often an idle agent rewrites its report (agent config `heartbeat_interval_seconds`).
DEFAULT_HEARTBEAT_INTERVAL_SECONDS = 900.0
#: Readers count an instance live while its heartbeat is younger than this: two default
#: heartbeat intervals plus a minute of slack.
DEFAULT_HEARTBEAT_TTL_SECONDS = 2 * DEFAULT_HEARTBEAT_INTERVAL_SECONDS + 60
#: `deployer gc` collects an instance whose heartbeat is older than this: 12 missed heartbeats
#: at the default interval.
DEFAULT_GC_TTL_SECONDS = 3 * 3600.0
#: ... and refuses TTLs shorter than this: an agent does not heartbeat while a hook runs, so a
#: short TTL would collect healthy instances mid-apply.
MIN_GC_TTL_SECONDS = 600.0

_TOP_KEYS = frozenset(
    {
        "v",
        "instance_id",
        "stage",
        "role",
        "agent_version",
        "started_at",
        "heartbeat_at",
        "components",
        "last_rejection",
        "boot_error",
        "lifecycle",
        "zone",
    }
)
_COMPONENT_KEYS = frozenset(
    {"state", "release_id", "seq", "deploy_id", "error", "output_tail", "updated_at", "last_error", "stale_since"}
)
_REJECTION_KEYS = frozenset({"message_id", "reason", "at"})


class ComponentState(enum.StrEnum):
    PENDING = "pending"  # nothing applied yet
    APPLYING = "applying"
    OK = "ok"
    WAITING = "waiting"  # a staged rollout has not admitted this instance yet: it runs the stable release
    FAILED = "failed"  # may succeed on retry (hook failure, network)
    REJECTED = "rejected"  # can never succeed (invalid manifest, checksum, unsafe archive)


#: States after which a component needs someone to publish again (or a retry to succeed).
FAILING_STATES = frozenset({ComponentState.FAILED, ComponentState.REJECTED})


class Lifecycle(enum.StrEnum):
    """Where the instance is in its Auto Scaling lifecycle, when not simply in service."""

    #: Left the fleet through its terminate hook: queues gone, never coming back. Not lost.
    TERMINATED = "terminated"
    #: Converged and asleep in a warm pool (Warmed:Stopped/Hibernated/Running): catches up when
    #: it enters service. Not lost, not serving, never collected by gc.
    WARMED = "warmed"


@dataclass(frozen=True)
class ComponentStatus:
    state: ComponentState = ComponentState.PENDING
    release_id: str | None = None
    seq: int | None = None
    deploy_id: str | None = None
    error: str | None = None
    output_tail: str | None = None
    updated_at: str | None = None
    #: The most recent failure on this component, kept after a later success: why an instance
    #: that is behind its channel's pointer is behind.
    last_error: str | None = None
    #: Set while no valid signed timestamp vouches for the channel's pointer (the trust's
    #: freshness): since when. Its pointer may be old and nobody would know (docs/design.md, "Freshness").
    stale_since: str | None = None


@dataclass(frozen=True)
class Rejection:
    """The last poison message this instance dead-lettered, and why."""

    message_id: str
    reason: str
    at: str


@dataclass(frozen=True)
class StatusReport:
    key: ReportKey
    heartbeat_at: datetime
    agent_version: str = ""
    started_at: str | None = None
    components: Mapping[str, ComponentStatus] = field(default_factory=dict)
    last_rejection: Rejection | None = None
    #: Set while the agent cannot finish boot (it retries with backoff): why not.
    boot_error: str | None = None
    lifecycle: Lifecycle | None = None
    #: The instance's Availability Zone (zonal waves), when the agent knows it.
    zone: str | None = None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "v": STATUS_VERSION,
            # For people reading the object; readers take identity from the key.
            "instance_id": self.key.instance_id,
            "stage": self.key.stage,
            "role": self.key.role,
            "agent_version": self.agent_version,
            "started_at": self.started_at,
            "heartbeat_at": self.heartbeat_at.strftime(TIMESTAMP_FORMAT),
            "components": {
                name: {
                    "state": status.state.value,
                    "release_id": status.release_id,
                    "seq": status.seq,
                    "deploy_id": status.deploy_id,
                    "error": status.error,
                    "output_tail": status.output_tail,
                    "updated_at": status.updated_at,
                    "last_error": status.last_error,
                    # Written only when set: older readers know no such key.
                    **({"stale_since": status.stale_since} if status.stale_since else {}),
                }
                for name, status in self.components.items()
            },
            "last_rejection": (
                None
                if self.last_rejection is None
                else {
                    "message_id": self.last_rejection.message_id,
                    "reason": self.last_rejection.reason,
                    "at": self.last_rejection.at,
                }
            ),
        }
        if self.boot_error is not None:
            doc["boot_error"] = self.boot_error  # written only when set: older readers know no such key
        if self.lifecycle is not None:
            doc["lifecycle"] = self.lifecycle.value  # likewise
        if self.zone is not None:
            doc["zone"] = self.zone  # likewise
        return json.dumps(doc, sort_keys=True, indent=1).encode()


def parse_report(raw: bytes, key: ReportKey) -> StatusReport:
    """Parse a report read from `key`; raise InvalidReport naming what is wrong."""
    doc = json_object(raw, what="report", limit=MAX_REPORT_BYTES, error=InvalidReport)
    if doc.get("v") != STATUS_VERSION or isinstance(doc.get("v"), bool):
        raise InvalidReport(f"unsupported report version v={doc.get('v')!r} (this reads v={STATUS_VERSION})")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise InvalidReport(f"report has unknown key(s): {', '.join(unknown)}")
    for name, expected in (("instance_id", key.instance_id), ("stage", key.stage), ("role", key.role)):
        if doc.get(name) != expected:
            raise InvalidReport(f"report body says {name} {doc.get(name)!r} but its key says {expected!r}")
    heartbeat = parse_timestamp(doc.get("heartbeat_at"))
    if heartbeat is None:
        raise InvalidReport(f"heartbeat_at {doc.get('heartbeat_at')!r} is not an ISO 8601 UTC timestamp")
    components = doc.get("components")
    if not isinstance(components, dict):
        raise InvalidReport(f"components must be an object, got {components!r}")
    return StatusReport(
        key=key,
        heartbeat_at=heartbeat,
        agent_version=_matching(doc, "agent_version", "report", PRINTABLE) or "",
        started_at=_matching(doc, "started_at", "report", PRINTABLE),
        components={name: _component(name, value) for name, value in components.items()},
        last_rejection=_rejection(doc.get("last_rejection")),
        boot_error=_optional_str(doc, "boot_error"),
        lifecycle=_lifecycle(doc.get("lifecycle")),
        zone=_matching(doc, "zone", "report", ZONE_PATTERN),
    )


def _lifecycle(value: object) -> Lifecycle | None:
    if value is None:
        return None
    try:
        return Lifecycle(str(value))
    except ValueError:
        raise InvalidReport(
            f"lifecycle {value!r} is not one of {', '.join(item.value for item in Lifecycle)}"
        ) from None


def _component(name: object, value: object) -> ComponentStatus:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidReport(f"component name {name!r} is not a valid name")
    where = f"components.{name}"
    if not isinstance(value, dict):
        raise InvalidReport(f"{where} must be an object, got {value!r}")
    unknown = sorted(set(value) - _COMPONENT_KEYS)
    if unknown:
        raise InvalidReport(f"{where} has unknown key(s): {', '.join(unknown)}")
    try:
        state = ComponentState(str(value.get("state")))
    except ValueError:
        raise InvalidReport(f"{where}.state {value.get('state')!r} is not a component state") from None
    seq = value.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        raise InvalidReport(f"{where}.seq must be a positive integer or null, got {seq!r}")
    return ComponentStatus(
        state=state,
        release_id=_matching(value, "release_id", where, RELEASE_ID_PATTERN),
        seq=seq,
        deploy_id=_matching(value, "deploy_id", where, DEPLOY_ID_PATTERN),
        error=_optional_str(value, "error", where),
        output_tail=_optional_str(value, "output_tail", where),
        updated_at=_matching(value, "updated_at", where, PRINTABLE),
        last_error=_optional_str(value, "last_error", where),
        stale_since=_matching(value, "stale_since", where, PRINTABLE),
    )


def _rejection(value: object) -> Rejection | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != _REJECTION_KEYS:
        raise InvalidReport(f"last_rejection must be null or an object with {sorted(_REJECTION_KEYS)}, got {value!r}")
    fields = {name: _optional_str(value, name, "last_rejection") or "" for name in sorted(_REJECTION_KEYS)}
    return Rejection(**fields)


def _matching(doc: Mapping[str, Any], name: str, where: str, pattern: re.Pattern[str]) -> str | None:
    """An identifier an instance writes: a table row shows it as is, so it keeps to its grammar
    (a newline in a release id would print a row for an instance that does not exist)."""
    value = _optional_str(doc, name, where)
    if value is not None and not pattern.match(value):
        raise InvalidReport(f"{where}.{name} {value[:80]!r} is not a valid {name.replace('_', ' ')}")
    return value


def _optional_str(doc: Mapping[str, Any], name: str, where: str = "") -> str | None:
    value = doc.get(name)
    if value is not None and not isinstance(value, str):
        path = f"{where}.{name}" if where else name
        raise InvalidReport(f"{path} must be a string or null, got {value!r}")
    return value
