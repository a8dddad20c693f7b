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
