"""The apply engine on local file:// artifacts: activation, rollback and failure paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from deployer.apply.confirmation import Confirmation
from deployer.apply.engine import Applier
from deployer.protocol.errors import (
    ActivationFailed,
    ArtifactError,
    FetchError,
    HealthCheckFailed,
    HookFailed,
    RejectedInput,
    ReleaseFailed,
)
from deployer.protocol.manifest import Commands, HealthCheck, Hook, Manifest, SyncStrategy
from tests.support import proxied_through, write_release

ENV = {"DEPLOYER_SEQ": "1"}


def manifest_for(artifact: Path, checksum: str, **kwargs: object) -> Manifest:
    values: dict[str, object] = {
        "src": artifact.as_uri(),
        "checksum": checksum,
        "dest": "/opt/app/current",
        "sync_strategy": SyncStrategy.SYMLINK,
    }
    values.update(kwargs)
    return Manifest(**values)  # type: ignore[arg-type]


@pytest.fixture
def applier(tmp_path: Path) -> Applier:
    root = tmp_path / "root"
    root.mkdir()
    return Applier(s3=None, root_dir=root, hook_timeout=10)  # type: ignore[arg-type]


def releases_on_disk(releases: Path) -> list[str]:
    return sorted(p.name for p in releases.iterdir() if not p.name.startswith("."))


def current(applier: Applier) -> Path:
    return applier.resolve("/opt/app/current")


def release(tmp_path: Path, name: str, files: dict[str, str]) -> tuple[Path, str]:
    return write_release(tmp_path / f"{name}.tar.gz", files)


def test_symlink_strategy_activates_the_release_atomically(tmp_path: Path, applier: Applier) -> None:
    artifact, digest = release(tmp_path, "r1", {"index.html": "v1"})
    result = applier.apply(manifest_for(artifact, digest), "r1", ENV)
    link = current(applier)
    assert link.is_symlink()
    assert os.readlink(link) == "releases/r1"  # relative, so the tree can be moved or chrooted
    assert (link / "index.html").read_text() == "v1"
    assert result.previous_dir is None
    assert releases_on_disk(link.parent / "releases") == ["r1"]
    assert not any(p.name.startswith(".incoming") for p in (link.parent / "releases").iterdir())


def test_a_second_release_swaps_current_and_keeps_the_first(tmp_path: Path, applier: Applier) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
    a2, d2 = release(tmp_path, "r2", {"index.html": "v2"})
    applier.apply(manifest_for(a1, d1), "r1", ENV)
    result = applier.apply(manifest_for(a2, d2), "r2", ENV)
    assert (current(applier) / "index.html").read_text() == "v2"
    assert result.previous_dir is not None
    assert result.previous_dir.name == "r1"
    assert (current(applier).parent / "releases" / "r1" / "index.html").exists()


def test_hooks_get_the_deployer_environment(tmp_path: Path, applier: Applier) -> None:
    a1, d1 = release(tmp_path, "r1", {"x": "1"})
    a2, d2 = release(tmp_path, "r2", {"x": "2"})
    out = tmp_path / "env.txt"
    hook = Hook(
        f'echo "$DEPLOYER_RELEASE_ID|$DEPLOYER_SEQ|$DEPLOYER_RELEASE_DIR|$DEPLOYER_PREVIOUS_RELEASE_DIR|$APP" > {out}'
    )
    applier.apply(manifest_for(a1, d1), "r1", ENV)
    applier.apply(manifest_for(a2, d2, commands=Commands(post=(hook,)), env={"APP": "demo"}), "r2", ENV)
    releases = current(applier).parent / "releases"
    assert out.read_text().strip() == f"r2|1|{releases / 'r2'}|{(releases / 'r1').resolve()}|demo"


def test_a_failing_post_hook_rolls_back_to_the_previous_release_and_runs_failure_hooks(
    tmp_path: Path, applier: Applier
) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
    a2, d2 = release(tmp_path, "r2", {"index.html": "v2"})
    applier.apply(manifest_for(a1, d1), "r1", ENV)
    failure_log = tmp_path / "failure.log"
    bad = manifest_for(
        a2,
        d2,
        commands=Commands(post=(Hook("echo smoke test broke; exit 1"),), failure=(Hook(f"cat > {failure_log}"),)),
    )
    with pytest.raises(HookFailed, match="post hook #0 exited 1") as info:
        applier.apply(bad, "r2", ENV)
    assert isinstance(info.value, ReleaseFailed)  # retried with backoff, counted against the release
    assert "smoke test broke" in info.value.output_tail
    assert (current(applier) / "index.html").read_text() == "v1"
    log = failure_log.read_text()
    assert "activated" in log
    assert "rolled back" in log


def test_a_failing_pre_hook_leaves_current_and_keeps_the_verified_release_for_the_retry(
    tmp_path: Path, applier: Applier
) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
    a2, d2 = release(tmp_path, "r2", {"index.html": "v2"})
    applier.apply(manifest_for(a1, d1), "r1", ENV)
    seen = tmp_path / "pre-saw"
    failing = Commands(pre=(Hook(f'cat "$DEPLOYER_RELEASE_DIR/index.html" > {seen}; exit 7'),))
    with pytest.raises(HookFailed, match="pre hook"):
        applier.apply(manifest_for(a2, d2, commands=failing), "r2", ENV)
    assert (current(applier) / "index.html").read_text() == "v1"
    assert seen.read_text() == "v2"  # pre hooks run once the release is here and verified
    a2.unlink()  # the retry needs no download: the verified release is kept on disk
    assert applier.apply(manifest_for(a2, d2), "r2", ENV).reused


def test_no_hook_runs_when_the_download_never_completes(tmp_path: Path, applier: Applier) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
    ran = tmp_path / "pre-ran"
    broken = Manifest(**{**manifest_for(a1, d1).__dict__, "src": (tmp_path / "gone.tar.gz").as_uri()})
    broken = Manifest(**{**broken.__dict__, "commands": Commands(pre=(Hook(f"touch {ran}"),))})
    with pytest.raises(FetchError):
        applier.apply(broken, "r1", ENV)
    assert not ran.exists()


def test_a_checksum_mismatch_leaves_current_untouched_and_no_partial_release(tmp_path: Path, applier: Applier) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
    a2, _ = release(tmp_path, "r2", {"index.html": "v2"})
    applier.apply(manifest_for(a1, d1), "r1", ENV)
    with pytest.raises(ArtifactError, match="checksum mismatch") as info:
        applier.apply(manifest_for(a2, "f" * 64), "r2", ENV)
    assert isinstance(info.value, RejectedInput)  # never retried
    releases = current(applier).parent / "releases"
    assert releases_on_disk(releases) == ["r1"]
    assert not any(p.name.startswith(".incoming") for p in releases.iterdir())
    assert (current(applier) / "index.html").read_text() == "v1"


def test_a_release_already_on_disk_is_reused_without_downloading(tmp_path: Path, applier: Applier) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
    a2, d2 = release(tmp_path, "r2", {"index.html": "v2"})
    applier.apply(manifest_for(a1, d1), "r1", ENV)
    applier.apply(manifest_for(a2, d2), "r2", ENV)
    a1.unlink()  # rolling back to r1 must not need the artifact
    result = applier.apply(manifest_for(a1, d1), "r1", ENV)
    assert result.reused
    assert (current(applier) / "index.html").read_text() == "v1"


def test_old_releases_beyond_keep_are_pruned(tmp_path: Path, applier: Applier) -> None:
    for i in range(1, 6):
        artifact, digest = release(tmp_path, f"r{i}", {"v": str(i)})
        applier.apply(manifest_for(artifact, digest, keep_releases=3), f"r{i}", ENV)
    releases = current(applier).parent / "releases"
    assert releases_on_disk(releases) == ["r3", "r4", "r5"]
    assert sorted(p.name for p in (releases / ".meta").iterdir()) == ["r3.json", "r4.json", "r5.json"]


def test_symlink_strategy_refuses_to_replace_a_real_directory(tmp_path: Path, applier: Applier) -> None:
    current(applier).mkdir(parents=True)
    (current(applier) / "keep.txt").write_text("precious")
    artifact, digest = release(tmp_path, "r1", {"a": "1"})
    with pytest.raises(ActivationFailed, match="is not a symlink"):
        applier.apply(manifest_for(artifact, digest), "r1", ENV)
    assert (current(applier) / "keep.txt").read_text() == "precious"


def test_a_src_less_manifest_only_runs_its_commands(tmp_path: Path, applier: Applier) -> None:
    marker = tmp_path / "ran"
    applier.apply(Manifest(commands=Commands(post=(Hook(f"touch {marker}"),))), "r1", ENV)
    assert marker.exists()


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed (CI installs it)")
def test_rsync_strategy_syncs_into_dest_and_deletes_what_the_release_dropped(tmp_path: Path, applier: Applier) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1", "old.txt": "gone soon"})
    a2, d2 = release(tmp_path, "r2", {"index.html": "v2"})
    dest = "/srv/app"
    applier.apply(manifest_for(a1, d1, dest=dest, sync_strategy=SyncStrategy.RSYNC), "r1", ENV)
    (applier.resolve(dest) / "app.pid").write_text("123")
    applier.apply(manifest_for(a2, d2, dest=dest, sync_strategy=SyncStrategy.RSYNC, excludes=("*.pid",)), "r2", ENV)
    target = applier.resolve(dest)
    assert (target / "index.html").read_text() == "v2"
    assert not (target / "old.txt").exists()
    assert (target / "app.pid").exists()  # excluded from --delete, as in stretcher
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".incoming")]


def test_mv_strategy_moves_the_release_into_a_fresh_dest(tmp_path: Path, applier: Applier) -> None:
    artifact, digest = release(tmp_path, "r1", {"index.html": "v1"})
    applier.apply(manifest_for(artifact, digest, dest="/srv/mv", sync_strategy=SyncStrategy.MV), "r1", ENV)
    assert (applier.resolve("/srv/mv") / "index.html").read_text() == "v1"
    with pytest.raises(ActivationFailed, match="needs dest /srv/mv not to exist"):
        applier.apply(manifest_for(artifact, digest, dest="/srv/mv", sync_strategy=SyncStrategy.MV), "r1", ENV)


def test_a_release_dir_not_recorded_as_this_artifact_is_fetched_again(tmp_path: Path, applier: Applier) -> None:
    artifact, digest = release(tmp_path, "r1", {"index.html": "the real one"})
    impostor = current(applier).parent / "releases" / "r1"
    impostor.mkdir(parents=True)
    (impostor / "index.html").write_text("left over by hand")
    result = applier.apply(manifest_for(artifact, digest), "r1", ENV)
    assert not result.reused
    assert (current(applier) / "index.html").read_text() == "the real one"


def test_a_zstd_artifact_is_applied(tmp_path: Path, applier: Applier) -> None:
    import hashlib
    import io
    import tarfile

    import zstandard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        data = b"compressed with zstd"
        info = tarfile.TarInfo("index.html")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    compressed = zstandard.ZstdCompressor().compress(raw.getvalue())
    artifact = tmp_path / "r1.tar.zst"
    artifact.write_bytes(compressed)
    applier.apply(manifest_for(artifact, hashlib.sha256(compressed).hexdigest()), "r1", ENV)
    assert (current(applier) / "index.html").read_text() == "compressed with zstd"


def test_a_failing_health_check_rolls_back_and_reports_its_output(tmp_path: Path, applier: Applier) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
    a2, d2 = release(tmp_path, "r2", {"index.html": "v2"})
    applier.apply(manifest_for(a1, d1), "r1", ENV)
    attempts = tmp_path / "attempts"
    check = HealthCheck(command=f"echo try >> {attempts}; echo unhealthy; exit 1", retries=3, interval=0.01)
    with pytest.raises(HealthCheckFailed, match="health check failed 3 time") as info:
        applier.apply(manifest_for(a2, d2, health=check), "r2", ENV)
    assert "unhealthy" in info.value.output_tail
    assert attempts.read_text().count("try") == 3
    assert (current(applier) / "index.html").read_text() == "v1"


@pytest.mark.parametrize("proxy", [False, True], ids=["no proxy", "an HTTP_PROXY that refuses every connection"])
def test_an_http_health_check_passes_on_2xx_of_this_machines_loopback_never_through_a_proxy(
    tmp_path: Path, applier: Applier, monkeypatch: pytest.MonkeyPatch, proxy: bool
) -> None:
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from deployer.local.emulator import free_port

    if proxy:  # nothing listens there: a check sent to it would fail
        proxied_through(monkeypatch, f"http://127.0.0.1:{free_port()}")
        # urlopen's opener reads the environment once, when first built; an agent's is built after
        # its environment was set, as this one is now.
        monkeypatch.setattr(urllib.request, "_opener", None)

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
        applier.apply(manifest_for(a1, d1, health=HealthCheck(http=f"{base}/health")), "r1", ENV)
        a2, d2 = release(tmp_path, "r2", {"index.html": "v2"})
        with pytest.raises(HealthCheckFailed, match="health check failed"):
            applier.apply(
                manifest_for(a2, d2, health=HealthCheck(http=f"{base}/broken", retries=2, interval=0.01)), "r2", ENV
            )
        assert (current(applier) / "index.html").read_text() == "v1"
    finally:
        server.shutdown()
        server.server_close()


def test_an_unconfirmed_deploy_is_staged_but_nothing_of_it_takes_effect(tmp_path: Path, applier: Applier) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
    a2, d2 = release(tmp_path, "r2", {"index.html": "v2"})
    applier.apply(manifest_for(a1, d1), "r1", ENV)
    ran = tmp_path / "hooks-ran"
    hooks = Commands(pre=(Hook(f"touch {ran}"),), failure=(Hook(f"touch {ran}"),))
    staged_when_asked: list[list[str]] = []
    releases = current(applier).parent / "releases"
    impostor = releases / "r2"
    impostor.mkdir()  # unrecorded: replaced by a confirmed download, left alone by an unconfirmed one

    def refuse() -> None:
        staged_when_asked.append(sorted(p.name for p in releases.iterdir() if p.name.startswith(".incoming")))
        raise RejectedInput("history does not confirm it")

    with pytest.raises(RejectedInput, match="history"):
        applier.apply(manifest_for(a2, d2, commands=hooks), "r2", ENV, confirm=Confirmation(refuse))
    assert len(staged_when_asked) == 1
    assert len(staged_when_asked[0]) == 1
    assert impostor.is_dir()
    assert not any(impostor.iterdir())
    assert not any(p.name.startswith(".incoming") for p in releases.iterdir())
    assert (current(applier) / "index.html").read_text() == "v1"
    assert not ran.exists()  # neither its pre hooks nor its failure hooks


def test_a_failure_before_confirmation_runs_failure_hooks_only_once_confirmed(tmp_path: Path, applier: Applier) -> None:
    a1, _ = release(tmp_path, "r1", {"index.html": "v1"})
    ran = tmp_path / "failure-ran"
    order: list[str] = []

    def confirm() -> None:
        order.append("confirmed" if not ran.exists() else "too late")

    bad = manifest_for(a1, "f" * 64, commands=Commands(failure=(Hook(f"touch {ran}"),)))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        applier.apply(bad, "r1", ENV, confirm=Confirmation(confirm))
    assert order == ["confirmed"]
    assert ran.exists()


def test_a_reused_release_is_confirmed_before_its_hooks(tmp_path: Path, applier: Applier) -> None:
    a1, d1 = release(tmp_path, "r1", {"index.html": "v1"})
    applier.apply(manifest_for(a1, d1), "r1", ENV)
    ran = tmp_path / "pre-ran"

    def refuse() -> None:
        raise RejectedInput("history does not confirm it")

    with pytest.raises(RejectedInput):
        applier.apply(
            manifest_for(a1, d1, commands=Commands(pre=(Hook(f"touch {ran}"),))),
            "r1",
            ENV,
            confirm=Confirmation(refuse),
        )
    assert not ran.exists()


def test_a_confirmation_runs_its_check_once_and_repeats_a_refusal_to_everyone_after() -> None:
    calls: list[int] = []

    def refuse() -> None:
        calls.append(1)
        raise RejectedInput("history does not confirm it")

    latch = Confirmation(refuse)
    for _ in range(3):
        with pytest.raises(RejectedInput, match="history does not confirm it"):
            latch.require()
    assert calls == [1]
    assert latch.settled
    passed = Confirmation(lambda: calls.append(2))
    passed.require()
    passed.require()
    assert calls == [1, 2]
