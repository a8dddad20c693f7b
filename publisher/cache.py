"""CI's local cache: what a re-publish on the same runner need not do again.

Two records, both keyed so that a hit can only mean the same bytes:

- **checked artifacts**, by sha256: `check_artifact` (a full decompress and tar walk) passed on
  these exact bytes. A re-publish hashes the file anyway (its key is its sha256) and skips the
  check on a hit: the dominant cost of re-publishing a stored artifact.
- **packed directories**, by the tree's signature (every entry's path, type, mode, size, mtime,
  ctime and inode, and the packing's settings): the artifact `pack_directory` made of that tree.
  Packing is deterministic, so an unchanged tree would pack to the same bytes; on a hit the
  cached file is hashed again and used only if it still has the sha256 recorded for it, so a
  damaged or edited cache costs a re-pack, never a wrong release. ctime cannot be set from user
  space, so a file rewritten and given its old mtime back still misses (git's index trusts the
  same fields).

The cache is a convenience: any error reading or writing it is a warning and the work is done
the long way. One packed artifact is kept per source directory and compression; `--no-cache` or
an empty `DEPLOYER_CACHE_DIR` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from deployer.protocol.errors import PublishError
from publisher.pack import GZIP_LEVEL, ZSTD_LEVEL, Artifact, Compression, file_artifact, pack_directory, walk

log = structlog.get_logger(__name__)

#: Where the cache lives: this variable, else `$XDG_CACHE_HOME/deployer`, else `~/.cache/deployer`.
CACHE_DIR_VARIABLE = "DEPLOYER_CACHE_DIR"
#: Bumped when what a record means changes (the check's rules, the pack's format).
CACHE_VERSION = 1


def default_cache_dir() -> Path | None:
    """The cache directory the environment names; None if `DEPLOYER_CACHE_DIR` is set empty."""
    named = os.environ.get(CACHE_DIR_VARIABLE)
    if named is not None:
        return Path(named) if named else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deployer"


@dataclass(frozen=True)
class PublishCache:
    root: Path

    # -- checked artifacts -------------------------------------------------------------------

    def checked(self, sha256: str) -> bool:
        """Whether `check_artifact` passed on the bytes with this sha256."""
        return (self.root / f"v{CACHE_VERSION}" / "checked" / sha256).exists()

    def remember_checked(self, sha256: str, path: Path | None = None) -> None:
        """Record that the bytes with this sha256 passed the check (and that `path`, as it is now,
        held them: `seen_checked`'s hint)."""
        markers = [self.root / f"v{CACHE_VERSION}" / "checked" / sha256]
        if path is not None:
            with contextlib.suppress(OSError):  # a file gone since: no hint, nothing else lost
                markers.append(self.root / f"v{CACHE_VERSION}" / "files" / file_signature(path))
        for marker in markers:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError as exc:
                log.warning("cache_unwritable", path=str(marker), error=str(exc), next="the next publish checks again")

    def seen_checked(self, path: Path) -> bool:
        """Whether this file, unchanged by its stat fields, was checked before: a hint of whether
        to start the check before the hash is known, never the verdict (`checked` is)."""
        try:
            return (self.root / f"v{CACHE_VERSION}" / "files" / file_signature(path)).exists()
        except OSError:
            return False

    # -- packed directories ------------------------------------------------------------------

    def pack(self, source: Path, compression: Compression, scratch: Path) -> Artifact:
        """`pack_directory(source)`, or the artifact the cache holds for this very tree; packed into
        `scratch` (the caller's temporary directory) if the cache cannot be written."""
        entry = self.root / f"v{CACHE_VERSION}" / "packs" / _source_key(source, compression)
        try:
            signature = tree_signature(source, compression)
        except OSError as exc:
            raise PublishError(f"cannot read {source}: {exc}") from None
        hit = self._packed(entry, signature, compression)
        if hit is not None:
            log.info("pack_reused", source=str(source), sha256=hit.sha256, next="not packing the tree again")
            return hit
        try:
            entry.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=entry) as tmp:
                packed = pack_directory(source, Path(tmp) / f"artifact{compression.suffix}", compression=compression)
                artifact = entry / f"artifact{compression.suffix}"
                os.replace(packed.path, artifact)
            record = {"signature": signature, "sha256": packed.sha256}
            (entry / "record.json").write_text(json.dumps(record))
            return Artifact(artifact, packed.sha256, packed.size, compression, True, packed.s3_checksum)
        except OSError as exc:
            log.warning("cache_unwritable", path=str(entry), error=str(exc), next="packing into a temporary file")
            shutil.rmtree(entry, ignore_errors=True)
            return pack_directory(source, scratch / f"artifact{compression.suffix}", compression=compression)

    def _packed(self, entry: Path, signature: str, compression: Compression) -> Artifact | None:
        try:
            record = json.loads((entry / "record.json").read_text())
            if record.get("signature") != signature:
                return None
            found = file_artifact(entry / f"artifact{compression.suffix}", compression)
        except (OSError, ValueError, AttributeError):
            return None
        if found.sha256 != record.get("sha256"):
            log.warning("cache_damaged", path=str(entry), next="packing the tree again")
            return None
        return Artifact(found.path, found.sha256, found.size, compression, True, found.s3_checksum)


def tree_signature(source: Path, compression: Compression) -> str:
    """A digest of what `pack_directory` would read: every entry's path and lstat fields that
    change when it is written (and a symlink's target), the settings that shape the bytes."""
    digest = hashlib.sha256()
    settings = [compression.value, ZSTD_LEVEL, GZIP_LEVEL, os.environ.get("SOURCE_DATE_EPOCH", "")]
    digest.update(json.dumps(settings).encode())
    for path in walk(source):
        st = path.lstat()
        fields = [str(path.relative_to(source)), st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        if path.is_symlink():
            fields.append(os.readlink(path))
        digest.update(json.dumps(fields).encode() + b"\n")
    return digest.hexdigest()


def file_signature(path: Path) -> str:
    """A digest of a file's place and the lstat fields that change when it is written."""
    st = path.lstat()
    fields = [str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _source_key(source: Path, compression: Compression) -> str:
    return hashlib.sha256(f"{source.resolve()}\0{compression.value}".encode()).hexdigest()[:32]
