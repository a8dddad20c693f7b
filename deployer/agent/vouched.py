"""The newest valid timestamp this instance has seen per channel (deployer.protocol.freshness).

Kept in the state directory, so a restart does not forget what CI vouched for: a pointer older
than the highest seq any valid timestamp named is an older one put back, and is refused
(`DeployVerifier.vouched`), whatever the bucket says after a reboot. Whether a channel is stale
is decided from here: the newest timestamp, and the trust's `expires_s`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import structlog

from deployer.apply.fsutil import write_atomic
from deployer.protocol.errors import InvalidMessage
from deployer.protocol.freshness import Freshness, Timestamp, parse_timestamp_document
from deployer.protocol.names import Channel
from deployer.protocol.timestamps import TIMESTAMP_FORMAT

log = structlog.get_logger(__name__)

#: Under the agent's state directory.
VOUCHED_NAME = "timestamps.json"


class Vouched:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._newest: dict[Channel, Timestamp] = self._load()

    def newest(self, channel: Channel) -> Timestamp | None:
        return self._newest.get(channel)

    def floors(self) -> dict[Channel, int]:
        """Per channel, the seq below which a pointer is refused."""
        return {channel: stamp.seq for channel, stamp in self._newest.items()}

    def record(self, stamp: Timestamp) -> bool:
        """Keep `stamp` if it supersedes what is held (fsync'd before it counts); whether it did."""
        if not stamp.newer_than(self._newest.get(stamp.channel)):
            return False
        held = {**self._newest, stamp.channel: stamp}
        write_atomic(self.path, json.dumps({str(c): json.loads(s.to_json()) for c, s in held.items()}).encode())
        self._newest = held
        return True

    def stale_since(self, channel: Channel, freshness: Freshness, now: datetime, since: str | None) -> str | None:
        """None while the newest timestamp vouches; else since when it does not (its expiry, or
        `since`, or now, for a channel no valid timestamp ever vouched for). Pure but for state."""
        newest = self._newest.get(channel)
        if newest is not None and not newest.expired(freshness, now):
            return None
        if newest is not None:
            return newest.expires_at(freshness).strftime(TIMESTAMP_FORMAT)
        return since or now.strftime(TIMESTAMP_FORMAT)

    def _load(self) -> dict[Channel, Timestamp]:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_bytes())
            return {
                Channel.parse(name): parse_timestamp_document(json.dumps(raw), Channel.parse(name))
                for name, raw in doc.items()
            }
        except (OSError, ValueError, AttributeError, InvalidMessage) as exc:
            # Losing this memory only loses replay protection until the next timestamp is read.
            log.warning("vouched_unreadable", path=str(self.path), error=str(exc), next="starting from no timestamp")
            return {}
