"""Crash-safe filesystem primitives: the flush before activation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployer.apply import fsutil


def test_a_release_is_flushed_with_syncfs_on_its_own_filesystem_not_with_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []

    def syncfs(fd: int) -> int:
        calls.append(os.fstat(fd).st_ino)
        return 0

    monkeypatch.setattr(fsutil, "_libc_syncfs", lambda: syncfs)
    monkeypatch.setattr(os, "sync", lambda: calls.append("sync"))
    fsutil.sync_filesystem(tmp_path)
    assert calls == [tmp_path.stat().st_ino]  # a descriptor of the release's own directory


@pytest.mark.parametrize("syncfs", [None, lambda _fd: -1], ids=["no syncfs in libc", "syncfs failed"])
def test_without_a_working_syncfs_the_whole_machine_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: object
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(fsutil, "_libc_syncfs", lambda: syncfs)
    monkeypatch.setattr(os, "sync", lambda: calls.append("sync"))
    fsutil.sync_filesystem(tmp_path)
    assert calls == ["sync"]


@pytest.mark.skipif(not os.path.exists("/proc/self"), reason="syncfs is Linux's")
def test_libc_syncfs_is_found_and_flushes_on_linux(tmp_path: Path) -> None:
    syncfs = fsutil._libc_syncfs()
    assert syncfs is not None
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert syncfs(fd) == 0
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.path.exists("/proc/self"), reason="sync_file_range is Linux's")
def test_writeback_of_a_written_file_starts_at_once_and_needs_no_wait(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 100_000)
        assert fsutil._libc_sync_file_range() is not None
        fsutil.start_writeback(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 100_000


def test_without_sync_file_range_starting_writeback_is_left_to_the_final_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsutil, "_libc_sync_file_range", lambda: None)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsutil.start_writeback(fd)  # nothing to call, nothing raised
    finally:
        os.close(fd)
