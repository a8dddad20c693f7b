"""The trust document: which public keys an instance believes, for what, and how many must agree.

```json
{"v": 1, "version": 3,
 "keys": {"<keyid>": {"scheme": "ed25519", "public_key": "<base64 DER SubjectPublicKeyInfo>"}},
 "roles": {"deploy": {"keyids": ["<keyid>"], "threshold": 1},
           "trust": {"keyids": ["<keyid>"], "threshold": 1}},
 "floors": {"prod/web/api": 12},
 "freshness": {"expires_s": 86400, "refresh_s": 21600}}
```

A key id is the sha256 of the key's DER encoding, checked here, so an id can never name another
key. The `deploy` role signs deploy documents; the `trust` role signs the next trust version
(rotation without re-baking: the instance accepts version N+1 only when the threshold of N's
`trust` keys signed it). `floors` are per-channel minimum seqs: a signed document below its
channel's floor is an old one replayed and is refused. The copy baked into the AMI is the
floor of trust itself: a newer version may replace it, an older one never. `freshness`, when
present, makes each channel's signed timestamp matter (`deployer.protocol.freshness`).

Verification is offline, with `cryptography` only (loaded on first use: an agent without a
trust file never pays for it): no KMS call, no IAM permission, no network.

`DeployVerifier.open` is the one way an instance reads a deploy document (queue message, pointer,
history): an envelope is verified, a bare document is accepted only while signatures are not
required (docs/design.md, "Signed documents").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deployer.protocol.decoding import json_object
from deployer.protocol.deploy import Deploy, parse_deploy
from deployer.protocol.envelope import (
    DEPLOY_PAYLOAD_TYPE,
    KEYID_PATTERN,
    ROLLOUT_PAYLOAD_TYPE,
    TIMESTAMP_PAYLOAD_TYPE,
    TRUST_PAYLOAD_TYPE,
    Envelope,
    envelope_from_dict,
    is_envelope,
)
from deployer.protocol.errors import InvalidMessage, InvalidTrust, Unauthentic
from deployer.protocol.freshness import Freshness, Timestamp, freshness_from_dict, parse_timestamp_document
from deployer.protocol.limits import MAX_DEPLOY_MESSAGE_BYTES
from deployer.protocol.names import Channel
from deployer.protocol.rollout import Cursor, parse_cursor

TRUST_DOCUMENT_VERSION = 1
#: The signature schemes a key may use: Ed25519 (file keys) and ECDSA P-256 with SHA-256 (KMS
#: `ECC_NIST_P256` / `ECDSA_SHA_256`).
ED25519 = "ed25519"
ECDSA_P256_SHA256 = "ecdsa-p256-sha256"
SCHEMES = (ED25519, ECDSA_P256_SHA256)
DEPLOY_ROLE = "deploy"
TRUST_ROLE = "trust"
ROLES = (DEPLOY_ROLE, TRUST_ROLE)
MAX_TRUST_BYTES = 64 * 1024
_TOP_KEYS = frozenset({"v", "version", "keys", "roles", "floors", "freshness"})


def keyid_of(der: bytes) -> str:
    """A key's id: the sha256 of its DER SubjectPublicKeyInfo, in hex."""
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    keyid: str
    scheme: str
    der: bytes
    _loaded: list[Any] = field(default_factory=list, compare=False, repr=False)

    def verifies(self, signature: bytes, data: bytes) -> bool:
        """Whether `signature` is this key's over `data`. Never raises for a bad signature."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        key = self._key()
        try:
            if self.scheme == ED25519:
                key.verify(signature, data)
            else:
                key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    def _key(self) -> Any:
        if not self._loaded:
            self._loaded.append(load_public_key(self.der, self.scheme))
        return self._loaded[0]


def load_public_key(der: bytes, scheme: str) -> Any:
    """`der` as a `cryptography` public key of `scheme`; InvalidTrust if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        key = serialization.load_der_public_key(der)
    except ValueError as exc:
        raise InvalidTrust(f"public key is not a DER SubjectPublicKeyInfo: {exc}") from None
    if scheme == ED25519 and isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if scheme == ECDSA_P256_SHA256 and isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return key
    raise InvalidTrust(f"public key is not a {scheme} key")


@dataclass(frozen=True)
class Role:
    keyids: frozenset[str]
    threshold: int


@dataclass(frozen=True)
class Trust:
    version: int
    keys: Mapping[str, PublicKey]
    roles: Mapping[str, Role]
    floors: Mapping[Channel, int] = field(default_factory=dict)
    #: How long a channel's signed timestamp vouches for its pointer; None: timestamps are not used.
    freshness: Freshness | None = None

    def floor(self, channel: Channel) -> int:
        return self.floors.get(channel, 0)

    def verified_payload(self, envelope: Envelope, role: str, payload_type: str) -> bytes:
        """The envelope's payload, once the threshold of `role`'s keys signed it as `payload_type`.

        Raises Unauthentic naming what was missing: the wrong type, unknown keys, too few good
        signatures. Each key counts once, whatever it signed twice.
        """
        if envelope.payload_type != payload_type:
            raise Unauthentic(f"payload type {envelope.payload_type!r} is not {payload_type!r}")
        wanted = self.roles[role]
        data = envelope.signed_bytes()
        good = {
            s.keyid
            for s in envelope.signatures
            if s.keyid in wanted.keyids and self.keys[s.keyid].verifies(s.sig, data)
        }
        if len(good) < wanted.threshold:
            strangers = sorted({s.keyid[:12] for s in envelope.signatures} - {k[:12] for k in wanted.keyids})
            detail = f"; signed by key(s) not trusted to sign this: {', '.join(strangers)}" if strangers else ""
            raise Unauthentic(
                f"{len(good)} valid signature(s) by the {role} key(s) of trust version {self.version}, "
                f"{wanted.threshold} required{detail}"
            )
        return envelope.payload

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": TRUST_DOCUMENT_VERSION,
            "version": self.version,
            "keys": {
                k.keyid: {"scheme": k.scheme, "public_key": base64.b64encode(k.der).decode()}
                for k in sorted(self.keys.values(), key=lambda k: k.keyid)
            },
            "roles": {
                name: {"keyids": sorted(role.keyids), "threshold": role.threshold} for name, role in self.roles.items()
            },
            "floors": {str(channel): seq for channel, seq in sorted(self.floors.items(), key=lambda i: str(i[0]))},
            # Written only when set: agents before freshness know no such key.
            **({"freshness": self.freshness.to_dict()} if self.freshness else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    def next_version(self, envelope: Envelope) -> Trust:
        """The trust version this one's `trust` keys signed, if it is exactly the next; else InvalidTrust."""
        try:
            payload = self.verified_payload(envelope, TRUST_ROLE, TRUST_PAYLOAD_TYPE)
        except Unauthentic as exc:
            raise InvalidTrust(f"trust update refused: {exc}") from None
        update = parse_trust(payload)
        if update.version != self.version + 1:
            raise InvalidTrust(f"trust update is version {update.version}, expected {self.version + 1}")
        return update


def parse_trust(raw: str | bytes) -> Trust:
    """Parse a trust document strictly; raise InvalidTrust naming what is wrong."""
    doc = json_object(raw, what="trust document", limit=MAX_TRUST_BYTES, error=InvalidTrust)
    if doc.get("v") != TRUST_DOCUMENT_VERSION or isinstance(doc.get("v"), bool):
        raise InvalidTrust(f"unsupported trust document v={doc.get('v')!r} (this reads v={TRUST_DOCUMENT_VERSION})")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise InvalidTrust(f"trust document has unknown key(s): {', '.join(unknown)}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidTrust(f"version must be a positive integer, got {version!r}")
    keys = _keys(doc.get("keys"))
    roles = {name: _role(name, doc.get("roles"), keys) for name in ROLES}
    freshness = None
    if "freshness" in doc:
        try:
            freshness = freshness_from_dict(doc["freshness"])
        except ValueError as exc:
            raise InvalidTrust(str(exc)) from None
    return Trust(version=version, keys=keys, roles=roles, floors=_floors(doc.get("floors", {})), freshness=freshness)


def _keys(value: Any) -> dict[str, PublicKey]:
    if not isinstance(value, dict) or not value:
        raise InvalidTrust("keys must be a non-empty object of key id → {scheme, public_key}")
    keys = {}
    for keyid, entry in value.items():
        where = f"keys.{str(keyid)[:12]}"
        if not isinstance(keyid, str) or not KEYID_PATTERN.match(keyid):
            raise InvalidTrust(f"{where}: key id {keyid!r} is not 64 hex characters")
        if not isinstance(entry, dict) or set(entry) != {"scheme", "public_key"}:
            raise InvalidTrust(f"{where} must be an object with scheme and public_key")
        if entry["scheme"] not in SCHEMES:
            raise InvalidTrust(f"{where}.scheme {entry['scheme']!r} is not one of {', '.join(SCHEMES)}")
        try:
            der = base64.b64decode(str(entry["public_key"]), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidTrust(f"{where}.public_key is not base64") from None
        if keyid_of(der) != keyid:
            raise InvalidTrust(f"{where}: the key id is not the sha256 of its public key ({keyid_of(der)})")
        load_public_key(der, entry["scheme"])
        keys[keyid] = PublicKey(keyid, entry["scheme"], der)
    return keys


def _role(name: str, roles: Any, keys: Mapping[str, PublicKey]) -> Role:
    if not isinstance(roles, dict) or not isinstance(roles.get(name), dict):
        raise InvalidTrust(f"roles.{name} is missing: name the keys that may sign {name} documents")
    entry = roles[name]
    keyids, threshold = entry.get("keyids"), entry.get("threshold", 1)
    if set(entry) - {"keyids", "threshold"}:
        raise InvalidTrust(
            f"roles.{name} has unknown key(s): {', '.join(sorted(set(entry) - {'keyids', 'threshold'}))}"
        )
    if not isinstance(keyids, list) or not keyids or any(k not in keys for k in keyids):
        raise InvalidTrust(f"roles.{name}.keyids must list key ids defined under keys")
    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= len(set(keyids)):
        raise InvalidTrust(f"roles.{name}.threshold must be between 1 and the number of its keys, got {threshold!r}")
    return Role(frozenset(keyids), threshold)


def _floors(value: Any) -> dict[Channel, int]:
    if not isinstance(value, dict):
        raise InvalidTrust("floors must be an object of stage/role/component → minimum seq")
    floors = {}
    for name, seq in value.items():
        try:
            channel = Channel.parse(str(name))
        except ValueError as exc:
            raise InvalidTrust(f"floors: {exc}") from None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise InvalidTrust(f"floors.{name} must be a positive integer, got {seq!r}")
        floors[channel] = seq
    return floors


@dataclass(frozen=True)
class DeployVerifier:
    """How an instance opens a deploy document: with a trust (or none), signatures required or not."""

    trust: Trust | None = None
    required: bool = False
    #: Per channel, the highest seq a valid timestamp vouched for (the agent's memory of them):
    #: a pointer below it is an older one put back, and is refused like one below a floor.
    vouched: Mapping[Channel, int] = field(default_factory=dict)

    def open(self, raw: str | bytes) -> Deploy:
        """The deploy in `raw` (an envelope or, unless required, a bare document), checked in order:
        shape and size → payload type → signatures → payload → the channel's floor.

        Raises InvalidMessage for a malformed document and Unauthentic for one that is not
        signed as the trust requires; both are rejected, never applied.
        """
        payload, verified = self._open(raw, "deploy document", DEPLOY_PAYLOAD_TYPE)
        deploy = parse_deploy(payload)
        if verified and self.trust is not None:
            floor = self.trust.floor(deploy.channel)
            if deploy.seq < floor:
                raise Unauthentic(f"seq {deploy.seq} is below the floor {floor} the trust sets for {deploy.channel}")
            vouched = self.vouched.get(deploy.channel, 0)
            if deploy.seq < vouched:
                raise Unauthentic(
                    f"seq {deploy.seq} is older than seq {vouched}, which a signed timestamp vouched for "
                    f"{deploy.channel}: an older pointer put back"
                )
        return deploy

    def open_timestamp(self, raw: str | bytes, channel: Channel) -> Timestamp:
        """A channel's timestamp, signed by the deploy keys with its own payload type."""
        payload, _ = self._open(raw, "timestamp", TIMESTAMP_PAYLOAD_TYPE)
        return parse_timestamp_document(payload, channel)

    def open_cursor(self, raw: str | bytes, deploy_id: str) -> Cursor:
        """A rollout's cursor, held to the same rule as deploys: signed by the deploy keys (its own
        payload type) where the trust says so. Only CI can advance a rollout."""
        payload, _ = self._open(raw, "rollout cursor", ROLLOUT_PAYLOAD_TYPE)
        return parse_cursor(payload, deploy_id)

    def _open(self, raw: str | bytes, what: str, payload_type: str) -> tuple[str | bytes, bool]:
        """The document inside `raw` and whether its signatures were verified: a bare document
        (refused when signatures are required), an envelope's payload as it is (no trust to
        verify against), or the payload the trust's deploy keys signed with `payload_type`."""
        doc = json_object(raw, what=what, limit=MAX_DEPLOY_MESSAGE_BYTES, error=InvalidMessage)
        if not is_envelope(doc):
            if self.required:
                raise Unauthentic(f"unsigned {what}, and this instance requires signatures")
            return raw, False
        envelope = envelope_from_dict(doc)
        if self.trust is None:
            if self.required:
                raise Unauthentic("signatures are required but no trust file is configured")
            return envelope.payload, False  # nothing to verify against: as trusted as a bare document
        return self.trust.verified_payload(envelope, DEPLOY_ROLE, payload_type), True


#: What the publisher and the CLI use to read documents they wrote themselves: envelopes are
#: opened without verifying (the agents verify), bare documents accepted.
UNVERIFIED = DeployVerifier()
