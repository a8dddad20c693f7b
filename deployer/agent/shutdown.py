"""SIGTERM in two steps, so a clean stop never decides anything about a release.

1. `stop` is set at once: no more receives, backoff sleeps and lock waits end, messages not
   yet started are handed back (visibility 0).
2. If an apply is running (`applying`), it gets `grace_seconds` to finish. When the grace runs
   out, `abandon` is set and its hooks are killed: hooks, health-check waits and download
   retries end with `Interrupted`, the apply hands its message back and leaves exactly what a
   kill -9 would (every on-disk step is crash-safe), which the restarted agent resumes. If it
   cannot unwind in ABANDON_BACKSTOP_SECONDS (a read stalled in the kernel), the process exits 0.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import structlog

from deployer.apply.hooks import kill_running_hooks

log = structlog.get_logger(__name__)

#: After the grace ran out and the apply was told to stop, how long it may take to unwind
#: before the process exits as a kill -9 would.
ABANDON_BACKSTOP_SECONDS = 10.0


@dataclass
class Shutdown:
    grace_seconds: float
    stop: threading.Event = field(default_factory=threading.Event)
    abandon: threading.Event = field(default_factory=threading.Event)
    #: Set by the runner while an apply holds the lock.
    applying: threading.Event = field(default_factory=threading.Event)

    def request(self, grace_seconds: float | None = None) -> None:
        """SIGTERM/SIGINT: stop taking work; start the grace period if an apply is running.
        `grace_seconds`: a grace other than the configured one (the terminate hook's)."""
        if not self.stop.is_set() and self.applying.is_set():
            grace = self.grace_seconds if grace_seconds is None else grace_seconds
            timer = threading.Timer(grace, self._abandon, args=(grace,))
            timer.daemon = True
            timer.start()
        self.stop.set()

    def _abandon(self, grace: float) -> None:
        self.abandon.set()
        killed = kill_running_hooks()
        log.warning(
            "apply_abandoned",
            grace_s=grace,
            hooks_killed=killed,
            next="the apply stops and hands its message back; the restarted agent resumes it",
        )
        backstop = threading.Timer(ABANDON_BACKSTOP_SECONDS, _exit_now)
        backstop.daemon = True
        backstop.start()


def _exit_now() -> None:
    log.warning("apply_did_not_unwind", backstop_s=ABANDON_BACKSTOP_SECONDS, next="exit 0 as a kill -9 would")
    os._exit(0)
