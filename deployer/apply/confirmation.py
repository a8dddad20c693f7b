"""A latch that says once whether an apply may take effect.

The agent downloads an artifact while it confirms the deploy against history; nothing of the
release may take effect (the rename into `releases/`, a hook, a record, a status) before the
confirmation came back. Whoever gets there first runs the check; everyone after gets the same
answer: a refusal is raised again on every later call, so no path slips past it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Confirmation:
    """`require()` runs `check` the first time and remembers how it ended; thread-safe."""

    def __init__(self, check: Callable[[], object] = lambda: None) -> None:
        self._check: Callable[[], object] | None = check
        self._refused: BaseException | None = None
        self._lock = threading.Lock()

    def require(self) -> None:
        """Return once confirmed; raise the check's error (now and on every later call) if refused."""
        with self._lock:
            if self._refused is not None:
                raise self._refused
            check, self._check = self._check, None
            if check is None:
                return
            try:
                check()
            except BaseException as exc:
                self._refused = exc
                raise

    @property
    def settled(self) -> bool:
        """Whether the check ran (either way)."""
        with self._lock:
            return self._check is None


def confirmed() -> Confirmation:
    """For applies nothing needs to confirm (`deployer apply`, tests): always confirmed."""
    return Confirmation()
