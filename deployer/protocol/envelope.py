"""The signed envelope (DSSE): one shape for every document an instance acts on.

`{"payload": <base64>, "payloadType": <type>, "signatures": [{"keyid": <hex>, "sig": <base64>}]}`.
A signature is over DSSE's pre-authentication encoding (`pae`) of the payload's exact bytes
and its type: nothing is re-serialised before verifying (no JSON canonicalisation to get
wrong), and a signature made for one kind of document can never pass for another
(docs/design.md, "Signed documents"). https://github.com/secure-systems-lab/dsse/blob/master/protocol.md

Pure: shape and encoding only. Whose signatures count is the trust document's business
(`deployer.protocol.trust`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from deployer.protocol.decoding import json_object
from deployer.protocol.errors import InvalidMessage
from deployer.protocol.limits import MAX_DEPLOY_MESSAGE_BYTES

#: The payload types this code signs and verifies; each kind of document has its own.
DEPLOY_PAYLOAD_TYPE = "application/vnd.deployer.deploy+json"
TRUST_PAYLOAD_TYPE = "application/vnd.deployer.trust+json"
ROLLOUT_PAYLOAD_TYPE = "application/vnd.deployer.rollout+json"
TIMESTAMP_PAYLOAD_TYPE = "application/vnd.deployer.timestamp+json"
#: An envelope is small: a deploy document, or a trust document of a few keys, plus signatures.
MAX_ENVELOPE_BYTES = MAX_DEPLOY_MESSAGE_BYTES
#: More signatures than any sane threshold needs; a longer list is an attempt to make us work.
MAX_SIGNATURES = 16
KEYID_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_KEYS = frozenset({"payload", "payloadType", "signatures"})


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    payload_type: str
    signatures: tuple[Signature, ...] = ()

    def signed_bytes(self) -> bytes:
        return pae(self.payload_type, self.payload)

    def with_signature(self, signature: Signature) -> Envelope:
        kept = tuple(s for s in self.signatures if s.keyid != signature.keyid)
        return Envelope(self.payload, self.payload_type, (*kept, signature))

    def to_json(self) -> str:
        return json.dumps(
            {
                "payload": base64.b64encode(self.payload).decode(),
                "payloadType": self.payload_type,
                "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures],
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: `DSSEv1 <len(type)> <type> <len(body)> <body>`."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def is_envelope(doc: dict[str, Any]) -> bool:
    """Whether a parsed JSON object is an envelope: every envelope names its payload type, no
    deploy document has such a key."""
    return "payloadType" in doc


def parse_envelope(raw: str | bytes) -> Envelope:
    """Parse an envelope strictly; raise InvalidMessage naming what is wrong. Verifies nothing."""
    return envelope_from_dict(json_object(raw, what="signed envelope", limit=MAX_ENVELOPE_BYTES, error=InvalidMessage))


def envelope_from_dict(doc: dict[str, Any]) -> Envelope:
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise InvalidMessage(f"signed envelope has unknown key(s): {', '.join(unknown)}")
    payload_type = doc.get("payloadType")
    if not isinstance(payload_type, str) or not payload_type:
        raise InvalidMessage(f"signed envelope payloadType must be a non-empty string, got {payload_type!r}")
    signatures = doc.get("signatures")
    if not isinstance(signatures, list) or len(signatures) > MAX_SIGNATURES:
        raise InvalidMessage(f"signed envelope signatures must be a list of at most {MAX_SIGNATURES}")
    return Envelope(
        payload=_base64(doc.get("payload"), "payload"),
        payload_type=payload_type,
        signatures=tuple(_signature(i, s) for i, s in enumerate(signatures)),
    )


def _signature(index: int, value: Any) -> Signature:
    where = f"signatures[{index}]"
    if not isinstance(value, dict) or set(value) != {"keyid", "sig"}:
        raise InvalidMessage(f"signed envelope {where} must be an object with keyid and sig")
    keyid = value["keyid"]
    if not isinstance(keyid, str) or not KEYID_PATTERN.match(keyid):
        raise InvalidMessage(f"signed envelope {where}.keyid {keyid!r} is not a sha256 key id (64 hex characters)")
    return Signature(keyid, _base64(value["sig"], f"{where}.sig"))


def _base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidMessage(f"signed envelope {where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidMessage(f"signed envelope {where} is not valid base64") from None
