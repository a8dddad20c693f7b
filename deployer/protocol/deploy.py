"""The deploy document: the channel pointer in S3 and the SNS message body are this one document.

Defined once here and imported by the agent and the publisher. Parsing is strict: a document
with an unknown version, a missing or extra key, or a value of the wrong shape is rejected
whole, with an error naming the key (docs/design.md, "The deploy document").
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from deployer.protocol.decoding import json_object, load_json
from deployer.protocol.errors import InvalidMessage
from deployer.protocol.limits import MAX_DEPLOY_MESSAGE_BYTES, MAX_INLINE_MANIFEST_BYTES, MAX_SQS_MESSAGE_BYTES
from deployer.protocol.names import NAME_PATTERN, Channel
from deployer.protocol.release import DEPLOY_ID_PATTERN, check_pattern, check_release
from deployer.protocol.rollout import STABLE_SUFFIX, Plan, plan_from_dict
from deployer.protocol.timestamps import parse_timestamp

#: The only protocol version this code reads and writes.
PROTOCOL_VERSION = 1

MAX_ORIGIN_ENTRIES = 16
MAX_ORIGIN_VALUE_LENGTH = 256

_REQUIRED = (
    "v",
    "deploy_id",
    "stage",
    "role",
    "component",
    "seq",
    "release_id",
    "manifest_key",
    "manifest_sha256",
    "published_at",
)
#: `artifact_sha256` / `artifact_size` are written by publishers that sign (agents older than
#: signing refuse unknown keys, so unsigned documents stay as they were): the signature then
#: covers the artifact itself, checked while it streams, whatever digest the manifest carries.
#: `manifest` (the manifest's exact text, when it is small) is written only by publishers told to
#: inline manifests, for the same reason: agents older than it refuse the key (README, "Upgrading").
_OPTIONAL = ("origin", "artifact_sha256", "artifact_size", "rollout", "manifest")


@dataclass(frozen=True)
class Deploy:
    """ "Channel C now wants release R at seq N", identified by deploy_id (the idempotency key)."""

    deploy_id: str
    stage: str
    role: str
    component: str
    seq: int
    release_id: str
    manifest_key: str
    manifest_sha256: str
    published_at: str
    origin: dict[str, str] = field(default_factory=dict)
    artifact_sha256: str | None = None
    artifact_size: int | None = None
    #: A staged rollout's plan: the stable release, the waves and their gates (None: everyone at once).
    rollout: Plan | None = None
    #: The manifest's exact text when the publisher inlined it (at most MAX_INLINE_MANIFEST_BYTES):
    #: the agent then skips the manifest GET. Its UTF-8 bytes hash to `manifest_sha256`, checked here.
    manifest: str | None = None

    @property
    def channel(self) -> Channel:
        return Channel(self.stage, self.role, self.component)

    def stable_variant(self) -> Deploy:
        """The stable side of a rollout deploy: same channel and seq, the stable release, its own id. Pure."""
        assert self.rollout is not None
        stable = self.rollout.stable
        return replace(
            self,
            deploy_id=self.deploy_id + STABLE_SUFFIX,
            release_id=stable.release_id,
            manifest_key=stable.manifest_key,
            manifest_sha256=stable.manifest_sha256,
            artifact_sha256=stable.artifact_sha256,
            artifact_size=stable.artifact_size,
            manifest=None,  # an inline manifest is the candidate's; the stable one is read from S3
        )

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "deploy_id": self.deploy_id,
            "stage": self.stage,
            "role": self.role,
            "component": self.component,
            "seq": self.seq,
            "release_id": self.release_id,
            "manifest_key": self.manifest_key,
            "manifest_sha256": self.manifest_sha256,
            "published_at": self.published_at,
        }
        if self.origin:
            doc["origin"] = dict(self.origin)
        if self.artifact_sha256 is not None:
            doc["artifact_sha256"] = self.artifact_sha256
            doc["artifact_size"] = self.artifact_size
        if self.rollout is not None:
            doc["rollout"] = self.rollout.to_dict()
        if self.manifest is not None:
            doc["manifest"] = self.manifest
        return doc

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so equal deploys hash equal."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def deployment_attributes(self) -> dict[str, str]:
        """OpenTelemetry's deployment attributes for this deploy's log lines and events, so the CI's
        lines and every instance's of one deploy join up in any backend. Pure.
        https://opentelemetry.io/docs/specs/semconv/attributes-registry/deployment/"""
        return {
            "deployment.id": self.deploy_id,
            "deployment.name": str(self.channel),
            "deployment.environment.name": self.stage,
        }

    def payload_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def new_deploy_id() -> str:
    return str(uuid.uuid4())


def parse_deploy(raw: str | bytes) -> Deploy:
    """Parse and validate a pointer or message body; raise InvalidMessage naming what is wrong."""
    doc = json_object(raw, what="deploy document", limit=MAX_DEPLOY_MESSAGE_BYTES, error=InvalidMessage)
    return deploy_from_dict(doc)


def deploy_from_dict(doc: dict[str, Any]) -> Deploy:
    version = doc.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise InvalidMessage(f"unsupported protocol version v={version!r} (this agent reads v={PROTOCOL_VERSION})")
    missing = [key for key in _REQUIRED if key not in doc]
    if missing:
        raise InvalidMessage(f"deploy document is missing key(s): {', '.join(missing)}")
    unknown = sorted(set(doc) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise InvalidMessage(f"deploy document has unknown key(s): {', '.join(unknown)}")

    for key in ("stage", "role", "component"):
        check_pattern(doc, key, NAME_PATTERN)
    check_pattern(doc, "deploy_id", DEPLOY_ID_PATTERN)
    if doc["deploy_id"].endswith(STABLE_SUFFIX):
        raise InvalidMessage(f"deploy_id may not end with {STABLE_SUFFIX!r} (reserved for a rollout's stable side)")
    check_release(doc)
    seq = doc["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise InvalidMessage(f"seq must be a positive integer, got {seq!r}")
    published_at = doc["published_at"]
    if not isinstance(published_at, str) or parse_timestamp(published_at) is None:
        raise InvalidMessage(f"published_at must be an ISO 8601 UTC timestamp, got {published_at!r}")
    origin = doc.get("origin", {})
    _check_origin(origin)
    if "manifest" in doc:
        _check_inline_manifest(doc["manifest"], doc["manifest_sha256"])

    return Deploy(
        deploy_id=doc["deploy_id"],
        stage=doc["stage"],
        role=doc["role"],
        component=doc["component"],
        seq=seq,
        release_id=doc["release_id"],
        manifest_key=doc["manifest_key"],
        manifest_sha256=doc["manifest_sha256"],
        published_at=published_at,
        origin=dict(origin),
        artifact_sha256=doc.get("artifact_sha256"),
        artifact_size=doc.get("artifact_size"),
        rollout=plan_from_dict(doc["rollout"]) if "rollout" in doc else None,
        manifest=doc.get("manifest"),
    )


def inlinable(manifest_body: bytes) -> str | None:
    """A manifest's text to carry in the deploy document, or None if it must stay in S3 only:
    over MAX_INLINE_MANIFEST_BYTES, or not UTF-8 (a JSON string could not give the bytes back). Pure."""
    if len(manifest_body) > MAX_INLINE_MANIFEST_BYTES:
        return None
    try:
        return manifest_body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def inline_manifest_bytes(text: str) -> bytes:
    """The bytes an inline manifest stands for: its UTF-8 encoding, which `manifest_sha256` pins."""
    return text.encode("utf-8")


def _check_inline_manifest(text: Any, manifest_sha256: str) -> None:
    """An inline manifest is the manifest `manifest_sha256` names, byte for byte, or the document is
    refused whole: a document that disagrees with itself was not written by a publisher."""
    if not isinstance(text, str):
        raise InvalidMessage(f"manifest must be the manifest's text (a string), got {type(text).__name__}")
    try:
        data = inline_manifest_bytes(text)
    except UnicodeEncodeError:
        raise InvalidMessage("manifest is not valid Unicode text (a lone surrogate)") from None
    if len(data) > MAX_INLINE_MANIFEST_BYTES:
        raise InvalidMessage(f"manifest is {len(data)} bytes inline, over the {MAX_INLINE_MANIFEST_BYTES}-byte limit")
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest_sha256:
        raise InvalidMessage(f"inline manifest sha256 {digest} does not match the deploy's {manifest_sha256}")


def _check_origin(origin: Any) -> None:
    if not isinstance(origin, dict) or len(origin) > MAX_ORIGIN_ENTRIES:
        raise InvalidMessage(f"origin must be an object of at most {MAX_ORIGIN_ENTRIES} string entries")
    for key, value in origin.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > MAX_ORIGIN_VALUE_LENGTH:
            raise InvalidMessage(
                f"origin entry {key!r} must be a string of at most {MAX_ORIGIN_VALUE_LENGTH} characters"
            )


def unwrap_body(body: str) -> str:
    """The deploy document from a message body, also when SNS delivered its JSON envelope.

    Raw delivery is set right after subscribing, so a message published in between (or while
    SNS propagates the attribute) can still arrive wrapped.
    """
    try:
        doc = load_json(body, what="message body", limit=MAX_SQS_MESSAGE_BYTES, error=InvalidMessage)
    except InvalidMessage:
        return body  # parse_deploy says what is wrong with it
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        return str(doc["Message"])
    return body
