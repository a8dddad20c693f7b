"""Safe, streaming extraction: download → hash → decompress → extract in one pass, no temp archive.

Formats: .tar, .tar.gz, .tar.bz2, .tar.xz and .tar.zst, recognised by content, not by name.

Every member is checked before it touches the disk (absolute paths, `..`, links leaving the
release, device nodes, FIFOs, setuid/setgid, member count and total size); a member whose
path passes through a symlink the archive created is also resolved on disk by tarfile's
`data` filter (DataFilter). The checksum covers every byte of the download, so the caller
activates nothing until `extract_verified` returned.

Three threads share the work: one downloads and hashes ahead (Prefetcher), the main one
decompresses and parses, two more create the files (FileWriter); all bounded in memory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fnmatch
import hmac
import os
import posixpath
import queue
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer.apply.fetch import Readable
from deployer.aws.retry import is_transient
from deployer.protocol.artifact import check_member
from deployer.protocol.errors import ArtifactError, TransientFetchError

#: Network reads of 256 KiB: ~400 reads per 100 MB, too few to cost CPU, small enough to keep the
#: read-ahead's memory low (each chunk is held until the extraction has consumed it).
READ_CHUNK = 256 * 1024
#: Chunks read ahead of the extraction: bounds the prefetcher's memory to 2 MiB, enough to keep the
#: download going while a burst of small files is written (a full queue only pauses the socket).
PREFETCH_DEPTH = 8
#: File writer threads, the largest file they take, and how many bytes may wait for them. Every
#: pending byte is resident: 4 MiB keeps both writers busy through a run of small files without
#: growing the apply's peak memory by more than that (16 MiB cost the agent's peak RSS ~12 MiB).
WRITER_THREADS = 2
WRITER_MAX_FILE_BYTES = 1024 * 1024
WRITER_MAX_PENDING_BYTES = 4 * 1024 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds against decompression bombs; checked on the tar headers before any data is written."""

    max_members: int = 200_000
    max_total_bytes: int = 8 * 1024**3


DEFAULT_LIMITS = ExtractLimits()


@dataclass(frozen=True)
class ExtractStats:
    members: int
    bytes: int
    downloaded: int


class HashingReader:
    """Passes reads through, hashing and counting every byte that comes off the wire."""

    def __init__(self, raw: Readable, hasher: Any) -> None:
        self._raw = raw
        self.hasher = hasher
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        self.hasher.update(data)
        self.count += len(data)
        return data


def extract_verified(
    raw: Readable,
    dest: Path,
    *,
    hasher: Any,
    expected_digest: str,
    expected_size: int | None = None,
    limits: ExtractLimits = DEFAULT_LIMITS,
    excludes: tuple[str, ...] = (),
) -> ExtractStats:
    """Extract a tar / tar.gz / tar.bz2 / tar.xz stream into `dest` (which must exist, empty).

    Raises ArtifactError on an unsafe member, a limit, a corrupt or truncated archive, a
    checksum mismatch or (when a signed deploy pins it) a size other than `expected_size`; the
    caller removes `dest` then.
    """
    reader = HashingReader(raw, hasher)
    with Prefetcher(reader) as prefetch:
        stats = _extract(prefetch, reader, dest, limits, excludes)
    digest = reader.hasher.hexdigest()
    if expected_size is not None and reader.count != expected_size:
        raise ArtifactError(f"size mismatch: the signed deploy says {expected_size} bytes, downloaded {reader.count}")
    if not hmac.compare_digest(digest, expected_digest.lower()):
        raise ArtifactError(
            f"checksum mismatch: expected {expected_digest.lower()}, downloaded {reader.count} bytes hashing to {digest}"
        )
    return stats


def _extract(
    prefetch: Prefetcher, reader: HashingReader, dest: Path, limits: ExtractLimits, excludes: tuple[str, ...]
) -> ExtractStats:
    budget = _Budget(limits)
    data_filter = DataFilter(dest)
    writer = FileWriter()
    try:
        with writer, tarfile.open(fileobj=_decompressed(prefetch), mode="r|*") as archive:  # type: ignore[call-overload]
            for member in archive:
                budget.admit(member)
                if not _excluded(member.name, excludes):
                    _place(archive, member, dest, data_filter, writer)
        prefetch.drain()
    except Exception as exc:
        replacement = _as_our_error(exc, reader.count)
        if replacement is None:
            raise
        raise replacement from None
    return ExtractStats(members=budget.members, bytes=budget.bytes, downloaded=reader.count)


@dataclass
class _Budget:
    """Counts members and bytes against the limits, and checks each member, before anything is written."""

    limits: ExtractLimits
    members: int = 0
    bytes: int = 0

    def admit(self, member: tarfile.TarInfo) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArtifactError(f"archive has more than {self.limits.max_members} members")
        self.bytes += max(member.size, 0)
        if self.bytes > self.limits.max_total_bytes:
            raise ArtifactError(f"archive expands to more than {self.limits.max_total_bytes} bytes")
        problem = check_member(member)
        if problem:
            raise ArtifactError(f"unsafe archive member: {problem}")


def _place(
    archive: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, data_filter: DataFilter, writer: FileWriter
) -> None:
    safe = data_filter(member, str(dest))
    name = posixpath.normpath(safe.name)
    plain = not data_filter.last_was_risky and name not in writer.names
    if plain and writer.takes(safe):
        source = archive.extractfile(member)
        assert source is not None
        writer.submit(name, dest / name, source.read(safe.size), safe)
    elif plain and safe.isdir():
        # No flush: waiting for the writers at every directory drained the pipeline hundreds of
        # times per release. Files already handed to them create their parents themselves.
        _make_dir(dest / name, safe)
    else:
        # Links, directories, a name seen before (tar's "later wins") and anything unusual:
        # by tarfile, in archive order, once every file before it is on disk.
        writer.flush()
        archive.extract(member, dest, filter=lambda _member, _path, safe=safe: safe)


def _as_our_error(exc: Exception, downloaded: int) -> Exception | None:
    """What an extraction failure means, as an error of the tree; None for a bug (re-raised as is)."""
    if isinstance(exc, ArtifactError):
        return exc
    if isinstance(exc, tarfile.FilterError):
        return ArtifactError(f"unsafe archive member: {exc}")
    if is_transient(exc):  # the download broke (reset, timeout, body shorter than announced)
        return TransientFetchError(f"download interrupted after {downloaded} bytes: {exc}")
    if isinstance(exc, OSError) and exc.errno is not None:
        return ArtifactError(f"cannot write release files: {exc}")
    if isinstance(exc, tarfile.TarError | EOFError | OSError | ValueError | zstd_error()):
        # ReadError on a non-tar/non-gzip body, EOFError/"unexpected end of data" on truncation.
        return ArtifactError(f"artifact is not a readable tar archive (tar, tar.gz, tar.bz2, tar.xz): {exc}")
    return None


class DataFilter:
    """tarfile's `data` filter, without its two realpath() walks per member where they cannot matter.

    The staging directory starts empty and is ours, so the only symlinks in it are the ones this
    archive created. A path that passes through none of them resolves exactly as it reads, and
    check_member has already checked it lexically (no absolute paths, no `..`, links inside).
    Only a member whose own path or link target passes through an extracted symlink can resolve
    somewhere else; those go through tarfile's full `data` filter, which resolves them on disk.
    Either way the attributes are the `data` filter's: no owner, no high mode bits, no go-w.
    """

    def __init__(self, dest: Path) -> None:
        self._symlinks: set[str] = set()
        self._dest = os.path.realpath(dest)
        self.last_was_risky = False

    def __call__(self, member: tarfile.TarInfo, _dest_path: str) -> tarfile.TarInfo:
        name = posixpath.normpath(member.name)
        risky = self._passes_symlink(name.split("/"))
        if member.issym():
            risky = risky or self._passes_symlink([*posixpath.dirname(name).split("/"), *member.linkname.split("/")])
            self._symlinks.add(name)
        elif member.islnk():
            risky = risky or self._passes_symlink(member.linkname.split("/"))
        self.last_was_risky = risky
        if risky:
            return tarfile.data_filter(member, self._dest)
        return member.replace(**_data_attrs(member), deep=False)

    def _passes_symlink(self, parts: list[str]) -> bool:
        """Whether walking `parts` from the root of the release steps on an extracted symlink."""
        stack: list[str] = []
        for part in parts:
            if part in ("", "."):
                continue
            if part == "..":
                if stack:
                    stack.pop()
                continue
            stack.append(part)
            if "/".join(stack) in self._symlinks:
                return True
        return False


def _data_attrs(member: tarfile.TarInfo) -> dict[str, Any]:
    """The attribute changes tarfile's `data` filter makes (Python 3.12 `_get_filtered_attrs`)."""
    mode: int | None = member.mode & 0o755  # no setuid/setgid/sticky, no group/other write
    if member.isreg() or member.islnk():
        assert mode is not None
        if not mode & 0o100:
            mode &= ~0o111  # not executable by its owner: executable by nobody
        mode |= 0o600
    else:
        mode = None  # directories and symlinks get the default mode
    return {"mode": mode, "uid": None, "gid": None, "uname": None, "gname": None}


class FileWriter:
    """Writes regular files on a few threads while the main thread keeps decompressing.

    Creating thousands of files is mostly kernel time (inode allocation, journaling), which
    releases the GIL; on two cores it then overlaps with gunzip and tar parsing instead of
    adding to it. Bounded: files over WRITER_MAX_FILE_BYTES stay on the main thread, and at
    most WRITER_MAX_PENDING_BYTES wait to be written. The first write error is raised from the
    next submit/flush/exit, so a full disk still fails the extraction.
    """

    def __init__(self, threads: int = WRITER_THREADS) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="writer")
        self._pending: list[concurrent.futures.Future[None]] = []
        self._pending_bytes = 0
        #: Paths written so far; a repeated name goes to tarfile, which overwrites like tar does.
        self.names: set[str] = set()

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def takes(member: tarfile.TarInfo) -> bool:
        return member.isreg() and not member.sparse and member.size <= WRITER_MAX_FILE_BYTES

    def submit(self, name: str, path: Path, data: bytes, member: tarfile.TarInfo) -> None:
        if self._pending_bytes + len(data) > WRITER_MAX_PENDING_BYTES:
            self.flush()
        self.names.add(name)
        self._pending.append(self._pool.submit(_write_file, path, data, member.mode, member.mtime))
        self._pending_bytes += len(data)

    def flush(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for future in pending:
            future.result()


def _make_dir(path: Path, member: tarfile.TarInfo) -> None:
    """What tarfile does for a directory member after the `data` filter (mkdir, utime): the path
    resolves as it reads (no extracted symlink on it, DataFilter checked), so makedirs is safe."""
    os.makedirs(path, exist_ok=True)
    if member.mode is not None:
        os.chmod(path, member.mode)
    os.utime(path, (member.mtime, member.mtime))


def _write_file(path: Path, data: bytes, mode: int | None, mtime: float) -> None:
    """What tarfile does for a regular member (makefile, chmod, utime), minus chown: the data
    filter drops owners, so files belong to the agent's user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL | O_NOFOLLOW: never write through something already at this path (links are the
    # DataFilter's business and go through tarfile on the main thread).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    if mode is not None:
        os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


class Prefetcher:
    """Reads ahead in a background thread, so the download (and its hashing) overlaps extraction.

    Bounded: at most PREFETCH_DEPTH chunks of READ_CHUNK bytes wait in memory. Socket reads,
    sha256 and zlib all release the GIL, so on two cores the transfer and the untar really run
    side by side. An error in the reader thread is raised from the next read().
    """

    def __init__(self, source: Readable) -> None:
        self._source = source
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=PREFETCH_DEPTH)
        self._closed = threading.Event()
        self._buffer = b""
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed.set()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a reader thread waiting for room
                self._chunks.get_nowait()
        self._thread.join()

    def _run(self) -> None:
        item: bytes | BaseException
        while not self._closed.is_set():
            try:
                item = self._source.read(READ_CHUNK)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                item = exc
            while not self._closed.is_set():
                try:
                    self._chunks.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, bytes) or not item:
                return

    def _next_chunk(self) -> bytes:
        item = self._chunks.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        if not item:
            self._eof = True
        return item

    def read(self, size: int = -1, /) -> bytes:
        # Slice the current chunk without copying the rest of it: tarfile reads ~10 KiB at a time.
        parts: list[bytes] = []
        wanted = size if size >= 0 else None
        while wanted is None or wanted > 0:
            if self._pos >= len(self._buffer):
                if self._eof:
                    break
                self._buffer, self._pos = self._next_chunk(), 0
                continue
            end = len(self._buffer) if wanted is None else self._pos + wanted
            piece = self._buffer[self._pos : end]
            self._pos += len(piece)
            parts.append(piece)
            if wanted is not None:
                wanted -= len(piece)
        return b"".join(parts)

    def drain(self) -> None:
        """Read to the end, so every byte of the download has passed through the hash."""
        while not self._eof:
            self._next_chunk()
        self._buffer, self._pos = b"", 0


class _Prefixed:
    """A stream with some already-read bytes put back in front (we peek at the magic number)."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self._head = head
        self._rest = rest

    def read(self, size: int = -1, /) -> bytes:
        if not self._head:
            return self._rest.read(size)
        if size < 0:
            data, self._head = self._head + self._rest.read(), b""
            return data
        data, self._head = self._head[:size], self._head[size:]
        if len(data) < size:
            data += self._rest.read(size - len(data))
        return data


def _decompressed(reader: Readable) -> Readable:
    """tarfile's stream mode knows gzip, bzip2 and xz; zstd is unwrapped here (.tar.zst)."""
    head = reader.read(len(ZSTD_MAGIC))
    stream = _Prefixed(head, reader)
    if head != ZSTD_MAGIC:
        return stream
    import zstandard  # only needed for .tar.zst; a well-kept binding to the reference library

    return zstandard.ZstdDecompressor().stream_reader(stream, read_size=READ_CHUNK)  # type: ignore[arg-type]


def zstd_error() -> type[Exception]:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a declared dependency
        return ValueError
    return zstandard.ZstdError


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    clean = name.removeprefix("./")
    return any(fnmatch.fnmatch(clean, p) or fnmatch.fnmatch(posixpath.basename(clean), p) for p in patterns)
