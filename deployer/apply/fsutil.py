"""Crash-safe filesystem primitives: a kill -9 between any two calls leaves old or new, never half."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def sync_filesystem(path: Path) -> None:
    """Make everything written under `path` durable: syncfs(2) on the filesystem holding it.

    A release is thousands of new files; fsync of each costs a journal commit apiece (6x slower
    than one flush for 600 files on ext4 here), and sync(2) also waits for every other
    filesystem's dirty pages (an application's logs on another volume). syncfs flushes this
    filesystem only, with sync's guarantee for it. Where libc has no syncfs (not Linux), sync(2).
    """
    syncfs = _libc_syncfs()
    if syncfs is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()  # no syncfs, or it failed: the whole machine, as before


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs, or None (Python has no os.syncfs)."""
    try:
        import ctypes

        syncfs: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, OSError, AttributeError):
        return None
    return syncfs


#: sync_file_range(2)'s SYNC_FILE_RANGE_WRITE: start writing the dirty pages, do not wait.
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing a just-written file's data to disk now, without waiting for it.

    Durability still comes from `sync_filesystem` before the release is used; this only moves
    the disk writes earlier, so they overlap the rest of the extraction instead of all waiting in
    that one final flush (syncfs went from ~0.11 s to ~0.01 s for the 179 MiB release of figure 2).
    A kill -9 at any point still leaves a staging directory that nothing points at. A no-op where
    libc has no sync_file_range (not Linux) or it fails: syncfs then does all the work, as before.
    """
    sync_file_range = _libc_sync_file_range()
    if sync_file_range is not None:
        sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # 0, 0: the whole file


@functools.cache
def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range, or None (Python has no os.sync_file_range)."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    sync_file_range: Callable[[int, int, int, int], int] = function
    return sync_file_range


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via temp file + fsync + rename + directory fsync, so readers see old or new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def swap_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically: build a new symlink beside it, then rename over it."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    # rename(2) over an existing symlink is atomic; readers never see a missing `current`.
    os.replace(tmp, link)
    fsync_dir(link.parent)
