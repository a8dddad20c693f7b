"""Freshness: a signed timestamp per channel, so a fleet cannot be frozen on an old pointer unseen.

Signatures prove who wrote a pointer, not that it is the newest: whoever can withhold writes (or
a broken CI) can keep agents on an old, validly signed pointer forever, and whoever can write
the bucket can put an older signed pointer back. TUF's timestamp role is the model: CI re-signs
a small document per channel, `channels/<stage>/<role>/<component>/timestamp.json`, saying
which seq and deploy is current and when it said so. The trust document's `freshness` says how
long a timestamp vouches (`expires_s`) and how often CI refreshes it (`refresh_s`). An agent

- reports its channel **stale** once the newest valid timestamp it could read is older than
  `expires_s` (nobody vouched for its pointer lately: CI broken, writes withheld), and
- refuses any pointer older than the newest timestamp it has seen (kept across restarts), so a
  replayed older pointer is not applied even while timestamps are fresh.

The timestamp is signed by the trust's `deploy` keys with its own payload type, so no other
signed document can stand in for it. (docs/design.md, "Freshness")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from deployer.protocol.decoding import json_object
from deployer.protocol.errors import InvalidMessage
from deployer.protocol.names import Channel
from deployer.protocol.release import DEPLOY_ID_PATTERN
from deployer.protocol.timestamps import TIMESTAMP_FORMAT, parse_timestamp

TIMESTAMP_DOCUMENT_VERSION = 1
#: A timestamp document is ~200 bytes; anything near this is not one.
MAX_TIMESTAMP_BYTES = 4096
_KEYS = frozenset({"v", "channel", "seq", "deploy_id", "signed_at"})
_FRESHNESS_KEYS = frozenset({"expires_s", "refresh_s"})
#: Bounds on the trust's freshness: shorter than a minute is clock skew; longer than a year is no bound.
MIN_EXPIRES_S, MAX_EXPIRES_S = 60, 366 * 86400


@dataclass(frozen=True)
class Freshness:
    """The trust's rule: a timestamp vouches for `expires_s`; CI re-signs every `refresh_s` (< expires_s)."""

    expires_s: int
    refresh_s: int

    def to_dict(self) -> dict[str, int]:
        return {"expires_s": self.expires_s, "refresh_s": self.refresh_s}


def freshness_from_dict(value: Any) -> Freshness:
    """The trust document's `freshness` key; ValueError naming what is wrong (the trust parser reports it)."""
    if not isinstance(value, dict) or set(value) != _FRESHNESS_KEYS:
        raise ValueError("freshness must be an object with expires_s and refresh_s")
    expires, refresh = value["expires_s"], value["refresh_s"]
    for name, number in (("expires_s", expires), ("refresh_s", refresh)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise ValueError(f"freshness.{name} must be a positive number of seconds")
    if not MIN_EXPIRES_S <= expires <= MAX_EXPIRES_S:
        raise ValueError(f"freshness.expires_s must be between {MIN_EXPIRES_S} and {MAX_EXPIRES_S} seconds")
    if refresh >= expires:
        raise ValueError("freshness.refresh_s must be shorter than expires_s, or timestamps expire between refreshes")
    return Freshness(expires, refresh)


@dataclass(frozen=True)
class Timestamp:
    """CI's word that `seq` (deploy `deploy_id`) was `channel`'s current deploy at `signed_at`."""

    channel: Channel
    seq: int
    deploy_id: str
    signed_at: datetime

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": TIMESTAMP_DOCUMENT_VERSION,
                "channel": str(self.channel),
                "seq": self.seq,
                "deploy_id": self.deploy_id,
                "signed_at": self.signed_at.strftime(TIMESTAMP_FORMAT),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def expires_at(self, freshness: Freshness) -> datetime:
        return self.signed_at + timedelta(seconds=freshness.expires_s)

    def expired(self, freshness: Freshness, now: datetime) -> bool:
        """Whether this timestamp no longer vouches for anything. Pure."""
        return now >= self.expires_at(freshness)

    def newer_than(self, other: Timestamp | None) -> bool:
        """Whether this one supersedes `other` (a higher seq, or the same seq re-signed later). Pure."""
        return other is None or (self.seq, self.signed_at) > (other.seq, other.signed_at)


def parse_timestamp_document(raw: str | bytes, channel: Channel) -> Timestamp:
    """Parse a timestamp strictly; it must be `channel`'s (one copied from another channel is refused)."""
    doc = json_object(raw, what="timestamp", limit=MAX_TIMESTAMP_BYTES, error=InvalidMessage)
    if doc.get("v") != TIMESTAMP_DOCUMENT_VERSION or set(doc) != _KEYS:
        raise InvalidMessage(f"timestamp must be v{TIMESTAMP_DOCUMENT_VERSION} with exactly {sorted(_KEYS)}")
    if doc["channel"] != str(channel):
        raise InvalidMessage(f"timestamp is for {doc['channel']!r}, not {channel}")
    seq, deploy_id, signed_at = doc["seq"], doc["deploy_id"], parse_timestamp(doc["signed_at"])
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise InvalidMessage(f"timestamp seq must be a positive integer, got {seq!r}")
    if not isinstance(deploy_id, str) or not DEPLOY_ID_PATTERN.match(deploy_id):
        raise InvalidMessage("timestamp deploy_id is malformed")
    if signed_at is None:
        raise InvalidMessage("timestamp signed_at must be an ISO 8601 UTC timestamp")
    return Timestamp(channel, seq, deploy_id, signed_at)
