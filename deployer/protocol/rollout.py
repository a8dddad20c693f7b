"""Staged rollouts: the plan a deploy carries, the cursor CI advances, and who is admitted. Pure.

A deploy with a `rollout` plan names two releases: the candidate (the deploy's own) and the
**stable** one that every instance not yet admitted keeps running, and that everyone returns to
if the rollout is aborted. Wave 0 is an explicit list of instances chosen from live heartbeats
at publish time (never empty: 10 % of 3 instances is still one). Every later wave admits the
instances whose bucket, `hash(deploy_id, instance_id)` in basis points, is below the wave's
threshold: no fleet count is needed to decide, a new instance computes its own wave, and
admission is monotone (an instance admitted in wave 2 stays admitted in wave 3).

Progress is the **cursor**, one small document per rollout in S3 that only CI writes
(conditionally; signed like a deploy when signing is on). Agents read it when the deploy
arrives, when CI announces a move, and at reconcile; they never advance it.
(docs/design.md, "Staged rollouts")
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from deployer.protocol.errors import InvalidMessage
from deployer.protocol.names import INSTANCE_ID_PATTERN
from deployer.protocol.release import check_release
from deployer.protocol.timestamps import TIMESTAMP_FORMAT, parse_timestamp

#: Buckets are basis points: a wave's threshold of 1000 admits 10 % of instances.
BUCKETS = 10_000
#: Appended to a deploy id for the stable side of a rollout: its own idempotency key.
STABLE_SUFFIX = ":stable"
ROLLOUT_DOCUMENT_VERSION = 1
#: Bounds that keep a plan small inside the 16 KiB deploy document.
MAX_WAVES = 20
MAX_FIRST_WAVE = 100
_WAVE_SPEC = re.compile(r"^(\d{1,6})(%?)$")
_PLAN_KEYS = frozenset({"waves", "first", "thresholds", "stable", "bake_s", "max_failed", "progress_deadline_s"})
_STABLE_KEYS = frozenset({"release_id", "manifest_key", "manifest_sha256", "artifact_sha256", "artifact_size"})
_CURSOR_KEYS = frozenset({"v", "deploy_id", "wave", "state", "updated_at", "driver", "lease_until", "reason"})


class RolloutState(enum.StrEnum):
    ROLLING = "rolling"  # waves up to `wave` are admitted
    DONE = "done"  # every instance runs the candidate
    ABORTED = "aborted"  # every instance returns to stable


@dataclass(frozen=True)
class Stable:
    """The release every instance not admitted keeps, and the one an abort returns to."""

    release_id: str
    manifest_key: str
    manifest_sha256: str
    artifact_sha256: str | None = None
    artifact_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "release_id": self.release_id,
            "manifest_key": self.manifest_key,
            "manifest_sha256": self.manifest_sha256,
        }
        if self.artifact_sha256 is not None:
            doc.update(artifact_sha256=self.artifact_sha256, artifact_size=self.artifact_size)
        return doc


@dataclass(frozen=True)
class Plan:
    """The waves (as the operator wrote them), wave 0's instances, later waves' thresholds, and the gates."""

    waves: tuple[str, ...]
    first: tuple[str, ...]
    #: Cumulative bucket thresholds of waves 1…n (basis points); the last is always BUCKETS.
    thresholds: tuple[int, ...]
    stable: Stable
    bake_s: float = 0.0
    #: "3" (instances) or "10%" (of the live instances at publish), per rollout.
    max_failed: str = "0"
    progress_deadline_s: float = 900.0

    def wave_of(self, deploy_id: str, instance_id: str) -> int:
        """The first wave that admits this instance: 0 if it was chosen for wave 0, else by its bucket."""
        if instance_id in self.first:
            return 0
        point = bucket(deploy_id, instance_id)
        return next(i + 1 for i, threshold in enumerate(self.thresholds) if point < threshold)

    def admits(self, deploy_id: str, instance_id: str, wave: int) -> bool:
        return self.wave_of(deploy_id, instance_id) <= wave

    @property
    def last_wave(self) -> int:
        return len(self.thresholds)

    def wave_label(self, wave: int) -> str:
        """The wave as the operator wrote it; "100%" for the last wave the plan appended."""
        return self.waves[wave] if wave < len(self.waves) else "100%"

    def failure_budget(self, live: int) -> int:
        """How many failed instances the rollout tolerates, for a fleet of `live` instances."""
        count, percent = _spec(self.max_failed, "max_failed")
        return math.floor(live * count / 100) if percent else count

    def to_dict(self) -> dict[str, Any]:
        return {
            "waves": list(self.waves),
            "first": list(self.first),
            "thresholds": list(self.thresholds),
            "stable": self.stable.to_dict(),
            "bake_s": self.bake_s,
            "max_failed": self.max_failed,
            "progress_deadline_s": self.progress_deadline_s,
        }


def bucket(deploy_id: str, instance_id: str) -> int:
    """An instance's place in a rollout, 0…9999: uniform, stable for the deploy, different per deploy."""
    digest = hashlib.sha256(f"{deploy_id}/{instance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def plan_waves(
    specs: Sequence[str], deploy_id: str, live: Sequence[str]
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
    """Wave specs ("1", "10%", "100%") → (specs, wave 0's instances, thresholds of the later waves).

    Wave 0 takes max(1, its share) of the live instances, those with the lowest buckets, so
    it is never empty and its members would also be early in the bucketed waves. A count in a
    later wave becomes the share of the live fleet it stands for. The last wave is always 100 %.
    """
    if not specs:
        raise ValueError("--waves needs at least one wave")
    if len(specs) > MAX_WAVES:
        raise ValueError(f"at most {MAX_WAVES} waves")
    if not live:
        raise ValueError("no live instance runs this channel: there is nobody to roll out to")
    shares = [_share(spec, len(live)) for spec in specs]
    if any(b < a for a, b in itertools.pairwise(shares)):
        raise ValueError(f"waves must not shrink: {', '.join(specs)}")
    ranked = sorted(live, key=lambda instance: (bucket(deploy_id, instance), instance))
    number, percent = _spec(specs[0], "wave")
    first_count = math.ceil(len(live) * number / 100) if percent else number
    first = tuple(sorted(ranked[: min(max(1, first_count), MAX_FIRST_WAVE, len(live))]))
    thresholds = [max(1, share) for share in shares[1:]]
    if not thresholds or thresholds[-1] < BUCKETS:
        thresholds.append(BUCKETS)
    return tuple(specs), first, tuple(thresholds)


def _share(spec: str, live: int) -> int:
    number, percent = _spec(spec, "wave")
    share = number * 100 if percent else math.ceil(number * BUCKETS / live)
    return min(share, BUCKETS)


def _spec(spec: str, what: str) -> tuple[int, bool]:
    match = _WAVE_SPEC.match(spec.strip())
    if not match or (match.group(2) and int(match.group(1)) > 100):
        raise ValueError(f"{what} {spec!r} must be an instance count or a percentage up to 100%")
    return int(match.group(1)), bool(match.group(2))


def base_id(deploy_id: str) -> str:
    """The deploy id CI published, for either side of a rollout."""
    return deploy_id.removesuffix(STABLE_SUFFIX)


def plan_from_dict(value: Any) -> Plan:
    """Parse the `rollout` key of a deploy document; its stable release is checked like the deploy's own."""
    if not isinstance(value, dict):
        raise InvalidMessage("rollout must be an object")
    unknown = sorted(set(value) - _PLAN_KEYS)
    if unknown:
        raise InvalidMessage(f"rollout has unknown key(s): {', '.join(unknown)}")
    waves, first, thresholds = value.get("waves"), value.get("first"), value.get("thresholds")
    if not isinstance(waves, list) or not waves or len(waves) > MAX_WAVES or not all(isinstance(w, str) for w in waves):
        raise InvalidMessage(f"rollout.waves must list 1 to {MAX_WAVES} wave specs")
    if (
        not isinstance(first, list)
        or not 1 <= len(first) <= MAX_FIRST_WAVE
        or not all(isinstance(i, str) and INSTANCE_ID_PATTERN.match(i) for i in first)
    ):
        raise InvalidMessage(f"rollout.first must list 1 to {MAX_FIRST_WAVE} instance ids")
    if (
        not isinstance(thresholds, list)
        or not thresholds
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 < t <= BUCKETS for t in thresholds)
        or thresholds != sorted(thresholds)
        or thresholds[-1] != BUCKETS
    ):
        raise InvalidMessage(f"rollout.thresholds must rise to {BUCKETS}")
    stable = value.get("stable")
    if (
        not isinstance(stable, dict)
        or not set(stable) <= _STABLE_KEYS
        or not {
            "release_id",
            "manifest_key",
            "manifest_sha256",
        }
        <= set(stable)
    ):
        raise InvalidMessage("rollout.stable must name release_id, manifest_key and manifest_sha256")
    check_release(stable)
    numbers: dict[str, float] = {}
    for key in ("bake_s", "progress_deadline_s"):
        number = value.get(key)
        if not isinstance(number, int | float) or isinstance(number, bool) or number < 0:
            raise InvalidMessage(f"rollout.{key} must be a number of seconds")
        numbers[key] = float(number)
    max_failed = value.get("max_failed")
    try:
        _spec(str(max_failed), "max_failed")
    except ValueError as exc:
        raise InvalidMessage(f"rollout.{exc}") from None
    return Plan(
        waves=tuple(waves),
        first=tuple(first),
        thresholds=tuple(thresholds),
        stable=Stable(**stable),
        bake_s=numbers["bake_s"],
        max_failed=str(max_failed),
        progress_deadline_s=numbers["progress_deadline_s"],
    )


@dataclass(frozen=True)
class Cursor:
    """How far a rollout got. Written only by CI (conditionally); `driver`'s lease says who drives it."""

    deploy_id: str
    wave: int
    state: RolloutState
    updated_at: datetime
    driver: str
    lease_until: datetime
    reason: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": ROLLOUT_DOCUMENT_VERSION,
                "deploy_id": self.deploy_id,
                "wave": self.wave,
                "state": self.state.value,
                "updated_at": self.updated_at.strftime(TIMESTAMP_FORMAT),
                "driver": self.driver,
                "lease_until": self.lease_until.strftime(TIMESTAMP_FORMAT),
                "reason": self.reason,
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def parse_cursor(raw: str | bytes, deploy_id: str) -> Cursor:
    """Parse a cursor strictly; it must be the one of `deploy_id` (a cursor copied from another rollout is refused)."""
    from deployer.protocol.decoding import json_object

    doc = json_object(raw, what="rollout cursor", limit=4096, error=InvalidMessage)
    if doc.get("v") != ROLLOUT_DOCUMENT_VERSION or set(doc) != _CURSOR_KEYS:
        raise InvalidMessage(f"rollout cursor must be v{ROLLOUT_DOCUMENT_VERSION} with exactly {sorted(_CURSOR_KEYS)}")
    if doc["deploy_id"] != deploy_id:
        raise InvalidMessage(f"rollout cursor is for deploy {doc['deploy_id']!r}, not {deploy_id!r}")
    wave = doc["wave"]
    if not isinstance(wave, int) or isinstance(wave, bool) or not 0 <= wave <= MAX_WAVES:
        raise InvalidMessage(f"rollout cursor wave must be 0..{MAX_WAVES}, got {wave!r}")
    try:
        state = RolloutState(doc["state"])
    except ValueError:
        raise InvalidMessage(f"rollout cursor state {doc['state']!r} is not one of rolling, done, aborted") from None
    updated, lease = parse_timestamp(doc["updated_at"]), parse_timestamp(doc["lease_until"])
    if updated is None or lease is None:
        raise InvalidMessage("rollout cursor updated_at and lease_until must be ISO 8601 UTC timestamps")
    if not isinstance(doc["driver"], str) or not (doc["reason"] is None or isinstance(doc["reason"], str)):
        raise InvalidMessage("rollout cursor driver must be a string and reason a string or null")
    return Cursor(deploy_id, wave, state, updated, doc["driver"], lease, doc["reason"])


class Side(enum.StrEnum):
    CANDIDATE = "candidate"
    STABLE = "stable"


def side_for(plan: Plan, deploy_id: str, instance_id: str, cursor: Cursor | None, now: Side | None = None) -> Side:
    """Which release of a rollout this instance runs now. Pure.

    No valid cursor (deleted, forged, unreadable): where it is (`now`), or stable if it is on
    neither side yet, so an attacker who can write the bucket can neither advance nor revert a
    rollout. An aborted rollout: stable. A finished one: the candidate. Otherwise: the candidate
    once the cursor's wave admits the instance.
    """
    if cursor is None:
        return now or Side.STABLE
    return Side.CANDIDATE if wave_admitted(cursor, plan.wave_of(deploy_id, instance_id)) else Side.STABLE


def wave_admitted(cursor: Cursor, wave: int) -> bool:
    """Whether the instances of `wave` run the candidate now: none once aborted, all once done. Pure."""
    if cursor.state is RolloutState.ABORTED:
        return False
    return cursor.state is RolloutState.DONE or wave <= cursor.wave
