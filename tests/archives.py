"""Builders for tar archives, good and crafted-malicious, for extraction and apply tests."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path


def tar_bytes(add: Callable[[tarfile.TarFile], None], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        add(archive)
    return buffer.getvalue()


def add_file(archive: tarfile.TarFile, name: str, content: bytes = b"x", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = mode
    archive.addfile(info, io.BytesIO(content))


def add_special(archive: tarfile.TarFile, name: str, kind: bytes, linkname: str = "", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    archive.addfile(info)


def release_tarball(files: dict[str, str]) -> bytes:
    def add(archive: tarfile.TarFile) -> None:
        for name, content in files.items():
            add_file(archive, name, content.encode())

    return tar_bytes(add)


def write_release(path: Path, files: dict[str, str]) -> tuple[Path, str]:
    data = release_tarball(files)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()
