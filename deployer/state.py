"""What this instance has applied, per channel, kept on local disk; and the one-apply-at-a-time lock."""

from __future__ import annotations

import enum
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
#: Idempotency records kept, newest first; older deploys are covered by the per-channel seq.
MAX_DEPLOY_RECORDS = 200


class DeployStatus(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"  # may succeed on another attempt
    REJECTED = "rejected"  # can never succeed; never attempted again


class Milestone(enum.StrEnum):
    """How far an apply got, so a restart after a crash neither redoes finished hooks nor skips work."""

    STARTED = "started"
    ACTIVATED = "activated"
    POST_HOOKS_DONE = "post_hooks_done"


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


@dataclass(frozen=True)
class DeployRecord:
    """The idempotency record of one deploy id (Powertools-style: key, payload hash, status).

    There is no in-progress expiry: an IN_PROGRESS record is only ever read by a process that
    holds the apply lock, and flock is released by the kernel when its holder dies, so such a
    record always belongs to a dead process and is resumed at once, never waited on.
    """

    deploy_id: str
    payload_hash: str
    status: DeployStatus
    milestone: Milestone
    attempts: int
    updated_at: str
    error: str | None = None


@dataclass(frozen=True)
class LocalState:
    channels: dict[Channel, AppliedRecord]
    deploys: dict[str, DeployRecord]

    def applied(self) -> dict[Channel, tuple[int, str]]:
        return {ch: (rec.seq, rec.deploy_id) for ch, rec in self.channels.items()}


class StateStore:
    """`state.json` under state_dir, rewritten whole by temp file + fsync + rename on every change.

    Channel seqs and deploy records live in one file so "completed" and "seq applied" are
    recorded by one atomic rename: there is no instant at which one is true and not the other.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"

    def load(self) -> LocalState:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return LocalState({}, {})
        except (OSError, ValueError) as exc:
            # Never guess: a corrupt state file would make us re-run or skip deploys.
            raise DeployerError(f"state file {self.path} is unreadable ({exc}); move it aside to start over") from None
        if doc.get("v") != STATE_VERSION:
            raise DeployerError(f"state file {self.path} has unsupported version {doc.get('v')!r}")
        channels: dict[Channel, AppliedRecord] = {}
        for key, record in doc.get("channels", {}).items():
            stage, role, component = key.split("/")
            channels[Channel(stage, role, component)] = AppliedRecord(**record)
        deploys = {
            deploy_id: DeployRecord(
                **{**record, "status": DeployStatus(record["status"]), "milestone": Milestone(record["milestone"])}
            )
            for deploy_id, record in doc.get("deploys", {}).items()
        }
        return LocalState(channels, deploys)

    def applied(self) -> dict[Channel, tuple[int, str]]:
        return self.load().applied()

    def deploy_record(self, deploy_id: str) -> DeployRecord | None:
        return self.load().deploys.get(deploy_id)

    def mark(
        self,
        deploy: Deploy,
        status: DeployStatus,
        milestone: Milestone,
        *,
        error: str | None = None,
        attempt: bool = False,
    ) -> DeployRecord:
        """Write the deploy's record; COMPLETED also records the channel's seq in the same write."""
        state = self.load()
        previous = state.deploys.get(deploy.deploy_id)
        record = DeployRecord(
            deploy_id=deploy.deploy_id,
            payload_hash=deploy.payload_hash(),
            status=status,
            milestone=milestone,
            attempts=(previous.attempts if previous else 0) + (1 if attempt else 0),
            updated_at=utc_now_iso(),
            error=error,
        )
        state.deploys[deploy.deploy_id] = record
        if status is DeployStatus.COMPLETED:
            state.channels[deploy.channel] = AppliedRecord.of(deploy)
        self._write(state)
        return record

    def record(self, channel: Channel, record: AppliedRecord) -> None:
        state = self.load()
        state.channels[channel] = record
        self._write(state)

    def _write(self, state: LocalState) -> None:
        newest = sorted(state.deploys.values(), key=lambda r: r.updated_at, reverse=True)[:MAX_DEPLOY_RECORDS]
        doc = {
            "v": STATE_VERSION,
            "channels": {str(ch): asdict(rec) for ch, rec in sorted(state.channels.items())},
            "deploys": {
                r.deploy_id: {**asdict(r), "status": r.status.value, "milestone": r.milestone.value} for r in newest
            },
        }
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
