"""Which kept releases to delete: a pure decision over names and ages."""

from __future__ import annotations

from collections.abc import Sequence


def releases_to_prune(
    releases: Sequence[tuple[str, float]], *, active: str | None, previous: str | None, keep: int
) -> list[str]:
    """Names to delete so that at most `keep` releases remain, newest first by mtime.

    The active and previous releases are never pruned, whatever their age: they are what
    `current` points at and what an instant rollback needs.
    """
    protected = {name for name in (active, previous) if name}
    newest_first = sorted(releases, key=lambda item: item[1], reverse=True)
    kept = len(protected & {name for name, _ in releases})
    doomed: list[str] = []
    for name, _ in newest_first:
        if name in protected:
            continue
        if kept < keep:
            kept += 1
        else:
            doomed.append(name)
    return doomed
