from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from deployer.apply.extract import DEFAULT_LIMITS, READ_CHUNK, ExtractLimits, _decompressed, extract_verified
from deployer.protocol.errors import ArtifactError
from tests.support import add_file, add_special, release_tarball, tar_bytes

Builder = Callable[[tarfile.TarFile], None]


def steps(*builders: Builder) -> Builder:
    """One archive built by several steps, in order."""

    def build(archive: tarfile.TarFile) -> None:
        for builder in builders:
            builder(archive)

    return build


MALICIOUS: list[tuple[str, Builder, str]] = [
    ("absolute path", lambda t: add_file(t, "/etc/passwd"), "absolute path"),
    ("dot-dot path", lambda t: add_file(t, "app/../../escape"), "'..'"),
    ("symlink to absolute", lambda t: add_special(t, "link", tarfile.SYMTYPE, "/etc/shadow"), "absolute path"),
    ("symlink escaping", lambda t: add_special(t, "a/link", tarfile.SYMTYPE, "../../outside"), "outside the release"),
    ("hardlink escaping", lambda t: add_special(t, "hl", tarfile.LNKTYPE, "../outside"), "outside the release"),
    ("character device", lambda t: add_special(t, "dev/tty", tarfile.CHRTYPE), "device node"),
    ("block device", lambda t: add_special(t, "dev/sda", tarfile.BLKTYPE), "device node"),
    ("fifo", lambda t: add_special(t, "pipe", tarfile.FIFOTYPE), "FIFO"),
    ("setuid binary", lambda t: add_file(t, "bin/su", b"#!", mode=0o4755), "setuid/setgid"),
    ("setgid binary", lambda t: add_file(t, "bin/sg", b"#!", mode=0o2755), "setuid/setgid"),
]


def extract(data: bytes, dest: Path, digest: str | None = None, limits: ExtractLimits = DEFAULT_LIMITS) -> object:
    dest.mkdir(exist_ok=True)
    return extract_verified(
        io.BytesIO(data),
        dest,
        hasher=hashlib.sha256(),
        expected_digest=digest or hashlib.sha256(data).hexdigest(),
        limits=limits,
    )


@pytest.mark.parametrize(("_case", "build", "expected"), MALICIOUS, ids=[c[0] for c in MALICIOUS])
def test_a_malicious_archive_is_rejected_and_nothing_escapes(
    tmp_path: Path, _case: str, build: Builder, expected: str
) -> None:
    def add(archive: tarfile.TarFile) -> None:
        add_file(archive, "ok.txt", b"fine")
        build(archive)

    with pytest.raises(ArtifactError) as info:
        extract(tar_bytes(add), tmp_path / "release")
    assert expected in str(info.value)
    assert not (tmp_path / "outside").exists()
    assert not (tmp_path / "escape").exists()


SYMLINK_CHAINS: list[tuple[str, Builder]] = [
    (
        "a file written through a chain of symlinks that each look inside",
        steps(
            lambda t: add_special(t, "sub/link", tarfile.SYMTYPE, ".."),
            lambda t: add_special(t, "sub/link/link2", tarfile.SYMTYPE, ".."),
            lambda t: add_file(t, "sub/link/link2/escape", b"pwned"),
        ),
    ),
    (
        "a symlink whose target steps through another symlink",
        steps(
            lambda t: add_special(t, "a", tarfile.SYMTYPE, "."),
            lambda t: add_special(t, "c", tarfile.SYMTYPE, "a/.."),
            lambda t: add_file(t, "c/escape", b"pwned"),
        ),
    ),
    (
        "a hardlink whose target steps through a symlink",
        steps(
            lambda t: add_special(t, "sub/link", tarfile.SYMTYPE, ".."),
            lambda t: add_special(t, "sub/link/link2", tarfile.SYMTYPE, ".."),
            lambda t: add_special(t, "h", tarfile.LNKTYPE, "sub/link/link2/outside-file"),
        ),
    ),
]


@pytest.mark.parametrize(("_case", "build"), SYMLINK_CHAINS, ids=[c[0] for c in SYMLINK_CHAINS])
def test_symlink_chains_that_only_escape_on_disk_are_rejected(tmp_path: Path, _case: str, build: Builder) -> None:
    (tmp_path / "outside-file").write_text("secret")
    release = tmp_path / "deep" / "release"
    release.parent.mkdir()
    with pytest.raises(ArtifactError, match="unsafe archive member"):
        extract(tar_bytes(build), release)
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "deep" / "escape").exists()
    assert (tmp_path / "outside-file").read_text() == "secret"


def test_modes_are_sanitised_like_tarfiles_data_filter(tmp_path: Path) -> None:
    def add(archive: tarfile.TarFile) -> None:
        add_file(archive, "world-writable", b"x", mode=0o777)
        add_file(archive, "not-owner-exec", b"x", mode=0o054)
        add_file(archive, "script", b"x", mode=0o750)

    extract(tar_bytes(add), tmp_path / "r")
    modes = {p.name: p.stat().st_mode & 0o7777 for p in (tmp_path / "r").iterdir()}
    assert modes == {"world-writable": 0o755, "not-owner-exec": 0o644, "script": 0o750}


def test_too_many_members_is_rejected_as_a_bomb(tmp_path: Path) -> None:
    data = release_tarball({f"f{i}": "x" for i in range(20)})
    with pytest.raises(ArtifactError, match="more than 10 members"):
        extract(data, tmp_path / "r", limits=ExtractLimits(max_members=10))


def test_too_many_expanded_bytes_is_rejected_as_a_bomb(tmp_path: Path) -> None:
    data = release_tarball({"big": "0" * 100_000})  # compresses to ~100 bytes
    with pytest.raises(ArtifactError, match="expands to more than"):
        extract(data, tmp_path / "r", limits=ExtractLimits(max_total_bytes=50_000))


def test_a_good_archive_extracts_and_its_checksum_covers_every_downloaded_byte(tmp_path: Path) -> None:
    data = release_tarball({"index.html": "hi", "lib/app.py": "print(1)"})
    stats = extract(data, tmp_path / "r")
    assert (tmp_path / "r" / "lib" / "app.py").read_text() == "print(1)"
    assert stats.downloaded == len(data)  # type: ignore[attr-defined]


def test_internal_symlinks_are_kept(tmp_path: Path) -> None:
    def add(archive: tarfile.TarFile) -> None:
        add_file(archive, "v1/app", b"x")
        add_special(archive, "app", tarfile.SYMTYPE, "v1/app")

    extract(tar_bytes(add), tmp_path / "r")
    assert (tmp_path / "r" / "app").is_symlink()


def test_a_checksum_mismatch_is_an_error(tmp_path: Path) -> None:
    data = release_tarball({"a": "b"})
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        extract(data, tmp_path / "r", digest="0" * 64)


def test_a_body_that_is_not_an_archive_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a readable tar archive"):
        extract(b"<html>403 Forbidden</html>" * 40, tmp_path / "r")


def test_a_truncated_download_is_an_error(tmp_path: Path) -> None:
    data = release_tarball({f"file{i}": "content " * 500 for i in range(10)})
    with pytest.raises(ArtifactError):
        extract(data[: len(data) // 2], tmp_path / "r", digest=hashlib.sha256(data).hexdigest())


def test_plain_tar_and_xz_are_accepted(tmp_path: Path) -> None:
    for index, mode in enumerate(("w", "w:xz", "w:bz2")):
        data = tar_bytes(lambda t: add_file(t, "a.txt", b"1"), mode=mode)
        extract(data, tmp_path / f"r{index}")
        assert (tmp_path / f"r{index}" / "a.txt").read_text() == "1"


def test_a_name_repeated_in_the_archive_ends_with_the_last_copy_like_tar(tmp_path: Path) -> None:
    def add(archive: tarfile.TarFile) -> None:
        add_file(archive, "config.ini", b"first")
        add_file(archive, "other", b"x")
        add_file(archive, "config.ini", b"second")

    extract(tar_bytes(add), tmp_path / "r")
    assert (tmp_path / "r" / "config.ini").read_text() == "second"


def test_many_files_hardlinks_and_dirs_extract_exactly(tmp_path: Path) -> None:
    files = {f"d{i % 7}/sub{i % 3}/f{i}.txt": f"content {i}" * (i % 50 + 1) for i in range(400)}

    def add(archive: tarfile.TarFile) -> None:
        for name, text in files.items():
            add_file(archive, name, text.encode())
        add_special(archive, "hard", tarfile.LNKTYPE, "d1/sub1/f1.txt")
        add_file(archive, "big.bin", b"z" * (5 * 1024 * 1024))  # over the writer threads' size: main thread

    extract(tar_bytes(add), tmp_path / "r")
    for name, text in files.items():
        assert (tmp_path / "r" / name).read_text() == text
    assert (tmp_path / "r" / "hard").read_text() == files["d1/sub1/f1.txt"]
    assert (tmp_path / "r" / "big.bin").stat().st_size == 5 * 1024 * 1024


def test_zstd_archives_extract_like_gzip_ones(tmp_path: Path) -> None:
    import zstandard

    plain = tar_bytes(lambda t: add_file(t, "lib/app.py", b"print(1)"), mode="w")
    extract(zstandard.ZstdCompressor().compress(plain), tmp_path / "r")
    assert (tmp_path / "r" / "lib" / "app.py").read_text() == "print(1)"


def test_a_gzip_whose_crc_does_not_match_its_content_is_not_a_readable_archive(tmp_path: Path) -> None:
    data = bytearray(release_tarball({"a.txt": "content"}))
    data[-8] ^= 0xFF  # the trailer's CRC32; the published checksum covers the damage, so only gzip can tell
    with pytest.raises(ArtifactError, match="not a readable tar archive"):
        extract(bytes(data), tmp_path / "r")


def test_bytes_after_the_compressed_archive_are_still_covered_by_the_checksum(tmp_path: Path) -> None:
    data = release_tarball({"a.txt": "content"}) + b"trailing bytes a mirror appended"
    stats = extract(data, tmp_path / "r")
    assert stats.downloaded == len(data)  # type: ignore[attr-defined]
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        extract(data, tmp_path / "r2", digest=hashlib.sha256(data[:-1]).hexdigest())


def test_a_decompression_bomb_reaches_the_parser_in_bounded_pieces() -> None:
    bomb = gzip.compress(bytes(32 * READ_CHUNK))  # 8 MiB of zeros in ~8 KiB
    pieces = list(_decompressed(io.BytesIO(bomb)))
    assert max(len(piece) for piece in pieces) <= READ_CHUNK
    assert sum(len(piece) for piece in pieces) == 32 * READ_CHUNK
