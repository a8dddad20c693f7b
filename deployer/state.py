"""What this instance has applied, per channel, kept on local disk; and the one-apply-at-a-time lock."""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from deployer.errors import DeployerError, LockBusy
from deployer.fsutil import write_atomic
from deployer.protocol import Channel, Deploy, utc_now_iso

STATE_VERSION = 1


@dataclass(frozen=True)
class AppliedRecord:
    """The last deploy this instance completed on one channel."""

    seq: int
    deploy_id: str
    release_id: str
    applied_at: str

    @classmethod
    def of(cls, deploy: Deploy) -> AppliedRecord:
        return cls(seq=deploy.seq, deploy_id=deploy.deploy_id, release_id=deploy.release_id, applied_at=utc_now_iso())


class StateStore:
    """`state.json` under state_dir, rewritten whole by temp file + fsync + rename on every change."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"

    def load(self) -> dict[Channel, AppliedRecord]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Never guess: a corrupt state file would make us re-run or skip deploys.
            raise DeployerError(f"state file {self.path} is unreadable ({exc}); move it aside to start over") from None
        if doc.get("v") != STATE_VERSION:
            raise DeployerError(f"state file {self.path} has unsupported version {doc.get('v')!r}")
        applied: dict[Channel, AppliedRecord] = {}
        for key, record in doc.get("channels", {}).items():
            stage, role, component = key.split("/")
            applied[Channel(stage, role, component)] = AppliedRecord(**record)
        return applied

    def record(self, channel: Channel, record: AppliedRecord) -> None:
        applied = self.load()
        applied[channel] = record
        doc = {"v": STATE_VERSION, "channels": {str(ch): asdict(rec) for ch, rec in sorted(applied.items())}}
        write_atomic(self.path, json.dumps(doc, indent=2, sort_keys=True).encode())


class ApplyLock:
    """An exclusive flock shared by `agent`, `boot` and `apply`: one apply per machine at a time.

    flock is released by the kernel when the holder dies, so a kill -9 never leaves it stuck.
    """

    def __init__(self, state_dir: Path, timeout_seconds: float = 3600.0) -> None:
        self.path = state_dir / "apply.lock"
        self.timeout_seconds = timeout_seconds
        self._fd: int | None = None

    def __enter__(self) -> ApplyLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockBusy(f"another apply holds {self.path} (waited {self.timeout_seconds:.0f}s)") from None
                time.sleep(0.1)
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
