"""Turn a build output into a release artifact, and refuse artifacts the agent would reject."""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from pathlib import Path

from deployer.protocol.artifact import check_member
from deployer.protocol.errors import PublishError

GZIP_MAGIC = b"\x1f\x8b"
#: The reproducible-builds variable: the one mtime given to every packed member.
#: https://reproducible-builds.org/specs/source-date-epoch/
SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"
HASH_CHUNK = 1024 * 1024


def pack_directory(source: Path, out: Path, *, source_date_epoch: int | None = None) -> Path:
    """Pack `source`'s contents (not the directory itself) into a .tar.gz that is a function of the tree.

    The same tree packs to the same bytes, so a CI retry re-publishing a release under the same
    id finds an identical object (a no-op), not a conflict: members sorted, owners zeroed, every
    mtime set to one time, and a gzip header without name or timestamp. That one time is
    `SOURCE_DATE_EPOCH` (the reproducible-builds convention; CI sets it to the commit time, so a
    rebuilt checkout packs to the same bytes too), else the newest mtime in the tree. Never a
    constant: servers derive Last-Modified and ETags from mtimes, and every release must change them.
    File modes are kept: they are part of the release.
    """
    if not source.is_dir():
        raise PublishError(f"{source} is not a directory")
    paths = _walk(source)
    stamp = source_date_epoch if source_date_epoch is not None else _source_date_epoch()
    if stamp is None:
        stamp = max((int(path.lstat().st_mtime) for path in paths), default=0)

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = stamp
        return info

    with (
        open(out, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for path in paths:
            archive.add(path, arcname=str(path.relative_to(source)), recursive=False, filter=normalise)
    return out


def _walk(source: Path) -> list[Path]:
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


def check_artifact(path: Path) -> None:
    """Fail early, in CI, on what every agent would reject later: not gzip, not tar, unsafe members."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(2)
    except OSError as exc:
        raise PublishError(f"cannot read artifact {path}: {exc.strerror}") from None
    if magic != GZIP_MAGIC:
        raise PublishError(f"artifact {path} is not gzip-compressed (expected a .tar.gz)")
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                problem = check_member(member)
                if problem:
                    raise PublishError(f"artifact {path} has an unsafe member: {problem}")
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as exc:
        raise PublishError(f"artifact {path} is not a readable .tar.gz: {exc}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
