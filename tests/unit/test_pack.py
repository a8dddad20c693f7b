"""Packing a build directory: the same tree packs to the same bytes, so a retried publish is a no-op."""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path

import pytest

from deployer.protocol.errors import PublishError
from publisher.pack import (
    SOURCE_DATE_EPOCH,
    Artifact,
    Compression,
    artifact_file,
    check_artifact,
    pack_directory,
    sha256_file,
    sniff,
)
from tests.support import make_tree

FILES = {"index.html": "hello", "static/app.js": "js", "static/css/site.css": "css", "bin/run": "#!/bin/sh\n"}


def build(root: Path, mtime: int) -> Path:
    tree = make_tree(root, FILES)
    (tree / "bin/run").chmod(0o755)
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (mtime, mtime))
    return tree


def test_the_same_directory_packs_to_the_same_bytes_at_any_time_under_any_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = build(tmp_path / "build", 1_790_000_000)
    now = time.time()
    firsts = {c: pack_directory(tree, tmp_path / f"one-{c}", compression=c).path.read_bytes() for c in Compression}
    monkeypatch.setattr(time, "time", lambda: now + 3600)  # the CI retry runs an hour later
    for compression, first in firsts.items():
        second = pack_directory(tree, tmp_path / f"two-{compression}", compression=compression)
        assert second.path.read_bytes() == first, compression


def test_members_are_sorted_owned_by_root_stamped_with_one_time_and_keep_their_modes(tmp_path: Path) -> None:
    tree = build(tmp_path / "build", 1_790_000_000)
    os.utime(tree / "index.html", (1_790_000_500, 1_790_000_500))
    members = read_members(pack_directory(tree, tmp_path / "a.tar.zst").path)
    assert [m.name for m in members] == [
        "bin", "static", "index.html", "bin/run", "static/css", "static/app.js", "static/css/site.css",
    ]  # fmt: skip
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert {m.mtime for m in members} == {1_790_000_500}  # the newest mtime in the tree
    assert {m.name: m.mode for m in members}["bin/run"] == 0o755


def test_a_rebuilt_tree_packs_to_the_same_bytes_with_source_date_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SOURCE_DATE_EPOCH, "1790000000")
    first = pack_directory(build(tmp_path / "ci-run-1", 1_795_000_000), tmp_path / "1.tar.zst")
    second = pack_directory(build(tmp_path / "ci-run-2", 1_795_000_999), tmp_path / "2.tar.zst")
    assert first.sha256 == second.sha256
    assert {m.mtime for m in read_members(first.path)} == {1_790_000_000}


def test_a_source_date_epoch_that_is_not_a_number_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SOURCE_DATE_EPOCH, "yesterday")
    with pytest.raises(PublishError, match="SOURCE_DATE_EPOCH='yesterday' is not a number"):
        pack_directory(build(tmp_path / "b", 1), tmp_path / "b.tar.gz")


def read_members(path: Path) -> list[tarfile.TarInfo]:
    import zstandard

    with (
        open(path, "rb") as raw,
        zstandard.ZstdDecompressor().stream_reader(raw) as stream,
        tarfile.open(fileobj=stream, mode="r|") as archive,
    ):
        return list(archive)


def test_a_packed_directory_carries_its_own_sha256_and_size_so_publish_reads_it_once_more_only_to_upload(
    tmp_path: Path,
) -> None:
    packed = pack_directory(build(tmp_path / "b", 1_790_000_000), tmp_path / "b.tar.zst")
    assert packed.sha256 == sha256_file(packed.path)
    assert packed.size == packed.path.stat().st_size
    assert packed.checked
    assert artifact_file(packed.path) == Artifact(
        packed.path, packed.sha256, packed.size, Compression.ZSTD, False, packed.s3_checksum
    )


def test_gzip_packing_leaves_no_name_or_time_in_the_header(tmp_path: Path) -> None:
    packed = pack_directory(build(tmp_path / "b", 1_790_000_000), tmp_path / "b.tar.gz", compression=Compression.GZIP)
    header = packed.path.read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b"
    assert header[3] & 0x08 == 0, "no file name"
    assert header[4:8] == b"\0\0\0\0", "no timestamp"
    with tarfile.open(packed.path) as archive:
        assert "index.html" in archive.getnames()


def test_a_directory_with_an_entry_no_agent_would_extract_is_refused_while_packing(tmp_path: Path) -> None:
    tree = build(tmp_path / "b", 1_790_000_000)
    (tree / "escape").symlink_to("../../etc/passwd")
    with pytest.raises(PublishError, match="symlink 'escape' points outside the release"):
        pack_directory(tree, tmp_path / "b.tar.zst")


def test_an_artifact_file_is_recognised_by_content_and_checked_member_by_member(tmp_path: Path) -> None:
    not_an_archive = tmp_path / "notes.tar.gz"
    not_an_archive.write_text("hello")
    with pytest.raises(PublishError, match="neither gzip nor zstd"):
        artifact_file(not_an_archive)
    truncated = tmp_path / "cut.tar.zst"
    packed = pack_directory(build(tmp_path / "b", 1_790_000_000), tmp_path / "b.tar.zst")
    truncated.write_bytes(packed.path.read_bytes()[:-40])
    with pytest.raises(PublishError, match=r"is not a readable \.tar\.zst"):
        check_artifact(truncated, sniff(truncated))


def test_an_unchanged_tree_is_packed_once_and_its_cached_artifact_reused(tmp_path: Path) -> None:
    from publisher.cache import PublishCache

    cache = PublishCache(tmp_path / "cache")
    tree = build(tmp_path / "build", 1_790_000_000)
    first = cache.pack(tree, Compression.ZSTD, tmp_path)
    again = cache.pack(tree, Compression.ZSTD, tmp_path)
    assert again == first
    assert again.checked
    assert (first.sha256, first.size) == (sha256_file(first.path), first.path.stat().st_size)


def test_a_tree_changed_in_any_file_is_packed_again(tmp_path: Path) -> None:
    from publisher.cache import PublishCache

    cache = PublishCache(tmp_path / "cache")
    tree = build(tmp_path / "build", 1_790_000_000)
    first = cache.pack(tree, Compression.ZSTD, tmp_path)
    (tree / "static/app.js").write_text("JS")  # same size; mtime put back: ctime still moves
    os.utime(tree / "static/app.js", (1_790_000_000, 1_790_000_000))
    changed = cache.pack(tree, Compression.ZSTD, tmp_path)
    assert changed.sha256 != first.sha256
    assert changed.sha256 == pack_directory(tree, tmp_path / "fresh.tar.zst").sha256


def test_a_damaged_cached_pack_is_never_published_but_packed_again(tmp_path: Path) -> None:
    from publisher.cache import PublishCache

    cache = PublishCache(tmp_path / "cache")
    tree = build(tmp_path / "build", 1_790_000_000)
    first = cache.pack(tree, Compression.GZIP, tmp_path)
    damaged = bytearray(first.path.read_bytes())
    damaged[-1] ^= 0xFF
    first.path.write_bytes(bytes(damaged))
    again = cache.pack(tree, Compression.GZIP, tmp_path)
    assert again.sha256 == first.sha256 == sha256_file(again.path)


def test_an_unwritable_cache_costs_a_pack_in_a_temporary_file_not_the_publish(tmp_path: Path) -> None:
    from publisher.cache import PublishCache

    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory should be")
    tree = build(tmp_path / "build", 1_790_000_000)
    packed = PublishCache(blocked).pack(tree, Compression.ZSTD, tmp_path)
    assert packed.sha256 == pack_directory(tree, tmp_path / "fresh.tar.zst").sha256
