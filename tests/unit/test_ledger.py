from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from deployer.agent.ledger import AppliedRecord, DeployRecord, DeployStatus, Ledger, Start, plan_start
from deployer.apply.engine import Milestone
from deployer.apply.fsutil import swap_symlink, write_atomic
from deployer.apply.lock import ApplyLock
from deployer.protocol.errors import DeployerError, LockBusy
from deployer.protocol.names import Channel
from tests.support import make_deploy

API = Channel("prod", "web", "api")


def test_recorded_state_survives_a_reload(tmp_path: Path) -> None:
    store = Ledger(tmp_path)
    deploy = make_deploy(seq=3)
    store.mark(deploy, DeployStatus.COMPLETED, Milestone.POST_HOOKS_DONE)
    [(channel, record)] = Ledger(tmp_path).load().channels.items()
    assert channel == API
    assert (record.seq, record.deploy_id, record.release_id) == (3, deploy.deploy_id, deploy.release_id)
    assert isinstance(record, AppliedRecord)


def test_completing_a_deploy_records_its_seq_in_the_same_write(tmp_path: Path) -> None:
    store = Ledger(tmp_path)
    deploy = make_deploy(seq=4)
    store.mark(deploy, DeployStatus.IN_PROGRESS, Milestone.STARTED, attempt=True)
    assert store.applied() == {}
    assert store.deploy_record(deploy.deploy_id).status is DeployStatus.IN_PROGRESS  # type: ignore[union-attr]
    store.mark(deploy, DeployStatus.COMPLETED, Milestone.POST_HOOKS_DONE)
    reloaded = Ledger(tmp_path)
    assert reloaded.applied() == {deploy.channel: (4, deploy.deploy_id)}
    record = reloaded.deploy_record(deploy.deploy_id)
    assert record is not None
    assert (record.status, record.milestone, record.attempts) == (DeployStatus.COMPLETED, Milestone.POST_HOOKS_DONE, 1)
    assert record.payload_hash == deploy.payload_hash()


def test_attempts_count_only_real_attempts(tmp_path: Path) -> None:
    store = Ledger(tmp_path)
    deploy = make_deploy()
    for _ in range(3):
        store.mark(deploy, DeployStatus.IN_PROGRESS, Milestone.STARTED, attempt=True)
        store.mark(deploy, DeployStatus.FAILED, Milestone.STARTED, error="hook failed")
    record = store.deploy_record(deploy.deploy_id)
    assert record is not None
    assert (record.attempts, record.error) == (3, "hook failed")


def test_a_corrupt_state_file_is_an_error_not_a_guess(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{truncated")
    with pytest.raises(DeployerError, match="unreadable"):
        Ledger(tmp_path).load()


def test_write_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    write_atomic(tmp_path / "f.json", b"one")
    write_atomic(tmp_path / "f.json", b"two")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    assert (tmp_path / "f.json").read_bytes() == b"two"


def test_swap_symlink_replaces_the_link_in_place(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    swap_symlink(tmp_path / "current", "a")
    swap_symlink(tmp_path / "current", "b")
    assert (tmp_path / "current").readlink() == Path("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "current"]


def _hold_lock(state_dir: str, ready: object, release: object) -> None:
    with ApplyLock(Path(state_dir)):
        ready.set()  # type: ignore[attr-defined]
        release.wait(10)  # type: ignore[attr-defined]


def test_only_one_process_holds_the_apply_lock(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockBusy, match="another apply holds"), ApplyLock(tmp_path, timeout_seconds=0.3):
            pass
    finally:
        release.set()
        holder.join(10)
    with ApplyLock(tmp_path, timeout_seconds=1):
        pass  # free again once the holder exited


def record(status: DeployStatus, milestone: Milestone = Milestone.STARTED, payload_hash: str = "h") -> DeployRecord:
    return DeployRecord("d", payload_hash, status, milestone, attempts=1, updated_at="2026-11-26T00:00:00Z")


def never_asked() -> bool:
    raise AssertionError("whether the release is live only matters for a resume after the post hooks")


@pytest.mark.parametrize(
    ("existing", "start"),
    [
        (None, Start.FRESH),
        (record(DeployStatus.FAILED), Start.FRESH),
        (record(DeployStatus.COMPLETED), Start.FRESH),  # the seq check keeps it from getting here
        (record(DeployStatus.REJECTED), Start.SKIP_REJECTED),
        (record(DeployStatus.IN_PROGRESS), Start.RESUME),
        (record(DeployStatus.IN_PROGRESS, Milestone.ACTIVATED), Start.RESUME),
        (record(DeployStatus.IN_PROGRESS, payload_hash="other"), Start.REJECT),
        (record(DeployStatus.REJECTED, payload_hash="other"), Start.REJECT),
    ],
)
def test_what_to_do_with_a_deploy_follows_from_its_record(existing: DeployRecord | None, start: Start) -> None:
    assert plan_start(existing, "h", never_asked) is start


def test_a_crash_after_the_post_hooks_only_finishes_when_the_release_is_still_live() -> None:
    done = record(DeployStatus.IN_PROGRESS, Milestone.POST_HOOKS_DONE)
    assert plan_start(done, "h", lambda: True) is Start.FINISH
    assert plan_start(done, "h", lambda: False) is Start.RESUME  # someone moved `current`: run it again


def test_only_an_authenticated_deploy_makes_older_ones_stale(tmp_path: Path) -> None:
    store = Ledger(tmp_path)
    genuine, unproven = make_deploy(seq=14, deploy_id="d14"), make_deploy(seq=999999, deploy_id="forged")
    store.mark(unproven, DeployStatus.FAILED, Milestone.STARTED, error="network")  # history never confirmed it
    assert store.seen() == {}
    store.mark(genuine, DeployStatus.FAILED, Milestone.STARTED, error="hook failed", attempt=True, authenticated=True)
    assert store.seen() == {API: (14, "d14")}
    store.mark(make_deploy(seq=12, deploy_id="d12"), DeployStatus.COMPLETED, Milestone.POST_HOOKS_DONE)
    assert Ledger(tmp_path).seen() == {API: (14, "d14")}  # never moves back
    store.disown(API)
    assert store.seen() == {}
