"""Safe, streaming extraction: download → hash → decompress → extract in one pass, no temp archive.

Formats: .tar, .tar.gz, .tar.bz2, .tar.xz and .tar.zst, recognised by content, not by name.

Every member is checked before it touches the disk (absolute paths, `..`, links leaving the
release, device nodes, FIFOs, setuid/setgid, member count and total size); a member whose
path passes through a symlink the archive created is also resolved on disk by tarfile's
`data` filter (DataFilter). The checksum covers every byte of the download, so the caller
activates nothing until `extract_verified` returned.

Four threads share the work: one downloads, hashes and decompresses ahead (Prefetcher), the
main one parses the tar stream and checks every member, two more create the files (FileWriter);
all bounded in memory (see `Prefetcher` and `FileWriter` for the bounds).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fnmatch
import hmac
import os
import posixpath
import queue
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from deployer.apply.fetch import Readable
from deployer.apply.fsutil import start_writeback
from deployer.aws.retry import is_transient
from deployer.protocol.artifact import check_member
from deployer.protocol.errors import ArtifactError, TransientFetchError

#: Network reads of 256 KiB: ~400 reads per 100 MB, too few to cost CPU, small enough to keep the
#: read-ahead's memory low. Also the most one decompression step may produce: a decompression bomb
#: (256 KiB of gzip can inflate to 256 MiB) is fed to the parser in pieces of this size, never whole.
READ_CHUNK = 256 * 1024
#: Decompressed chunks read ahead of the tar parser: bounds the queue to 512 KiB. Decompressing (ISA-L,
#: zstd) outruns file creation several times over, so the queue is full nearly all the time and a
#: deeper one only costs memory (4 deep: +0.3 MiB of an agent's peak RSS, which that put over 60 MB;
#: 8 deep: +1 MiB; neither faster; figure 2).
PREFETCH_DEPTH = 2
#: File writer threads, the largest file they take, and how many bytes may wait for them. Every
#: pending byte is resident: 2 MiB (~35 files of figure 2's release) keeps both writers busy; the
#: writers are the slowest stage, so a bigger window is always full: 4 MiB cost 2 MiB of peak RSS
#: and gained nothing, 1 MiB starved the writers now and then (16 MiB once cost ~12 MiB of RSS).
WRITER_THREADS = 2
WRITER_MAX_FILE_BYTES = 1024 * 1024
WRITER_MAX_PENDING_BYTES = 2 * 1024 * 1024
#: What the first bytes of an artifact say it is: the magic numbers tarfile's "r|*" knows, and zstd's.
GZIP_MAGIC = b"\x1f\x8b\x08"  # with deflate, the only method gzip has
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = b"\xfd7zXZ\x00"
LZMA_ALONE_MAGIC = b"\x5d\x00\x00\x80\x00"  # .tar.lzma, which tarfile's xz support reads too
MAGIC_BYTES = 6
NOT_A_TAR = "artifact is not a readable tar archive (tar, tar.gz, tar.bz2, tar.xz, tar.zst)"


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
    """Extract a tar / tar.gz / tar.bz2 / tar.xz / tar.zst stream into `dest` (which must exist, empty).

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
        # "r|": the Prefetcher already decompressed (gzip by ISA-L, a third of zlib's time), on its own thread.
        with writer, tarfile.open(fileobj=prefetch, mode="r|") as archive:  # type: ignore[call-overload]
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
        writer.submit(name, dest / name, _read_data(archive, safe), safe)
    elif plain and safe.isdir():
        # No flush: waiting for the writers at every directory drained the pipeline hundreds of
        # times per release. Files already handed to them create their parents themselves.
        _make_dir(dest / name, safe, writer)
    else:
        # Links, directories, a name seen before (tar's "later wins") and anything unusual:
        # by tarfile, in archive order, once every file before it is on disk.
        writer.flush()
        archive.extract(member, dest, filter=lambda _member, _path, safe=safe: safe)


def _read_data(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular, non-sparse member's bytes, read from the archive's stream as `extractfile` does
    (seek to the data, read `size` bytes), without the buffered reader and the extra copy it makes
    per file (3,000 of them are 10 % of the parsing thread's time in figure 2)."""
    stream = archive.fileobj
    assert stream is not None
    stream.seek(member.offset_data)  # where the stream already is; tarfile's stream refuses to seek back
    data: bytes = stream.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


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
    if isinstance(exc, tarfile.TarError | EOFError | OSError | ValueError):
        # ReadError on a body that is no tar, EOFError/"unexpected end of data" on truncation.
        # (Errors of the decompressors become ArtifactErrors where they happen, in `_decompressed`.)
        return ArtifactError(f"{NOT_A_TAR}: {exc}")
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
    """Writes regular files on a few threads while the main thread keeps parsing.

    Creating thousands of files is mostly kernel time (inode allocation, journaling), which
    releases the GIL; on two cores it then overlaps with the tar parsing and the decompression
    instead of adding to it. Each directory belongs to one writer (the next one in turn, the first
    time a file goes there): a create holds its directory's inode lock, so two writers creating
    in one directory only took turns, the waiting one spinning on the lock (15 % of the apply's
    CPU, `perf`, figure 2). Archives list a directory's files together, so the writers alternate
    directory by directory.

    Bounded: files over WRITER_MAX_FILE_BYTES stay on the main thread, and at most
    WRITER_MAX_PENDING_BYTES wait to be written; past that the oldest write is waited for, so the
    writers never run dry. The first write error is raised from the next submit/flush/exit, so a
    full disk still fails the extraction.
    """

    def __init__(self, threads: int = WRITER_THREADS) -> None:
        self._pools = [
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"writer-{index}")
            for index in range(threads)
        ]
        self._pending: collections.deque[tuple[concurrent.futures.Future[None], int]] = collections.deque()
        self._pending_bytes = 0
        #: Paths written so far; a repeated name goes to tarfile, which overwrites like tar does.
        self.names: set[str] = set()
        #: Directories known to exist (made here or by a writer): a file in one costs no mkdir.
        self._dirs: set[str] = set()
        #: Which writer creates the files of each directory (one entry per directory, like `names`).
        self._owners: dict[str, concurrent.futures.ThreadPoolExecutor] = {}

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            for pool in self._pools:
                pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def takes(member: tarfile.TarInfo) -> bool:
        return member.isreg() and not member.sparse and member.size <= WRITER_MAX_FILE_BYTES

    def submit(self, name: str, path: Path, data: bytes, member: tarfile.TarInfo) -> None:
        while self._pending and self._pending_bytes + len(data) > WRITER_MAX_PENDING_BYTES:
            oldest, size = self._pending.popleft()
            self._pending_bytes -= size
            oldest.result()
        self.names.add(name)
        parent = posixpath.dirname(name)
        pool = self._owners.get(parent)
        if pool is None:
            pool = self._owners[parent] = self._pools[len(self._owners) % len(self._pools)]
        future = pool.submit(_write_file, path, data, member.mode, member.mtime, self._dirs)
        self._pending.append((future, len(data)))
        self._pending_bytes += len(data)

    def made_dir(self, path: Path) -> None:
        self._dirs.add(str(path))

    def flush(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, collections.deque(), 0
        for future, _size in pending:
            future.result()


def _make_dir(path: Path, member: tarfile.TarInfo, writer: FileWriter) -> None:
    """What tarfile does for a directory member after the `data` filter (mkdir, utime): the path
    resolves as it reads (no extracted symlink on it, DataFilter checked), so makedirs is safe."""
    os.makedirs(path, exist_ok=True)
    writer.made_dir(path)
    if member.mode is not None:
        os.chmod(path, member.mode)
    os.utime(path, (member.mtime, member.mtime))


def _write_file(path: Path, data: bytes, mode: int | None, mtime: float, dirs: set[str]) -> None:
    """What tarfile does for a regular member (makefile, chmod, utime), minus chown: the data
    filter drops owners, so files belong to the agent's user. One path lookup (the open); the
    rest goes through the descriptor."""
    parent = os.path.dirname(path)
    if parent not in dirs:
        os.makedirs(parent, exist_ok=True)
        dirs.add(parent)
    # O_EXCL | O_NOFOLLOW: never write through something already at this path (links are the
    # DataFilter's business and go through tarfile on the main thread).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if mode is not None:
            os.fchmod(fd, mode)
        os.utime(fd, (mtime, mtime))
        start_writeback(fd)
    finally:
        os.close(fd)


class Prefetcher:
    """Downloads, hashes and decompresses ahead in a background thread; the main thread only parses.

    Socket reads, sha256 and the decompressors all release the GIL, so on two cores the transfer
    and its decompression run beside the tar parsing and the file writers instead of adding to
    them (gzip was a third of a single-threaded apply). Bounded: at most PREFETCH_DEPTH chunks of
    at most READ_CHUNK decompressed bytes wait in the queue (512 KiB); the thread itself holds one
    compressed chunk (256 KiB) and the decompressor's state: 32 KiB of gzip window, 900 KiB of
    bzip2 block, xz's dictionary (8 MiB at xz -6), zstd's window (2 MiB as `publish` packs, 8 MiB at
    zstd -19, at most the library's 128 MiB limit for `--long`). An error in the thread (network,
    corrupt compressed data) is raised from the next read().
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
        try:
            for piece in _decompressed(self._source):
                if not self._put(piece):
                    return
            # Bytes after the end of the compressed stream are not the tar's, but the checksum
            # covers the whole download: read them through the hash too.
            while self._source.read(READ_CHUNK):
                pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(exc)
            return
        self._put(b"")

    def _put(self, item: bytes | BaseException) -> bool:
        """Queue `item`, waiting for room; False once the consumer has gone."""
        while not self._closed.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

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


class _Decompressor(Protocol):
    """The streaming API bz2, lzma and isal's igzip_lib share: output bounded by `max_length`."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


def _decompressed(source: Readable) -> Iterator[bytes]:
    """The tar stream inside `source`, in pieces of at most READ_CHUNK bytes, by its magic number.

    gzip goes through ISA-L (python-isal's igzip_lib: 3x faster than zlib here, and it checks the
    gzip trailer's CRC, which tarfile's own gunzip never did), the rest through the decompressor
    tarfile itself would use. As with tarfile, only the first compressed stream is the archive.
    """
    head = source.read(READ_CHUNK)
    while 0 < len(head) < MAGIC_BYTES and (more := source.read(READ_CHUNK)):
        head += more
    if head.startswith(ZSTD_MAGIC):
        yield from _unzstd(head, source)
        return
    found = _decompressor_for(head)
    if found is None:  # a plain tar, or no archive at all (tarfile says which)
        while head:
            yield head
            head = source.read(READ_CHUNK)
        return
    yield from _inflate(*found, head, source)


def _decompressor_for(head: bytes) -> tuple[_Decompressor, tuple[type[Exception], ...]] | None:
    """A decompressor for the format `head` starts with, and the errors it raises on bad data."""
    if head.startswith(GZIP_MAGIC):
        from isal import igzip_lib  # a well-kept binding to Intel's ISA-L; loaded by the first apply

        isal_error = cast("type[Exception]", igzip_lib.IsalError)  # its stub calls the class an instance
        return igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP), (isal_error,)
    if head.startswith(BZIP2_MAGIC):
        import bz2

        return bz2.BZ2Decompressor(), (OSError, ValueError)  # OSError("Invalid data stream")
    if head.startswith((XZ_MAGIC, LZMA_ALONE_MAGIC)):
        import lzma

        return lzma.LZMADecompressor(), (lzma.LZMAError,)
    return None


def _inflate(
    decompressor: _Decompressor, errors: tuple[type[Exception], ...], data: bytes, source: Readable
) -> Iterator[bytes]:
    """Run `decompressor` to its end marker, never producing more than READ_CHUNK bytes per step."""
    while not decompressor.eof:
        if decompressor.needs_input and not data:
            data = source.read(READ_CHUNK)
            if not data:  # the download was whole (`Whole` said so): the artifact itself is cut
                raise ArtifactError(f"{NOT_A_TAR}: the compressed stream ends before its end marker")
        try:
            piece = decompressor.decompress(data if decompressor.needs_input else b"", READ_CHUNK)
        except errors as exc:  # only the decompressor: reads (the network's errors) are outside
            raise ArtifactError(f"{NOT_A_TAR}: {exc}") from None
        data = b""  # a decompressor that took input keeps what it did not use (needs_input is then False)
        if piece:
            yield piece


def _unzstd(head: bytes, source: Readable) -> Iterator[bytes]:
    import zstandard  # only needed for .tar.zst; a well-kept binding to the reference library

    stream = zstandard.ZstdDecompressor().stream_reader(_Prefixed(head, source), read_size=READ_CHUNK)  # type: ignore[arg-type]
    while True:
        try:
            piece = stream.read(READ_CHUNK)
        except zstandard.ZstdError as exc:
            raise ArtifactError(f"{NOT_A_TAR}: {exc}") from None
        if not piece:
            return
        yield piece


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


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    clean = name.removeprefix("./")
    return any(fnmatch.fnmatch(clean, p) or fnmatch.fnmatch(posixpath.basename(clean), p) for p in patterns)
