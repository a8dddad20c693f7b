"""The fields that name a release, and their checks: one place both parsers import.

A deploy document names its release (`release_id`, `manifest_key`, `manifest_sha256`, and the
artifact's digest and size); a staged rollout's plan names its stable release with the same
fields. `deployer.protocol.deploy` and `deployer.protocol.rollout` both check them here, so the
rules cannot drift apart and neither parser needs the other.
"""

from __future__ import annotations

import re
from typing import Any

from deployer.protocol.errors import InvalidMessage

#: release ids become directory names: no leading dot, no slash.
RELEASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEPLOY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
#: S3's own limit on a key, in bytes of UTF-8; our keys are far shorter.
MAX_S3_KEY_LENGTH = 1024


def check_pattern(doc: dict[str, Any], key: str, pattern: re.Pattern[str]) -> None:
    value = doc[key]
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidMessage(f"{key} {value!r} does not match {pattern.pattern}")


def check_manifest_key(value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_S3_KEY_LENGTH:
        raise InvalidMessage(f"manifest_key must be a non-empty S3 key, got {value!r}")


def check_artifact(doc: dict[str, Any]) -> None:
    """`artifact_sha256` and `artifact_size`: both or neither, a digest and a byte count."""
    artifact_sha256, artifact_size = doc.get("artifact_sha256"), doc.get("artifact_size")
    if (artifact_sha256 is None) != (artifact_size is None):
        raise InvalidMessage("artifact_sha256 and artifact_size come together or not at all")
    if artifact_sha256 is not None:
        check_pattern(doc, "artifact_sha256", SHA256_PATTERN)
        if not isinstance(artifact_size, int) or isinstance(artifact_size, bool) or artifact_size < 0:
            raise InvalidMessage(f"artifact_size must be a byte count, got {artifact_size!r}")


def check_release(doc: dict[str, Any]) -> None:
    """The fields naming a release, wherever they appear (a deploy, a rollout's stable release)."""
    check_pattern(doc, "release_id", RELEASE_ID_PATTERN)
    check_pattern(doc, "manifest_sha256", SHA256_PATTERN)
    check_manifest_key(doc["manifest_key"])
    check_artifact(doc)
