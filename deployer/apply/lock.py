"""One apply per machine: an exclusive flock shared by `deployer agent`, `boot` and `apply`.

flock is released by the kernel when the holder dies, so a kill -9 never leaves it stuck, and
a process that holds it knows any `in_progress` record it finds was left by a dead process.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path
from types import TracebackType

from deployer.backoff import pause
from deployer.protocol.errors import LockBusy

#: Where the apply lock (and the agent's ledger) live on an instance.
DEFAULT_STATE_DIR = Path("/var/lib/deployer")
#: How long an apply waits for another to finish before giving up (hooks may legitimately run long).
LOCK_TIMEOUT_SECONDS = 3600.0
#: How often the lock is tried while another process holds it.
LOCK_POLL_SECONDS = 0.1


class ApplyLock:
    """An exclusive, non-blocking-polled flock on `<state_dir>/apply.lock`.

    The wait honours `interrupt` (the agent's stop flag): a SIGTERM while another apply holds
    the lock ends the wait at once with `Interrupted`, so the agent hands its message back and
    exits instead of sleeping until systemd kills it.
    """

    def __init__(
        self,
        state_dir: Path,
        timeout_seconds: float = LOCK_TIMEOUT_SECONDS,
        interrupt: threading.Event | None = None,
    ) -> None:
        self.path = state_dir / "apply.lock"
        self.timeout_seconds = timeout_seconds
        self.interrupt = interrupt
        self._fd: int | None = None

    def __enter__(self) -> ApplyLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_seconds
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockBusy(
                            f"another apply holds {self.path} (waited {self.timeout_seconds:.0f}s)"
                        ) from None
                    pause(LOCK_POLL_SECONDS, self.interrupt, f"the apply lock {self.path}")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
