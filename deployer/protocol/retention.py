"""Release retention: how long a release condemned by `deployer gc releases` waits, and when a
publisher may still take it back. Shared by the publisher and gc (publisher/retention.py has the
argument; docs/design.md, "Release retention")."""

from __future__ import annotations

from dataclasses import dataclass

#: A condemned release is deleted by a run that finds its mark at least this old (and the
#: release still unreferenced): twice `REPRIEVE_WITHIN_SECONDS`, so a reprieve is never late.
SWEEP_AFTER_SECONDS = 3600.0
#: A publisher may take a condemned release back only while the mark is younger than this.
REPRIEVE_WITHIN_SECONDS = 1800.0
#: History entries per channel that keep their releases (rollback targets).
DEFAULT_KEEP = 10
#: Releases younger than this are never condemned, referenced or not.
DEFAULT_OLDER_THAN_DAYS = 14.0
#: The floor for `--older-than`: a release uploaded today may not be in its history yet.
MIN_OLDER_THAN_DAYS = 1.0


@dataclass(frozen=True)
class Grace:
    """The two delays of the protocol. Production uses the defaults; a test may scale both down
    together (the argument depends on their ratio and on how long a publish takes)."""

    sweep_after_s: float = SWEEP_AFTER_SECONDS
    reprieve_within_s: float = REPRIEVE_WITHIN_SECONDS

    def __post_init__(self) -> None:
        if not 0 < 2 * self.reprieve_within_s <= self.sweep_after_s:
            raise ValueError(f"{self}: a reprieve must end at most halfway to the sweep")


#: The production protocol.
DEFAULT_GRACE = Grace()
