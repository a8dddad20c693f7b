"""`deployer status --html/--upload`, end to end: reports written by the agent's own writer and
pointers moved by the real publisher in the emulator, the page rendered by the CLI, then loaded
by headless Chromium that can reach nothing (every name resolves to NOTFOUND, every request
goes to a closed loopback port).

The sample fleet of `test_the_sample_fleet_page_shows_waves_stale_behind_and_failures` is the
one in docs/fleet-page.png: `scripts/fleet-page-screenshot` runs that test and copies its
screenshot there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deployer.agent.reporter import StatusReporter
from deployer.aws.reports import ReportReader
from deployer.cli import main
from deployer.protocol.deploy import Deploy
from deployer.protocol.layout import ReportKey
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState, ComponentStatus
from deployer.protocol.rollout import STABLE_SUFFIX
from publisher.publish import Publisher
from publisher.rollout import Gates, Staging, prepare
from tests.support import BUCKET, FAST_POLICY, Fleet, artifact, cli, publish_on, release_template, silent_publisher

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run does)"
)
#: Screenshots are kept here for a person to look at after the run (build/ is gitignored).
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>document.title='pwned'</script>"
BREAKOUT = '"><img src=x onerror="document.body.dataset.pwned=\'1\'">'
WEB = [f"i-0a1b2c3d4e5f607{n:02d}" for n in range(1, 7)]
WORKER = [f"i-0f9e8d7c6b5a403{n:02d}" for n in range(1, 5)]


def chromium(page: Path, profile: Path, closed_port: int, *args: str) -> str:
    """Run headless Chromium on a local file; its stdout. Nothing it starts outlives the call."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--disable-breakpad",
        "--no-pings",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--proxy-server=http://127.0.0.1:{closed_port}",
        f"--user-data-dir={profile}",
        *args,
        page.as_uri(),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with_group_gone(proc.pid)
    assert proc.returncode == 0, err
    return out


def with_group_gone(pgid: int) -> None:
    """Chromium forks helpers (zygote, crashpad) into its own session: end them with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR comes first
    return width, height


def screenshot(page: Path, tmp_path: Path, closed_port: int, name: str, height: int = 900) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / name
    shot.unlink(missing_ok=True)
    chromium(
        page,
        tmp_path / "profile-shot",
        closed_port,
        "--hide-scrollbars",
        f"--window-size=1280,{height}",
        f"--screenshot={shot}",
    )
    assert png_size(shot) == (1280, height)
    assert shot.stat().st_size > 20_000, "a blank page compresses to a few KB"
    return shot


def reporter(fleet: Fleet, role: str, instance: str, components: tuple[str, ...]) -> StatusReporter:
    who = ReportKey("prod", role, instance)
    return StatusReporter(fleet.clients.s3, fleet.bucket, fleet.layout, who, components, FAST_POLICY)


def render(tmp_path: Path) -> Path:
    page = tmp_path / "fleet.html"
    result = cli("status", "--bucket", BUCKET, "--html", str(page))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {page} (")
    return page


@needs_chromium
def test_an_injected_script_in_a_report_is_shown_as_text_and_never_runs_in_the_browser(
    fleet: Fleet, tmp_path: Path, closed_port: int
) -> None:
    publisher = silent_publisher(fleet)
    deploy = publish_on(publisher, Channel("prod", "web", "api"), artifact(tmp_path, "a", "v1"), "rel-1")
    done = dict(seq=deploy.seq, release_id=deploy.release_id, deploy_id=deploy.deploy_id)
    reporter(fleet, "web", WEB[0], ("api",)).update("api", state=ComponentState.OK, **done)
    # A hook's output ends up in the error: whatever a release prints, an instance reports.
    reporter(fleet, "web", WEB[1], ("api",)).update("api", state=ComponentState.FAILED, error=SCRIPT + BREAKOUT, **done)

    page = render(tmp_path)
    dom = chromium(page, tmp_path / "profile", closed_port, "--dump-dom")

    assert f"<title>fleet s3://{BUCKET}/deployer</title>" in dom  # the injected script did not retitle it
    assert "<script" not in dom
    assert "<img" not in dom
    assert "data-pwned" not in dom  # the onerror handler did not run either
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom  # shown as text
    assert WEB[0] in dom
    assert WEB[1] in dom
    assert 'class="k-failed"' in dom
    assert 'class="k-ok"' in dom
    screenshot(page, tmp_path, closed_port, "fleet-page-injection.png", height=500)


def sample_fleet(fleet: Fleet, tmp_path: Path) -> None:
    """Two roles, three components, ten instances: a staged rollout at wave 0 (one instance on the
    candidate, the rest waiting), one failed with an error, one applying, one stale, one behind."""
    publisher = silent_publisher(fleet)
    api, assets, jobs = (
        Channel("prod", "web", "api"),
        Channel("prod", "web", "assets"),
        Channel("prod", "worker", "jobs"),
    )
    api1 = publish_on(publisher, api, artifact(tmp_path, "api1", "1"), "20261120T101500Z-77aa01c")
    assets1 = publish_on(publisher, assets, artifact(tmp_path, "assets1", "1"), "20261126T013000Z-5d1e0b2")
    jobs1 = publish_on(publisher, jobs, artifact(tmp_path, "jobs1", "1"), "20261125T220000Z-c0ffee1")
    jobs2 = publish_on(publisher, jobs, artifact(tmp_path, "jobs2", "2"), "20261126T014500Z-9b8e7d6")

    def on(deploy: Deploy) -> dict[str, Any]:
        return {"seq": deploy.seq, "release_id": deploy.release_id, "deploy_id": deploy.deploy_id}

    web = {instance: reporter(fleet, "web", instance, ("api", "assets")) for instance in WEB}
    for instance, agent in web.items():
        agent.seed("api", ComponentStatus(state=ComponentState.OK, **on(api1)))
        if instance == WEB[3]:
            agent.update(
                "assets",
                state=ComponentState.FAILED,
                error="hook post `./bin/warm-cache` exited 3: curl: (7) Failed to connect to cdn-origin.internal "
                "port 443 after 3 attempts: Connection refused",
                **on(assets1),
            )
        elif instance == WEB[4]:
            agent.update("assets", state=ComponentState.APPLYING, **on(assets1))
        else:
            agent.update("assets", state=ComponentState.OK, **on(assets1))
    gone = web.pop(WEB[5])  # terminated three hours ago without gc: its last heartbeat stays
    fleet.clients.s3.put_object(
        Bucket=fleet.bucket, Key=gone.key, Body=gone.report(datetime.now(UTC) - timedelta(hours=3)).to_json()
    )
    for instance in WORKER[:3]:
        reporter(fleet, "worker", instance, ("jobs",)).update("jobs", state=ComponentState.OK, **on(jobs2))
    reporter(fleet, "worker", WORKER[3], ("jobs",)).update(
        "jobs", state=ComponentState.OK, last_error="manifest sha256 3f2a… does not match the deploy's", **on(jobs1)
    )

    entries = {
        who.instance_id: e for who, e in ReportReader(fleet.clients.s3, fleet.bucket, fleet.layout).refresh().items()
    }
    staging = prepare(publisher, api, Gates(waves=("1", "50%", "100%")), entries)
    staged = stage(publisher, api, tmp_path, staging)
    assert staged.rollout is not None
    for instance, agent in web.items():
        if instance in staged.rollout.first:
            agent.update("api", state=ComponentState.OK, **on(staged))
        else:
            agent.update(
                "api",
                state=ComponentState.WAITING,
                seq=staged.seq,
                release_id=api1.release_id,
                deploy_id=staged.deploy_id + STABLE_SUFFIX,
            )


def stage(publisher: Publisher, channel: Channel, tmp_path: Path, staging: Staging) -> Deploy:
    """Publish the channel's next release as a staged rollout (its first cursor at wave 0)."""
    template = replace(release_template(), dest=f"/opt/{channel.component}/current")
    path = artifact(tmp_path, "api2", "2")
    return publisher.publish(
        channel, path, template=template, release_id="20261126T015012Z-3f2a9c1", staged=staging
    ).deploy


@needs_chromium
def test_the_sample_fleet_page_shows_waves_stale_behind_and_failures(
    fleet: Fleet, tmp_path: Path, closed_port: int
) -> None:
    sample_fleet(fleet, tmp_path)
    page = render(tmp_path)
    dom = chromium(page, tmp_path / "profile", closed_port, "--dump-dom")

    for instance in WEB + WORKER:
        assert instance in dom
    assert re.search(r"rolling at wave 0/2 \(driver [^<]+\)</p>", dom)
    assert "<td>wave 0</td><td>1</td><td>admitted</td><td>1</td><td>1</td><td>0</td><td>0</td>" in dom
    assert "<td>wave 2</td><td>100%</td><td>not yet</td>" in dom
    assert 'class="wave">wave 0</span>' in dom
    assert dom.count('class="k-waiting"') == 4
    assert dom.count('class="k-stale"') == 2  # both components of the silent instance
    assert dom.count('class="tag">stale</span>') == 1
    assert dom.count('class="k-behind"') == 1
    assert "ok · behind 2" in dom
    assert dom.count('class="k-failed"') == 1
    assert "Failed to connect to cdn-origin.internal" in dom
    assert dom.count('class="k-applying"') == 1
    assert "prod/worker/jobs: 3/4 on seq 2, 0 failed, 1 behind" in dom
    shot = screenshot(page, tmp_path, closed_port, "fleet-page.png", height=1000)
    assert shot.stat().st_size < 200_000  # small enough for docs/fleet-page.png


def test_upload_puts_the_page_beside_the_reports_as_uncached_html_where_no_reader_takes_it_for_one(
    fleet: Fleet,
) -> None:
    reporter(fleet, "web", WEB[0], ("api",)).update("api", state=ComponentState.OK, seq=1, release_id="rel-1")
    result = cli("status", "--bucket", BUCKET, "--upload")
    assert result.returncode == 0, result.stderr
    key = fleet.layout.fleet_page_key()
    assert result.stdout.startswith(f"uploaded s3://{BUCKET}/{key} (1 instance(s), ")
    head = fleet.clients.s3.head_object(Bucket=BUCKET, Key=key)
    assert (head["ContentType"], head["CacheControl"]) == ("text/html; charset=utf-8", "no-cache")
    body = fleet.clients.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    assert body.startswith("<!DOCTYPE html>")
    assert WEB[0] in body
    assert fleet.layout.report_key(key) is None
    assert not key.startswith(fleet.layout.status_prefix())
    assert [who.instance_id for who in ReportReader(fleet.clients.s3, BUCKET, fleet.layout).refresh()] == [WEB[0]]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--html", "x.html", "--json"), "choose one"),
        (("--upload", "--stage", "prod"), "replaces the whole fleet's page"),
    ],
)
def test_the_page_flags_refuse_what_would_mislead(flags: tuple[str, ...], message: str) -> None:
    result = CliRunner().invoke(main, ["status", "--bucket", BUCKET, "--region", "us-east-1", *flags])
    assert result.exit_code == 2
    assert message in result.output
