"""The first step of every strict parser: bytes → a JSON object or a YAML mapping, or an error naming why.

Each document's own parser (`parse_deploy`, `parse_report`, `parse_manifest`, the agent's
config) then checks its keys; this is only the part they would otherwise each write again.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from deployer.protocol.errors import DeployerError


def json_object(raw: str | bytes, *, what: str, limit: int, error: type[DeployerError]) -> dict[str, Any]:
    """`raw` as a JSON object; `error` (naming `what`) if it is too big, not JSON or not an object."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > limit:
        raise error(f"{what} is {size} bytes, over the {limit}-byte limit")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise error(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


def yaml_mapping(
    text: str | bytes, *, what: str, error: type[DeployerError], limit: int | None = None
) -> dict[Any, Any]:
    """`text` as a YAML mapping (safe loader only); `error` (naming `what`) otherwise."""
    if limit is not None and len(text) > limit:
        raise error(f"{what} is {len(text)} bytes, over the {limit}-byte limit")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{what} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise error(f"{what} must be a YAML mapping, got {type(doc).__name__}")
    return doc
