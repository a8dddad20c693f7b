"""Staged rollouts: the plan a deploy carries, the cursor CI advances, and who is admitted. Pure.

A deploy with a `rollout` plan names two releases: the candidate (the deploy's own) and the
**stable** one that every instance not yet admitted keeps running, and that everyone returns to
if the rollout is aborted. Wave 0 is an explicit list of instances chosen from live heartbeats
at publish time (never empty: 10 % of 3 instances is still one). Every later wave admits the
instances whose bucket, `hash(deploy_id, instance_id)` in basis points, is below the wave's
threshold: no fleet count is needed to decide, a new instance computes its own wave, and
admission is monotone (an instance admitted in wave 2 stays admitted in wave 3). Where the
publisher knows the fleet, a threshold is raised so the wave reaches at least its share of it
(hash buckets alone can admit nobody new in a small fleet's 30 % wave).

Zonal waves (`--waves az`, `az:2`, after at most one canary wave: `1,az`) admit by Availability
Zone instead: the plan lists the zones of the live fleet, N per wave, and an instance's wave is
its zone's (one in a zone the plan does not name joins the last wave), so the first zone bakes
before the next starts and an instance that scales out into a zone joins that zone's wave.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from deployer.protocol.errors import InvalidMessage
from deployer.protocol.names import INSTANCE_ID_PATTERN, ZONE_PATTERN
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
#: `az` (one zone per wave) or `az:N` (N zones per wave).
_ZONE_SPEC = re.compile(r"^az(?::(\d{1,2}))?$")
MAX_ZONES = 64
_PLAN_KEYS = frozenset(
    {"waves", "first", "thresholds", "stable", "bake_s", "max_failed", "progress_deadline_s", "zones", "abort_after"}
)
#: A pre-authorised abort counts at most one page of failure markers (ListObjectsV2's 1,000 keys).
MAX_ABORT_AFTER = 1000
#: How a cursor's reason starts once the plan's own rule aborted the rollout (not a driver's gate).
PRE_AUTHORISED = "aborted (pre-authorised)"
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
    #: Zonal waves: the zones each wave after `first` admits (empty: waves by bucket thresholds).
    zones: tuple[tuple[str, ...], ...] = ()
    #: The pre-authorised abort: once this many distinct admitted instances told that the candidate
    #: failed, every instance returns to stable by itself, driver or not (None: only a driver aborts).
    abort_after: int | None = None

    def wave_of(self, deploy_id: str, instance_id: str, zone: str | None = None) -> int:
        """The first wave that admits this instance: 0 if it was chosen for wave 0, else by its
        zone (zonal waves; an unknown zone is the last wave) or by its bucket."""
        if instance_id in self.first:
            return 0
        if self.zones:
            offset = 1 if self.first else 0
            found = next((i for i, group in enumerate(self.zones) if zone in group), len(self.zones) - 1)
            return offset + found
        point = bucket(deploy_id, instance_id)
        return next(i + 1 for i, threshold in enumerate(self.thresholds) if point < threshold)

    def admits(self, deploy_id: str, instance_id: str, wave: int, zone: str | None = None) -> bool:
        return self.wave_of(deploy_id, instance_id, zone) <= wave

    @property
    def last_wave(self) -> int:
        if self.zones:
            return (1 if self.first else 0) + len(self.zones) - 1
        return len(self.thresholds)

    def wave_label(self, wave: int) -> str:
        """The wave as the operator wrote it ("100%" for the last wave the plan appended); a zonal
        wave by its zones."""
        if self.zones:
            offset = 1 if self.first else 0
            if wave >= offset:
                return "+".join(self.zones[wave - offset])
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
            # Written only for zonal waves (and an abort rule): agents before them know no such key.
            **({"zones": [list(group) for group in self.zones]} if self.zones else {}),
            **({"abort_after": self.abort_after} if self.abort_after is not None else {}),
        }

    def failures_counted(self, deploy_id: str, cursor: Cursor, failed: Iterable[str]) -> list[str]:
        """The told failures the abort rule counts: distinct instances the cursor's wave admits
        (any, for zonal waves: an instance's zone is not in its marker). Pure."""
        return sorted({i for i in failed if self.zones or self.admits(deploy_id, i, cursor.wave)})

    def abort_fired(self, deploy_id: str, cursor: Cursor | None, failed: Iterable[str]) -> str | None:
        """Why the plan's own rule aborts the rollout now, or None. Pure.

        `failed`: the instances whose failure markers exist for this deploy. Only a rolling
        rollout can be aborted so (a finished one stays finished, an aborted one already is), only
        distinct instances count (a marker is named by its writer, whom IAM confines to its own
        name: K markers are K instances), and, where admission is computable from the id alone
        (waves by bucket), only instances the cursor's wave admits: a marker from an instance that
        never ran the candidate is not a verdict on it.
        """
        if self.abort_after is None or cursor is None or cursor.state is not RolloutState.ROLLING:
            return None
        counted = self.failures_counted(deploy_id, cursor, failed)
        if len(counted) < self.abort_after:
            return None
        shown = ", ".join(counted[:5]) + (", …" if len(counted) > 5 else "")
        return f"{PRE_AUTHORISED}: {len(counted)} admitted instance(s) failed, the plan's limit is {self.abort_after} ({shown})"


def bucket(deploy_id: str, instance_id: str) -> int:
    """An instance's place in a rollout, 0…9999: uniform, stable for the deploy, different per deploy."""
    digest = hashlib.sha256(f"{deploy_id}/{instance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Waves:
    """What `plan_waves` decided: the plan's `waves`, `first`, `thresholds` and `zones`."""

    specs: tuple[str, ...]
    first: tuple[str, ...]
    thresholds: tuple[int, ...]
    zones: tuple[tuple[str, ...], ...] = ()


def plan_waves(
    specs: Sequence[str], deploy_id: str, live: Sequence[str], zones: Mapping[str, str | None] | None = None
) -> Waves:
    """Wave specs ("1", "10%", "100%"; or "az", "az:2" last) → the waves of a plan, for the live fleet.

    Wave 0 takes max(1, its share) of the live instances, those with the lowest buckets, so
    it is never empty and its members would also be early in the bucketed waves. A count in a
    later wave becomes the share of the live fleet it stands for, and a threshold is raised
    until the wave reaches at least its share of the live fleet. The last wave is always 100 %.
    Zonal waves group the live fleet's zones (`zones`: instance → zone), N per wave, in name order.
    """
    if not specs:
        raise ValueError("--waves needs at least one wave")
    if len(specs) > MAX_WAVES:
        raise ValueError(f"at most {MAX_WAVES} waves")
    if not live:
        raise ValueError("no live instance runs this channel: there is nobody to roll out to")
    zonal = _ZONE_SPEC.match(specs[-1].strip())
    if zonal:
        return _zonal_waves(specs, deploy_id, live, zones or {}, int(zonal.group(1) or 1))
    shares = [_share(spec, len(live)) for spec in specs]
    if any(b < a for a, b in itertools.pairwise(shares)):
        raise ValueError(f"waves must not shrink: {', '.join(specs)}")
    ranked = sorted(live, key=lambda instance: (bucket(deploy_id, instance), instance))
    first = _first_wave(specs[0], ranked)
    # Where the fleet is known, each wave reaches its share of it: the threshold rises above the
    # bucket of the last instance it must admit (newcomers still decide alone, by threshold).
    later = [i for i in ranked if i not in first]
    thresholds: list[int] = []
    for share in shares[1:]:
        needed = math.ceil(share * len(live) / BUCKETS) - len(first)
        floor = bucket(deploy_id, later[min(needed, len(later)) - 1]) + 1 if needed > 0 and later else 1
        thresholds.append(min(BUCKETS, max(share, floor, thresholds[-1] if thresholds else 1)))
    if not thresholds or thresholds[-1] < BUCKETS:
        thresholds.append(BUCKETS)
    return Waves(tuple(specs), first, tuple(thresholds))


def _first_wave(spec: str, ranked: Sequence[str]) -> tuple[str, ...]:
    number, percent = _spec(spec, "wave")
    count = math.ceil(len(ranked) * number / 100) if percent else number
    return tuple(sorted(ranked[: min(max(1, count), MAX_FIRST_WAVE, len(ranked))]))


def _zonal_waves(
    specs: Sequence[str], deploy_id: str, live: Sequence[str], zones: Mapping[str, str | None], per_wave: int
) -> Waves:
    if len(specs) > 2 or any(_ZONE_SPEC.match(spec.strip()) for spec in specs[:-1]):
        raise ValueError("zonal waves (az, az:N) come last, after at most one canary wave: e.g. 1,az")
    if per_wave < 1:
        raise ValueError("az:N needs at least one zone per wave")
    known = sorted({zone for instance in live if (zone := zones.get(instance))})
    if not known:
        raise ValueError("no live instance reports its Availability Zone: zonal waves need agents that do")
    if len(known) > MAX_ZONES:
        raise ValueError(f"at most {MAX_ZONES} zones")
    groups = tuple(tuple(known[i : i + per_wave]) for i in range(0, len(known), per_wave))
    ranked = sorted(live, key=lambda instance: (bucket(deploy_id, instance), instance))
    first = _first_wave(specs[0], ranked) if len(specs) == 2 else ()
    return Waves(tuple(specs), first, (BUCKETS,), groups)


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
    zones = _zones(value.get("zones"))
    if (
        not isinstance(first, list)
        or not (0 if zones else 1) <= len(first) <= MAX_FIRST_WAVE
        or not all(isinstance(i, str) and INSTANCE_ID_PATTERN.match(i) for i in first)
    ):
        raise InvalidMessage(f"rollout.first must list 1 to {MAX_FIRST_WAVE} instance ids (0 with zones)")
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
        zones=zones,
        abort_after=_abort_after(value.get("abort_after")),
    )


def _abort_after(value: Any) -> int | None:
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ABORT_AFTER
    ):
        raise InvalidMessage(f"rollout.abort_after must be an instance count from 1 to {MAX_ABORT_AFTER}")
    return value


def _zones(value: Any) -> tuple[tuple[str, ...], ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_WAVES
        or not all(isinstance(group, list) and group for group in value)
        or sum(len(group) for group in value) > MAX_ZONES
        or not all(isinstance(zone, str) and ZONE_PATTERN.match(zone) for group in value for zone in group)
    ):
        raise InvalidMessage(f"rollout.zones must list 1 to {MAX_WAVES} groups of zone names")
    return tuple(tuple(group) for group in value)


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


def side_for(
    plan: Plan,
    deploy_id: str,
    instance_id: str,
    cursor: Cursor | None,
    now: Side | None = None,
    zone: str | None = None,
) -> Side:
    """Which release of a rollout this instance runs now. Pure.

    No valid cursor (deleted, forged, unreadable): where it is (`now`), or stable if it is on
    neither side yet, so an attacker who can write the bucket can neither advance nor revert a
    rollout. An aborted rollout: stable. A finished one: the candidate. Otherwise: the candidate
    once the cursor's wave admits the instance.
    """
    if cursor is None:
        return now or Side.STABLE
    return Side.CANDIDATE if wave_admitted(cursor, plan.wave_of(deploy_id, instance_id, zone)) else Side.STABLE


def wave_admitted(cursor: Cursor, wave: int) -> bool:
    """Whether the instances of `wave` run the candidate now: none once aborted, all once done. Pure."""
    if cursor.state is RolloutState.ABORTED:
        return False
    return cursor.state is RolloutState.DONE or wave <= cursor.wave
