"""Where a channel lives when it lives in several regions or accounts: the fleet definition, and the
record of one publish across its targets. Pure.

```yaml
# fleet.yml (`deployer publish --targets fleet.yml`; or repeatable --target name=…,region=…,…)
targets:
  - {name: eu, region: eu-west-1, bucket: deploys-eu, topic: "arn:aws:sns:eu-west-1:111111111111:deployer"}
  - {name: us, region: us-east-1, bucket: deploys-us, topic: "arn:aws:sns:us-east-1:222222222222:deployer",
     role: "arn:aws:iam::222222222222:role/deployer-ci", external_id: fleet-deployer, wave: 1}
```

Each target is a whole fleet of its own (bucket, topic, seqs, agents); the publisher moves them
as **waves**, in order (targets sharing a `wave` number move together; by default each target is
its own wave, in the order listed). The **record** (`targets/<stage>/<role>/<component>/<id>.json`
in the first target's bucket, conditional writes) says what one publish did where: each target's
seq and deploy, the release it replaced, and how far it got, so a resumed or aborted rollout
knows exactly which targets moved. (docs/design.md, "Regions and accounts")
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from deployer.protocol.decoding import json_object, yaml_mapping
from deployer.protocol.errors import ConfigError, InvalidMessage
from deployer.protocol.names import BUCKET_PATTERN, NAME_PATTERN, TopicArn
from deployer.protocol.release import DEPLOY_ID_PATTERN, RELEASE_ID_PATTERN

RECORD_VERSION = 1
#: A fleet definition is a few lines per target; anything near this is not one.
MAX_FLEET_DEFINITION_BYTES = 64 * 1024
MAX_TARGETS = 64
_TARGET_KEYS = frozenset({"name", "region", "bucket", "topic", "prefix", "role", "external_id", "wave"})
_REQUIRED = ("name", "region", "bucket", "topic")
_REGION = re.compile(r"^[a-z]{2}(-[a-z0-9]+){2,3}$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
#: STS AssumeRole's ExternalId: 2 to 1,224 characters of [\w+=,.@:/-].
#: https://docs.aws.amazon.com/STS/latest/APIReference/API_AssumeRole.html
_EXTERNAL_ID = re.compile(r"^[\w+=,.@:/-]{2,1224}$")
_RECORD_KEYS = frozenset({"v", "id", "channel", "release_id", "targets", "moves", "state", "reason"})
_MOVE_KEYS = frozenset({"seq", "deploy_id", "replaced", "state"})


@dataclass(frozen=True)
class Target:
    """One fleet of a channel: where its releases, pointers and topic are, and how CI gets there."""

    name: str
    region: str
    bucket: str
    topic_arn: str
    prefix: str = "deployer"
    #: For another account: the role CI assumes there (with `external_id`, if its trust policy asks).
    role_arn: str | None = None
    external_id: str | None = None
    #: Targets with the same wave move together; None: a wave of its own, in the order listed.
    wave: int | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "region": self.region,
            "bucket": self.bucket,
            "topic": self.topic_arn,
            "prefix": self.prefix,
        }
        optional = {"role": self.role_arn, "external_id": self.external_id, "wave": self.wave}
        return doc | {k: v for k, v in optional.items() if v is not None}


def target_from_dict(doc: Any, where: str) -> Target:
    """One target, checked key by key (ConfigError naming the target and the key)."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} must be a mapping of {', '.join(sorted(_TARGET_KEYS))}")
    unknown = sorted(set(doc) - _TARGET_KEYS)
    if unknown:
        raise ConfigError(f"{where} has unknown key(s): {', '.join(map(str, unknown))}")
    missing = [k for k in _REQUIRED if not doc.get(k)]
    if missing:
        raise ConfigError(f"{where} needs {', '.join(missing)}")
    name, region, bucket, topic = (str(doc[k]) for k in _REQUIRED)
    _check_place(where, name, region, bucket)
    parsed = TopicArn.parse(topic)
    if parsed.region != region:
        raise ConfigError(f"{where}.topic {topic!r} is not in the target's region {region}")
    role, external_id, wave = doc.get("role"), doc.get("external_id"), doc.get("wave")
    _check_access(where, role, external_id, parsed.account)
    if wave is not None and (not isinstance(wave, int) or isinstance(wave, bool) or wave < 0):
        raise ConfigError(f"{where}.wave must be a non-negative integer")
    prefix = str(doc.get("prefix", "deployer"))
    return Target(name, region, bucket, topic, prefix, role, str(external_id) if external_id else None, wave)


def _check_place(where: str, name: str, region: str, bucket: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"{where}.name {name!r} is not a valid name (lowercase letters, digits, - and _)")
    if not _REGION.match(region):
        raise ConfigError(f"{where}.region {region!r} is not an AWS region name")
    if not BUCKET_PATTERN.match(bucket):
        raise ConfigError(f"{where}.bucket {bucket!r} is not a bucket name")


def _check_access(where: str, role: Any, external_id: Any, account: str) -> None:
    if role is not None and not (isinstance(role, str) and _ROLE_ARN.match(role)):
        raise ConfigError(f"{where}.role {role!r} is not an IAM role ARN")
    if role is not None and role.split(":")[4] != account:
        raise ConfigError(f"{where}.role is in account {role.split(':')[4]}, its topic in {account}")
    if external_id is not None and (role is None or not _EXTERNAL_ID.match(str(external_id))):
        raise ConfigError(f"{where}.external_id needs a role, and 2 to 1224 characters of letters, digits and +=,.@:/-")


def parse_fleet_definition(raw: bytes | str) -> tuple[Target, ...]:
    """`--targets FILE`: its targets, in order; ConfigError naming what is wrong."""
    doc = yaml_mapping(raw, what="fleet definition", limit=MAX_FLEET_DEFINITION_BYTES, error=ConfigError)
    if set(doc) != {"targets"}:
        raise ConfigError("a fleet definition has one key, targets: a list of targets")
    return check_targets([target_from_dict(t, f"targets[{i}]") for i, t in enumerate(_list(doc["targets"]))])


def parse_target_option(spec: str) -> Target:
    """`--target name=eu,region=eu-west-1,bucket=…,topic=…[,role=…,external_id=…,wave=N]`."""
    doc: dict[str, Any] = {}
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"--target {spec!r}: {part!r} is not key=value")
        doc[key.strip()] = int(value) if key.strip() == "wave" and value.isdigit() else value.strip()
    return target_from_dict(doc, f"--target {doc.get('name', spec)!s}")


def check_targets(targets: Sequence[Target]) -> tuple[Target, ...]:
    if not 1 <= len(targets) <= MAX_TARGETS:
        raise ConfigError(f"a fleet needs 1 to {MAX_TARGETS} targets")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ConfigError(f"target names must differ: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    places = [(t.bucket, t.prefix) for t in targets]
    if len(set(places)) != len(places):
        raise ConfigError("two targets name the same bucket and prefix: they would share pointers")
    return tuple(targets)


def waves_of(targets: Sequence[Target]) -> list[tuple[Target, ...]]:
    """The targets grouped into waves: by `wave` number, else one wave each, in order. Pure."""
    grouped: dict[int, list[Target]] = {}
    for index, target in enumerate(targets):
        grouped.setdefault(target.wave if target.wave is not None else 1000 + index, []).append(target)
    return [tuple(group) for _, group in sorted(grouped.items())]


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError("targets must be a list")
    return value


class MoveState(enum.StrEnum):
    MOVED = "moved"  # the pointer moved; the fleet is converging
    PASSED = "passed"  # converged (and baked)
    FAILED = "failed"  # did not converge, or could not be moved
    ROLLED_BACK = "rolled_back"  # moved back to the release it replaced


class RecordState(enum.StrEnum):
    ROLLING = "rolling"
    DONE = "done"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class Move:
    """What one publish did to one target."""

    seq: int
    deploy_id: str
    #: The release the target ran before (what a rollback restores); None on a first publish.
    replaced: str | None
    state: MoveState = MoveState.MOVED


@dataclass(frozen=True)
class Record:
    """One publish across targets: the fleet definition and each target's move, written as it goes."""

    id: str
    channel: str
    release_id: str
    targets: tuple[Target, ...]
    moves: Mapping[str, Move] = field(default_factory=dict)
    state: RecordState = RecordState.ROLLING
    reason: str | None = None

    def moved(self, target: Target, move: Move) -> Record:
        return replace(self, moves={**self.moves, target.name: move})

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": RECORD_VERSION,
                "id": self.id,
                "channel": self.channel,
                "release_id": self.release_id,
                "targets": [t.to_dict() for t in self.targets],
                "moves": {
                    name: {"seq": m.seq, "deploy_id": m.deploy_id, "replaced": m.replaced, "state": m.state.value}
                    for name, m in self.moves.items()
                },
                "state": self.state.value,
                "reason": self.reason,
            },
            sort_keys=True,
            indent=1,
        )


def parse_record(raw: bytes | str) -> Record:
    """Parse a record strictly (InvalidMessage naming what is wrong)."""
    doc = json_object(raw, what="targets record", limit=MAX_FLEET_DEFINITION_BYTES, error=InvalidMessage)
    if doc.get("v") != RECORD_VERSION or set(doc) != _RECORD_KEYS:
        raise InvalidMessage(f"targets record must be v{RECORD_VERSION} with exactly {sorted(_RECORD_KEYS)}")
    try:
        targets = check_targets([target_from_dict(t, f"targets[{i}]") for i, t in enumerate(_list(doc["targets"]))])
        state = RecordState(doc["state"])
    except (ConfigError, ValueError) as exc:
        raise InvalidMessage(f"targets record: {exc}") from None
    if not isinstance(doc["release_id"], str) or not RELEASE_ID_PATTERN.match(doc["release_id"]):
        raise InvalidMessage("targets record release_id is malformed")
    names = {t.name for t in targets}
    moves = {name: _move(name, move, names) for name, move in (doc["moves"] or {}).items()}
    reason = doc["reason"]
    if reason is not None and not isinstance(reason, str):
        raise InvalidMessage("targets record reason must be a string or null")
    return Record(doc["id"], str(doc["channel"]), doc["release_id"], targets, moves, state, reason)


def _move(name: str, move: Any, names: set[str]) -> Move:
    if name not in names or not isinstance(move, dict) or set(move) != _MOVE_KEYS:
        raise InvalidMessage(f"targets record moves.{name!s:.40} is not a move of a listed target")
    seq, deploy_id, replaced = move["seq"], move["deploy_id"], move["replaced"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise InvalidMessage(f"targets record moves.{name}.seq must be a positive integer")
    if not isinstance(deploy_id, str) or not DEPLOY_ID_PATTERN.match(deploy_id):
        raise InvalidMessage(f"targets record moves.{name}.deploy_id is malformed")
    if replaced is not None and not (isinstance(replaced, str) and RELEASE_ID_PATTERN.match(replaced)):
        raise InvalidMessage(f"targets record moves.{name}.replaced is malformed")
    try:
        return Move(seq, deploy_id, replaced, MoveState(move["state"]))
    except ValueError:
        raise InvalidMessage(f"targets record moves.{name}.state {move['state']!r} is unknown") from None
