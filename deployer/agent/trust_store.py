"""The trust an agent holds, and how it moves forward.

The trust file baked into the image is the floor. Versions CI publishes later
(`<prefix>/trust/<version>.json`, each a signed envelope) are taken one at a time: version N+1
only if the threshold of version N's `trust` keys signed it, so a stolen deploy key cannot
rewrite trust, and a new image with a newer baked file replaces whatever an instance learnt
before. The newest accepted version is kept in the state directory, so a restart does not
fall back to the baked one. A refused update changes nothing and is logged with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog

from deployer.agent.vouched import VOUCHED_NAME, Vouched
from deployer.apply.fsutil import write_atomic
from deployer.protocol.envelope import parse_envelope
from deployer.protocol.errors import ConfigError, InvalidMessage, InvalidTrust, RejectedInput
from deployer.protocol.names import Channel
from deployer.protocol.trust import UNVERIFIED, DeployVerifier, Trust, parse_trust

log = structlog.get_logger(__name__)

#: The accepted trust document, under the agent's state directory.
TRUST_CACHE_NAME = "trust.json"


def load_trust_file(path: Path) -> Trust:
    """The baked trust document; ConfigError naming the file and the problem."""
    try:
        return parse_trust(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read trust file {path}: {exc.strerror}") from None
    except InvalidTrust as exc:
        raise ConfigError(f"trust file {path}: {exc}") from None


class TrustStore:
    """`current` trust (None without a trust file) and `verifier()` for deploy documents."""

    def __init__(
        self,
        baked: Trust | None,
        *,
        required: bool,
        cache: Path,
        fetch: Callable[[int], bytes | None],
        vouched: Vouched | None = None,
        fetch_timestamp: Callable[[Channel], bytes | None] = lambda _channel: None,
    ) -> None:
        """`fetch(version)` returns the stored envelope of a trust version, or None if there is
        none; `fetch_timestamp(channel)` the channel's stored timestamp envelope, likewise."""
        self.required = required
        self.cache = cache
        self.fetch = fetch
        self.current = self._cached_or(baked)
        self.vouched = vouched or Vouched(cache.with_name(VOUCHED_NAME))
        self.fetch_timestamp = fetch_timestamp

    def verifier(self) -> DeployVerifier:
        return DeployVerifier(self.current, self.required, self.vouched.floors())

    def staleness(self, channel: Channel, since: str | None = None) -> str | None:
        """Read and verify the channel's timestamp, keep it if newer, and say since when no valid
        timestamp vouches for the channel's pointer (None: one does, or the trust sets no
        freshness). A timestamp that cannot be read or is not signed as the trust requires is
        logged and changes nothing: the newest valid one held still decides."""
        trust = self.current
        if trust is None or trust.freshness is None:
            return None
        try:
            raw = self.fetch_timestamp(channel)
            if raw is not None and self.vouched.record(self.verifier().open_timestamp(raw, channel)):
                log.info("timestamp_accepted", channel=str(channel), next="pointers below its seq are refused")
        except RejectedInput as exc:
            log.error(
                "timestamp_rejected",
                channel=str(channel),
                error=str(exc),
                next="ignored; the newest valid timestamp held still decides",
            )
        stale = self.vouched.stale_since(channel, trust.freshness, datetime.now(UTC), since)
        if stale is not None and since is None:
            log.warning(
                "pointer_not_vouched",
                channel=str(channel),
                since=stale,
                next="reported stale: CI's timestamps stopped (run `deployer trust refresh`) or are withheld",
            )
        return stale

    def refresh(self) -> Trust | None:
        """Take every newer trust version the bucket holds, each signed by the one before it."""
        while self.current is not None:
            raw = self.fetch(self.current.version + 1)
            if raw is None:
                break
            try:
                newer = self.current.next_version(parse_envelope(raw))
            except (InvalidTrust, InvalidMessage) as exc:
                log.error(
                    "trust_update_refused",
                    version=self.current.version + 1,
                    error=str(exc),
                    next=f"keeping trust version {self.current.version}",
                )
                break
            write_atomic(self.cache, newer.to_json().encode())
            log.info("trust_updated", previous=self.current.version, version=newer.version, next="verifying with it")
            self.current = newer
        return self.current

    def _cached_or(self, baked: Trust | None) -> Trust | None:
        if baked is None or not self.cache.exists():
            return baked
        try:
            cached = parse_trust(self.cache.read_bytes())
        except (OSError, InvalidTrust) as exc:
            log.warning(
                "trust_cache_unreadable", path=str(self.cache), error=str(exc), next="starting from the baked trust"
            )
            return baked
        return cached if cached.version > baked.version else baked


class _NoTrust:
    """An agent without a trust file: envelopes are opened unverified, bare documents accepted."""

    def verifier(self) -> DeployVerifier:
        return UNVERIFIED

    def staleness(self, channel: Channel, since: str | None = None) -> str | None:  # noqa: ARG002
        return None  # nothing to vouch with

    def refresh(self) -> None:
        return None


NO_TRUST = _NoTrust()
