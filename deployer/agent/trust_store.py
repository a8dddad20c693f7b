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
from pathlib import Path

import structlog

from deployer.apply.fsutil import write_atomic
from deployer.protocol.envelope import parse_envelope
from deployer.protocol.errors import ConfigError, InvalidMessage, InvalidTrust
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
    ) -> None:
        """`fetch(version)` returns the stored envelope of a trust version, or None if there is none."""
        self.required = required
        self.cache = cache
        self.fetch = fetch
        self.current = self._cached_or(baked)

    def verifier(self) -> DeployVerifier:
        return DeployVerifier(self.current, self.required)

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

    def refresh(self) -> None:
        return None


NO_TRUST = _NoTrust()
