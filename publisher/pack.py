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
HASH_CHUNK = 1024 * 1024


def pack_directory(source: Path, out: Path) -> Path:
    """Pack `source`'s contents (not the directory itself) into a .tar.gz, in a stable order.

    Owners are zeroed: the release is the files, not the build machine's uids.
    """
    if not source.is_dir():
        raise PublishError(f"{source} is not a directory")

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(out, "w:gz", compresslevel=6) as archive:
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = Path(root) / name
                archive.add(path, arcname=str(path.relative_to(source)), recursive=False, filter=normalise)
    return out


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
