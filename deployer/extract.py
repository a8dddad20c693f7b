"""Safe, streaming extraction: download → hash → decompress → extract in one pass, no temp archive.

Formats: .tar, .tar.gz, .tar.bz2, .tar.xz and .tar.zst, recognised by content, not by name.

Every member is checked before it touches the disk (absolute paths, `..`, links leaving the
release, device nodes, FIFOs, setuid/setgid, member count and total size), and tarfile's
`data` filter runs as a second line of defence. The checksum covers every byte of the
download, so the caller activates nothing until `extract_verified` returned.
"""

from __future__ import annotations

import fnmatch
import hmac
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import HTTPClientError, IncompleteReadError

from deployer.errors import ArtifactError
from deployer.fetch import Readable
from deployer.retry import TransientFetchError

READ_CHUNK = 1024 * 1024
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

    def drain(self) -> None:
        while self.read(READ_CHUNK):
            pass


def check_member(member: tarfile.TarInfo) -> str | None:
    """Why this member must not be extracted, or None if it is safe. Pure."""
    name = member.name
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"absolute path {name!r}"
    if ".." in name.split("/"):
        return f"path with '..' {name!r}"
    if member.ischr() or member.isblk():
        return f"device node {name!r}"
    if member.isfifo():
        return f"FIFO {name!r}"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return f"unsupported member type {member.type!r} for {name!r}"
    if member.mode & (stat.S_ISUID | stat.S_ISGID):
        return f"setuid/setgid bit on {name!r}"
    if member.issym():
        target = member.linkname
        if target.startswith("/"):
            return f"symlink {name!r} points to absolute path {target!r}"
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if resolved == ".." or resolved.startswith("../"):
            return f"symlink {name!r} points outside the release ({target!r})"
    if member.islnk():
        target = posixpath.normpath(member.linkname)
        if target.startswith("/") or target == ".." or target.startswith("../"):
            return f"hardlink {name!r} points outside the release ({member.linkname!r})"
    return None


def extract_verified(
    raw: Readable,
    dest: Path,
    *,
    hasher: Any,
    expected_digest: str,
    limits: ExtractLimits = DEFAULT_LIMITS,
    excludes: tuple[str, ...] = (),
) -> ExtractStats:
    """Extract a tar / tar.gz / tar.bz2 / tar.xz stream into `dest` (which must exist, empty).

    Raises ArtifactError on an unsafe member, a limit, a corrupt or truncated archive, or a
    checksum mismatch; the caller removes `dest` then.
    """
    reader = HashingReader(raw, hasher)
    members = 0
    total = 0
    try:
        with tarfile.open(fileobj=_decompressed(reader), mode="r|*") as archive:  # type: ignore[call-overload]
            for member in archive:
                members += 1
                if members > limits.max_members:
                    raise ArtifactError(f"archive has more than {limits.max_members} members")
                total += max(member.size, 0)
                if total > limits.max_total_bytes:
                    raise ArtifactError(f"archive expands to more than {limits.max_total_bytes} bytes")
                problem = check_member(member)
                if problem:
                    raise ArtifactError(f"unsafe archive member: {problem}")
                if _excluded(member.name, excludes):
                    continue
                archive.extract(member, dest, filter="data")
        reader.drain()
    except ArtifactError:
        raise
    except (ConnectionError, TimeoutError, HTTPClientError, IncompleteReadError) as exc:
        raise TransientFetchError(f"download interrupted after {reader.count} bytes: {exc}") from None
    except tarfile.FilterError as exc:
        raise ArtifactError(f"unsafe archive member: {exc}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError, zstd_error()) as exc:
        # ReadError on a non-tar/non-gzip body, EOFError/"unexpected end of data" on truncation.
        if isinstance(exc, OSError) and exc.errno is not None:
            raise ArtifactError(f"cannot write release files: {exc}") from None
        raise ArtifactError(f"artifact is not a readable tar archive (tar, tar.gz, tar.bz2, tar.xz): {exc}") from None
    digest = reader.hasher.hexdigest()
    if not hmac.compare_digest(digest, expected_digest.lower()):
        raise ArtifactError(
            f"checksum mismatch: expected {expected_digest.lower()}, downloaded {reader.count} bytes hashing to {digest}"
        )
    return ExtractStats(members=members, bytes=total, downloaded=reader.count)


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
