"""Packing a build directory: the same tree packs to the same bytes, so a retried publish is a no-op."""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path

import pytest

from deployer.protocol.errors import PublishError
from publisher.pack import SOURCE_DATE_EPOCH, pack_directory
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
    first = pack_directory(tree, tmp_path / "one.tar.gz").read_bytes()
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 3600)  # the CI retry runs an hour later
    second = pack_directory(tree, tmp_path / "two.tar.gz")
    assert second.read_bytes() == first


def test_members_are_sorted_owned_by_root_stamped_with_one_time_and_keep_their_modes(tmp_path: Path) -> None:
    tree = build(tmp_path / "build", 1_790_000_000)
    os.utime(tree / "index.html", (1_790_000_500, 1_790_000_500))
    with tarfile.open(pack_directory(tree, tmp_path / "a.tar.gz")) as archive:
        members = archive.getmembers()
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
    first = pack_directory(build(tmp_path / "ci-run-1", 1_795_000_000), tmp_path / "1.tar.gz")
    second = pack_directory(build(tmp_path / "ci-run-2", 1_795_000_999), tmp_path / "2.tar.gz")
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as archive:
        assert {m.mtime for m in archive.getmembers()} == {1_790_000_000}


def test_a_source_date_epoch_that_is_not_a_number_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SOURCE_DATE_EPOCH, "yesterday")
    with pytest.raises(PublishError, match="SOURCE_DATE_EPOCH='yesterday' is not a number"):
        pack_directory(build(tmp_path / "b", 1), tmp_path / "b.tar.gz")
