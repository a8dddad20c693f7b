"""`deployer apply`, stretcher's one-shot, as a real subprocess; and crash safety under SIGKILL."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deployer.protocol.deploy import Deploy
from deployer.protocol.manifest import Commands, Hook, Manifest, SyncStrategy
from publisher.pack import pack_directory
from tests.faultproxy import FaultProxy
from tests.support import BUCKET, make_tree


def deployer_apply(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deployer", "apply", "--log-json", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_manifest_url_on_stdin_is_applied_like_stretcher_through_a_flaky_network(
    tmp_path: Path, publish: Callable[..., Deploy], flaky: FaultProxy
) -> None:
    deploy = publish("from stdin")
    url = f"s3://{BUCKET}/{deploy.manifest_key}"
    root, state = tmp_path / "root", tmp_path / "state"
    where = ("--root-dir", str(root), "--state-dir", str(state), "--endpoint-url", flaky.url)
    for _ in range(4):  # every run fetches the manifest (the first the artifact too), each over the flaky network
        result = deployer_apply(*where, stdin=url + "\n")
        assert result.returncode == 0, result.stderr
        assert (root / "opt" / "api" / "current" / "index.html").read_text() == "from stdin"
    assert flaky.injured > 0
    assert result.returncode == 0, result.stderr
    assert (root / "opt" / "api" / "current" / "index.html").read_text() == "from stdin"

    # The Consul-event form of stdin, as `consul watch -type event` hands it to its handler.
    second = publish("from consul")
    events = json.dumps(
        [{"ID": "1", "Payload": base64.b64encode(f"s3://{BUCKET}/{second.manifest_key}".encode()).decode()}]
    )
    result = deployer_apply(*where, stdin=events)
    assert result.returncode == 0, result.stderr
    assert (root / "opt" / "api" / "current" / "index.html").read_text() == "from consul"


def test_a_failing_apply_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.yml"
    manifest.write_text("commands:\n  pre: ['echo about to fail', 'exit 9']\n")
    result = deployer_apply(
        "--manifest", manifest.as_uri(), "--root-dir", str(tmp_path), "--state-dir", str(tmp_path / "s")
    )
    assert result.returncode == 1
    assert "pre hook #1 exited 9" in result.stderr


def test_a_missing_manifest_is_an_error_not_a_hang(tmp_path: Path) -> None:
    result = deployer_apply("--manifest", (tmp_path / "nope.yml").as_uri(), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 1
    assert "cannot open" in result.stderr


def test_an_http_manifest_is_refused_unless_allowed_by_flag_or_config(tmp_path: Path) -> None:
    (tmp_path / "manifest.yml").write_text("commands:\n  post: ['echo applied over plain http']\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().split(" port ")[1].split()[0]
        url = f"http://127.0.0.1:{port}/manifest.yml"
        common = ("--manifest", url, "--root-dir", str(tmp_path), "--state-dir", str(tmp_path / "s"))
        refused = deployer_apply(*common)
        assert refused.returncode == 1
        assert f"refusing the http:// manifest URL {url}" in refused.stderr
        assert "--allow-http" in refused.stderr
        assert deployer_apply(*common, "--allow-http").returncode == 0
        config = tmp_path / "agent.yml"
        topic = "arn:aws:sns:us-east-1:123456789012:t"
        config.write_text(
            "{stage: prod, role: web, components: [api], bucket: b-1, "
            f"topic_arn: '{topic}', allow_http_manifests: true, state_dir: {tmp_path / 's'}, root_dir: {tmp_path}}}"
        )
        by_config = deployer_apply("--manifest", url, "--config", str(config))
        assert by_config.returncode == 0, by_config.stderr
    finally:
        server.terminate()
        server.communicate(timeout=10)


# -- crash safety -------------------------------------------------------------------------------

KILLS = 32
#: The kills run as this many tests of KILLS // KILL_BATCHES kills each, so pytest-xdist spreads
#: them over its workers (one test of 32 took ~100 s of a 120 s test timeout on a busy machine);
#: every batch calibrates itself and kills at its share of the same 32 instants.
KILL_BATCHES = 4


def _tree(seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    files = {
        f"lib/mod{i:03d}.py": f"# release {seed}\n" + "".join(rng.choice("abcdefgh \n") for _ in range(6000))
        for i in range(300)
    }
    files["index.html"] = f"release {seed}"
    return files


def _write_manifest(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    artifact = pack_directory(make_tree(tmp_path / f"build-{name}", files), tmp_path / f"{name}.tar.zst").path
    manifest = Manifest(
        src=artifact.as_uri(),
        checksum=hashlib.sha256(artifact.read_bytes()).hexdigest(),
        dest="/opt/app/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(pre=(Hook("sleep 0.05"),), post=(Hook("sleep 0.2"),), success=(Hook("sleep 0.1"),)),
    )
    path = tmp_path / f"{name}.yml"
    path.write_text(manifest.to_yaml())
    return path


def _complete(current: Path, files: dict[str, str]) -> bool:
    return all((current / name).is_file() and (current / name).read_text() == text for name, text in files.items())


@pytest.mark.parametrize("batch", range(KILL_BATCHES))
def test_sigkill_at_any_instant_leaves_a_complete_release_and_a_rerun_converges(tmp_path: Path, batch: int) -> None:
    old_files, new_files = _tree(1), _tree(2)
    old_manifest, new_manifest = (
        _write_manifest(tmp_path, "old", old_files),
        _write_manifest(tmp_path, "new", new_files),
    )
    baseline = tmp_path / "baseline"
    assert deployer_apply("--manifest", old_manifest.as_uri(), "--root-dir", str(baseline / "root"),
                          "--state-dir", str(baseline / "state")).returncode == 0  # fmt: skip

    def start(home: Path) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "deployer", "apply", "--manifest", new_manifest.as_uri(),
                   "--root-dir", str(home / "root"), "--state-dir", str(home / "state")]  # fmt: skip
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    # Calibrate: how long an uninterrupted apply of the new release takes here, start to exit.
    calibration = tmp_path / "calibration"
    shutil.copytree(baseline, calibration, symlinks=True)
    began = time.monotonic()
    assert start(calibration).wait(60) == 0
    duration = time.monotonic() - began
    # Killing during interpreter start-up proves little; spread the kills over the apply itself
    # (fetch, extraction, hooks, activation, state write), from just before it begins.
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "deployer", "--version"], capture_output=True, check=True)
    startup = time.monotonic() - began

    rng = random.Random(20261126)
    instants = [rng.random() for _ in range(KILLS)]  # where in [start-up, the whole apply] each kill lands
    per_batch = KILLS // KILL_BATCHES
    outcomes = {"old": 0, "new": 0}
    for kill in range(batch * per_batch, (batch + 1) * per_batch):
        home = tmp_path / f"kill-{kill}"
        shutil.copytree(baseline, home, symlinks=True)
        process = start(home)
        time.sleep(startup * 0.9 + (duration * 1.05 - startup * 0.9) * instants[kill])
        os.killpg(process.pid, signal.SIGKILL)  # the apply and any hook it was running
        process.wait(10)
        current = home / "root" / "opt" / "app" / "current"
        target = os.readlink(current)
        if _complete(current, old_files):
            outcomes["old"] += 1
        else:
            assert _complete(current, new_files), f"kill {kill}: current -> {target} is not a complete release"
            outcomes["new"] += 1
        # Restart: the same apply runs to completion over whatever the kill left behind.
        rerun = deployer_apply("--manifest", new_manifest.as_uri(), "--root-dir", str(home / "root"),
                               "--state-dir", str(home / "state"))  # fmt: skip
        assert rerun.returncode == 0, f"kill {kill}: {rerun.stderr}"
        assert _complete(current, new_files)
        leftovers = [p.name for p in (current.parent / "releases").iterdir() if p.name.startswith(".incoming")]
        assert leftovers == [], f"kill {kill}: staging left behind: {leftovers}"
        shutil.rmtree(home)
    assert sum(outcomes.values()) == per_batch
    print(
        f"kill outcomes over kills {batch * per_batch}-{kill} of {KILLS} in a {duration:.2f}s apply ({startup:.2f}s start-up): {outcomes}"
    )


def test_a_write_failure_mid_extraction_removes_the_partial_release_and_keeps_current(tmp_path: Path) -> None:
    """Disk full, simulated with RLIMIT_FSIZE: a write past the limit fails with EFBIG, as ENOSPC would."""
    import resource

    old = _write_manifest(tmp_path, "small", {"index.html": "still serving"})
    big_files = {"index.html": "too big", "blob.bin": "x" * (4 * 1024 * 1024)}
    big = _write_manifest(tmp_path, "big", big_files)
    root, state = tmp_path / "root", tmp_path / "state"
    assert (
        deployer_apply("--manifest", old.as_uri(), "--root-dir", str(root), "--state-dir", str(state)).returncode == 0
    )

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployer",
            "apply",
            "--log-json",
            "--manifest",
            big.as_uri(),
            "--root-dir",
            str(root),
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_file_size,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot write release files" in result.stderr
    releases = root / "opt" / "app" / "releases"
    assert sorted(p.name for p in releases.iterdir() if not p.name.startswith(".meta")) == [
        os.readlink(root / "opt" / "app" / "current").split("/")[-1]
    ]
    assert (root / "opt" / "app" / "current" / "index.html").read_text() == "still serving"
