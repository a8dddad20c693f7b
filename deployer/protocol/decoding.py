"""The first step of every strict parser: bytes → a JSON object or a YAML mapping, or an error naming why.

Each document's own parser (`parse_deploy`, `parse_report`, `parse_manifest`, the agent's
config) then checks its keys; this is only the part they would otherwise each write again.

Every document here can be shaped by someone the reader does not trust (an instance writes its
own report; anyone who can reach a queue can send a message), so decoding is bounded before it
starts: the size first, then the nesting depth (measured by a regex scan, not by the recursive
parser that a deep document would crash with `RecursionError`), then the number of keys.
Duplicate keys, `NaN`/`Infinity` and YAML aliases are refused, so a document means one thing
to every reader. Every failure is the caller's own error type.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from deployer.protocol.errors import DeployerError

#: Deeper than any document of ours (a signed rollout plan nests 5 levels); far below the
#: interpreter's recursion limit, which a hostile `[[[[…` would otherwise reach.
MAX_DEPTH = 32
#: Object keys in one document, all levels counted (a report of 100 components has ~1,000).
MAX_KEYS = 10_000
#: JSON strings (skipped whole, escapes included) and the brackets that nest.
_NESTING_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep(text: str) -> bool:
    depth = 0
    for token in _NESTING_TOKENS.finditer(text):
        first = token.group()[0]
        if first in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif first in "]}":
            depth -= 1
    return False


class _Refused(ValueError):
    """Raised inside the JSON decoder's hooks; reported as the caller's error."""


class _Bounds:
    """The JSON decoder's hooks: every object's keys counted and checked for duplicates, no NaN."""

    def __init__(self) -> None:
        self.keys = 0

    def pairs(self, items: list[tuple[str, Any]]) -> dict[str, Any]:
        self.keys += len(items)
        if self.keys > MAX_KEYS:
            raise _Refused(f"has over {MAX_KEYS} keys")
        found: dict[str, Any] = {}
        for key, value in items:
            if key in found:
                raise _Refused(f"has the key {key[:80]!r} twice")
            found[key] = value
        return found

    @staticmethod
    def constant(name: str) -> Any:
        raise _Refused(f"has {name}, which is not JSON")


def _text(raw: str | bytes, what: str, limit: int, error: type[DeployerError]) -> str:
    size = len(raw.encode(errors="surrogatepass") if isinstance(raw, str) else raw)
    if size > limit:
        raise error(f"{what} is {size} bytes, over the {limit}-byte limit")
    try:
        return raw if isinstance(raw, str) else raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8: {exc}") from None


def load_json(raw: str | bytes, *, what: str, limit: int, error: type[DeployerError]) -> Any:
    """`raw` as a JSON value, bounded; `error` (naming `what`) for anything else."""
    text = _text(raw, what, limit, error)
    if _too_deep(text):
        raise error(f"{what} nests deeper than {MAX_DEPTH} levels")
    bounds = _Bounds()
    try:
        return json.loads(text, object_pairs_hook=bounds.pairs, parse_constant=bounds.constant)
    except _Refused as exc:
        raise error(f"{what} {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not JSON: {str(exc)[:200]}") from None


def json_object(raw: str | bytes, *, what: str, limit: int, error: type[DeployerError]) -> dict[str, Any]:
    """`raw` as a JSON object; `error` (naming `what`) if it is too big, not JSON or not an object."""
    doc = load_json(raw, what=what, limit=limit, error=error)
    if not isinstance(doc, dict):
        raise error(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: `&a [*a, *a]` chains expand
    exponentially in whatever walks the result, and no manifest or config needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.YAMLError(f"aliases (*{event.anchor}) are not accepted {event.start_mark}")
        return super().compose_node(parent, index)


def yaml_mapping(
    text: str | bytes, *, what: str, error: type[DeployerError], limit: int | None = None
) -> dict[Any, Any]:
    """`text` as a YAML mapping (safe loader, no aliases, bounded depth); `error` (naming `what`) otherwise."""
    if limit is not None and len(text) > limit:
        raise error(f"{what} is {len(text)} bytes, over the {limit}-byte limit")
    try:
        doc = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError, OverflowError) as exc:  # a constructor's own: int('1' * 5000)
        raise error(f"{what} is not valid YAML: {str(exc)[:300]}") from None
    except RecursionError:
        raise error(f"{what} nests too deep") from None
    if not isinstance(doc, dict):
        raise error(f"{what} must be a YAML mapping, got {type(doc).__name__}")
    return doc
