"""The protocol's one timestamp format: ISO 8601 UTC to the second, written and read here only."""

from __future__ import annotations

from datetime import UTC, datetime

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(value: object) -> datetime | None:
    """An aware datetime, or None if `value` is not an ISO 8601 timestamp with a zone. Pure."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def age_seconds(then: datetime, now: datetime | None = None) -> float:
    return ((now or datetime.now(UTC)) - then).total_seconds()
