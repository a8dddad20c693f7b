"""Turn a build output into a release artifact, and refuse artifacts the agent would reject."""

from __future__ import annotations

import enum
import gzip
import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deployer.aws.checksum import ObjectChecksum
from deployer.protocol.artifact import check_member
from deployer.protocol.errors import PublishError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: The reproducible-builds variable: the one mtime given to every packed member.
#: https://reproducible-builds.org/specs/source-date-epoch/
SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"
HASH_CHUNK = 1024 * 1024
#: zstd level for packed directories. On the benchmark's 179 MiB tree (3,000 files, half random
#: bytes) `pack_directory` takes 2–4 s at zstd 3 and 6.6 s at gzip 6 (compressing alone: 0.5 s
#: against 9 s), for a 3 % bigger artifact; the agent extracts either in about the same time,
#: file creation dominating (docs/benchmarks.md, figure 5). Higher levels cost time, gain nothing.
ZSTD_LEVEL = 3
GZIP_LEVEL = 6


class Compression(enum.StrEnum):
    ZSTD = "zstd"
    GZIP = "gzip"

    @property
    def suffix(self) -> str:
        return ".tar.zst" if self is Compression.ZSTD else ".tar.gz"

    @property
    def content_type(self) -> str:
        return "application/zstd" if self is Compression.ZSTD else "application/gzip"


#: What `publish` packs a directory with unless told otherwise.
DEFAULT_COMPRESSION = Compression.ZSTD


@dataclass(frozen=True)
class Artifact:
    """An artifact file ready to publish: its sha256 and size, and whether its members were
    already checked (a directory we packed ourselves) or still must be (a file CI handed us)."""

    path: Path
    sha256: str
    size: int
    compression: Compression
    checked: bool
    #: The checksum S3 will hold for it once uploaded (`ObjectChecksum`); "" if unknown.
    s3_checksum: str = ""


class _Hashing:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.digests = raw, ObjectChecksum()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digests.update(view)
        return self.raw.write(view)

    def flush(self) -> None:
        self.raw.flush()


def pack_directory(
    source: Path,
    out: Path,
    *,
    source_date_epoch: int | None = None,
    compression: Compression = DEFAULT_COMPRESSION,
) -> Artifact:
    """Pack `source`'s contents (not the directory itself) into a tarball that is a function of the tree.

    The same tree packs to the same bytes, so a CI retry re-publishing a release finds an
    identical artifact (by its sha256, nothing to upload), not a conflict: members sorted,
    owners zeroed, every mtime set to one time, no name or timestamp in a gzip header, zstd
    single-threaded at a fixed level. That one time is `SOURCE_DATE_EPOCH` (the reproducible-builds
    convention; CI sets it to the commit time, so a rebuilt checkout packs to the same bytes too),
    else the newest mtime in the tree. Never a constant: servers derive Last-Modified and ETags
    from mtimes, and every release must change them. File modes are kept: they are part of the
    release. Every member is checked as it is added, and the output is hashed as it is written,
    so publishing needs no second pass over the file.
    """
    if not source.is_dir():
        raise PublishError(f"{source} is not a directory")
    paths = walk(source)
    stamp = source_date_epoch if source_date_epoch is not None else _source_date_epoch()
    if stamp is None:
        stamp = max((int(path.lstat().st_mtime) for path in paths), default=0)

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = stamp
        problem = check_member(info)
        if problem:
            raise PublishError(f"{source} has an entry no agent would extract: {problem}")
        return info

    with open(out, "wb") as raw:
        hashing = _Hashing(raw)
        with _compressor(hashing, compression) as compressed, _tar_writer(compressed) as archive:
            for path in paths:
                archive.add(path, arcname=str(path.relative_to(source)), recursive=False, filter=normalise)
    digests = hashing.digests
    return Artifact(out, digests.whole.hexdigest(), digests.size, compression, True, digests.value)


def _compressor(sink: _Hashing, compression: Compression) -> Any:
    if compression is Compression.GZIP:
        return gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=GZIP_LEVEL, mtime=0)
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, threads=0, write_checksum=1)
    return zstandard.ZstdCompressor(compression_params=params).stream_writer(sink, closefd=False)  # type: ignore[arg-type]


def _tar_writer(sink: Any) -> tarfile.TarFile:
    return tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, bufsize=HASH_CHUNK)


def walk(source: Path) -> list[Path]:
    """Every entry under `source`, in a stable order (each directory's subdirectories, then its files)."""
    found: list[Path] = []
    for root, dirs, files in os.walk(source):
        dirs.sort()
        found.extend(Path(root) / name for name in sorted(dirs) + sorted(files))
    return found


def _source_date_epoch() -> int | None:
    value = os.environ.get(SOURCE_DATE_EPOCH)
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise PublishError(f"{SOURCE_DATE_EPOCH}={value!r} is not a number of seconds since 1970")
    return int(value)


def artifact_file(path: Path) -> Artifact:
    """A tarball CI built: its compression (by content), sha256 and size; its members are
    checked separately (`check_artifact`; `Publisher.publish` does both at once)."""
    return file_artifact(path, sniff(path))


def file_artifact(path: Path, compression: Compression) -> Artifact:
    """A file as an `Artifact` still to be checked: its sha256, size and S3 checksum."""
    digests = ObjectChecksum.of_file(path, HASH_CHUNK)
    return Artifact(path, digests.whole.hexdigest(), digests.size, compression, False, digests.value)


def sniff(path: Path) -> Compression:
    """The compression of a tarball, by its first bytes (names lie)."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise PublishError(f"cannot read artifact {path}: {exc.strerror}") from None
    if magic.startswith(GZIP_MAGIC):
        compression = Compression.GZIP
    elif magic == ZSTD_MAGIC:
        compression = Compression.ZSTD
    else:
        raise PublishError(f"artifact {path} is neither gzip nor zstd-compressed (expected a .tar.gz or .tar.zst)")
    return compression


def check_artifact(path: Path, compression: Compression) -> None:
    """Fail in CI on what every agent would reject later: not a tarball, unsafe members."""
    try:
        with open(path, "rb") as raw:
            stream: Any = raw
            if compression is Compression.ZSTD:
                import zstandard

                stream = zstandard.ZstdDecompressor().stream_reader(raw, read_size=HASH_CHUNK)
            with tarfile.open(fileobj=stream, mode="r|" if compression is Compression.ZSTD else "r|gz") as archive:
                for member in archive:
                    problem = check_member(member)
                    if problem:
                        raise PublishError(f"artifact {path} has an unsafe member: {problem}")
    except PublishError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile, gzip and zstandard each raise their own
        raise PublishError(
            f"artifact {path} is not a readable {compression.suffix} ({type(exc).__name__}: {exc})"
        ) from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
