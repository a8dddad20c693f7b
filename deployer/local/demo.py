"""`deployer demo`: the whole path on the embedded emulator, end to end, with real subprocess agents.

Starts moto on 127.0.0.1 (or uses an emulator already running there, such as LocalStack, given
as `endpoint_url`), creates the bucket and topic, starts N agents (each with its own root and
state directory), publishes two releases and watches every agent converge, then boots one more
agent after the fact to show boot replay, and stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from deployer.aws.clients import make_clients
from deployer.aws.reports import ReportEntry, ReportReader
from deployer.local.emulator import Emulator
from deployer.local.loopback import install_loopback_guard
from deployer.protocol.errors import DeployerError
from deployer.protocol.layout import Layout
from deployer.protocol.manifest import Commands, Hook, Manifest, SyncStrategy
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState
from deployer.protocol.trust import DEPLOY_ROLE, TRUST_ROLE, Role, Trust
from publisher.fleet import fleet_rows, format_table, summary
from publisher.infra import init_resources
from publisher.publish import Publisher, ci_origin
from publisher.signing import FileSigner, keygen

BUCKET = "deployer-demo"
STAGE, ROLE, COMPONENT = "demo", "web", "site"
REGION = "us-east-1"
CONVERGE_TIMEOUT_SECONDS = 30.0
#: Short long-poll so agents stop within a couple of seconds of SIGTERM; production uses 20.
DEMO_POLL_WAIT_SECONDS = 2

Echo = Callable[[str], None]


def run_demo(agents: int = 3, workdir: Path | None = None, echo: Echo = print, endpoint_url: str | None = None) -> None:
    """`endpoint_url`: an emulator already running on loopback (its bucket and topic are made if
    missing), instead of starting moto here; it is left running."""
    install_loopback_guard()  # the demo talks to the emulator on 127.0.0.1 and nothing else
    started = time.monotonic()
    with _workdir(workdir) as root, _emulator(root, endpoint_url) as url:
        os.environ.update(
            AWS_ENDPOINT_URL=url,
            # LocalStack checks presigned URLs of keys it does not know against the secret "test".
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",  # noqa: S106 - the emulators accept these
            AWS_REGION=REGION,
            AWS_EC2_METADATA_DISABLED="true",
        )
        echo(f"emulator: {url if endpoint_url else 'moto server on ' + url} (logs in {root})")
        clients = make_clients(REGION, url)
        topic_arn = init_resources(clients, BUCKET, "deployer-demo").topic_arn
        echo(f"init: bucket {BUCKET}, topic {topic_arn}")
        layout = Layout()
        signer, trust = _release_key(root)
        echo(f"keys: release key {signer.keyid[:12]}… (Ed25519, {root / 'release.pem'}); agents require its signature")
        publisher = Publisher(clients, BUCKET, topic_arn, layout, signers=[signer])
        channel = Channel(STAGE, ROLE, COMPONENT)
        processes: list[subprocess.Popen[bytes]] = []
        try:
            for index in range(1, agents + 1):
                processes.append(_start_agent(root, index, topic_arn, trust))
            reader = ReportReader(clients.s3, BUCKET, layout)
            _wait(lambda: len(reader.refresh()) >= agents, "agents to boot", processes, root)
            echo(f"agents: {agents} started and subscribed ({time.monotonic() - started:.1f}s since start)")

            for version in (1, 2):
                build = _sample_release(root, version)
                artifact = shutil.make_archive(str(root / f"site-v{version}"), "gztar", build)
                t0 = time.monotonic()
                deploy = publisher.publish(channel, Path(artifact), template=_template(), origin=ci_origin()).deploy
                echo(f"publish: {channel} release {deploy.release_id} as seq {deploy.seq}")
                seq = deploy.seq
                _wait(lambda: _converged(reader, seq, agents), f"seq {seq}", processes, root)  # noqa: B023
                echo(f"converged: {agents}/{agents} agents on seq {deploy.seq} in {time.monotonic() - t0:.2f}s")

            t0 = time.monotonic()
            processes.append(_start_agent(root, agents + 1, topic_arn, trust))
            _wait(lambda: _converged(reader, seq, agents + 1), "the late agent", processes, root)
            echo(
                f"boot replay: agent {agents + 1}, started after the publish, converged in {time.monotonic() - t0:.2f}s"
            )

            for index in range(1, agents + 2):
                served = (root / f"agent-{index}" / "root" / "srv" / "site" / "current" / "index.html").read_text()
                if "release 2" not in served:
                    raise DeployerError(f"agent {index} serves {served!r}, not release 2")
            echo("")
            rows = fleet_rows(reader.refresh().values())
            echo(format_table(rows))
            echo("")
            for line in summary(rows):
                echo(line)
        finally:
            _stop_all(processes)
        stopped = "agents stopped" if endpoint_url else "agents and emulator stopped"
        echo(f"\ndemo finished in {time.monotonic() - started:.1f}s; {stopped}")


@contextlib.contextmanager
def _emulator(root: Path, endpoint_url: str | None) -> Iterator[str]:
    """The emulator's URL: `endpoint_url` as given, or a moto started here and stopped after."""
    if endpoint_url:
        yield endpoint_url.rstrip("/")
        return
    with Emulator(log_path=root / "moto.log") as emulator:
        yield emulator.url


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="deployer-demo-") as tmp:
        yield Path(tmp)


def _template() -> Manifest:
    return Manifest(
        dest="/srv/site/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(
            pre=(Hook('echo "installing $DEPLOYER_RELEASE_ID (seq $DEPLOYER_SEQ)"'),),
            post=(Hook('test -f "$DEPLOYER_RELEASE_DIR/index.html"'),),
            success=(Hook('cat > "$DEPLOYER_RELEASE_DIR/../../last-deploy.log"'),),
        ),
    )


def _sample_release(root: Path, version: int) -> Path:
    build = root / f"build-v{version}"
    build.mkdir(exist_ok=True)
    (build / "index.html").write_text(f"<h1>demo site, release {version}</h1>\n")
    (build / "app.py").write_text(f"VERSION = {version}\n")
    return build


def _release_key(root: Path) -> tuple[FileSigner, Path]:
    """A signing key for the demo's CI, and the trust file its agents verify with."""
    key = keygen(root / "release.pem")
    role = Role(frozenset({key.keyid}), 1)
    trust = root / "trust.json"
    trust.write_text(Trust(1, {key.keyid: key}, {DEPLOY_ROLE: role, TRUST_ROLE: role}).to_json())
    return FileSigner(root / "release.pem"), trust


def _start_agent(root: Path, index: int, topic_arn: str, trust: Path) -> subprocess.Popen[bytes]:
    home = root / f"agent-{index}"
    home.mkdir(exist_ok=True)
    config = {
        "stage": STAGE,
        "role": ROLE,
        "components": [COMPONENT],
        "bucket": BUCKET,
        "topic_arn": topic_arn,
        "region": REGION,
        "instance_id": f"i-demo{index:012d}",
        "root_dir": str(home / "root"),
        "state_dir": str(home / "state"),
        "poll_wait_seconds": DEMO_POLL_WAIT_SECONDS,
        "trust_file": str(trust),
        "require_signatures": True,
    }
    (home / "agent.yml").write_text(yaml.safe_dump(config))
    with open(home / "agent.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "deployer", "agent", "--config", str(home / "agent.yml"), "--log-json"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _converged(reader: ReportReader, seq: int, count: int) -> bool:
    return sum(1 for entry in reader.refresh().values() if _on(entry, seq)) >= count


def _on(entry: ReportEntry, seq: int) -> bool:
    status = entry.report.components.get(COMPONENT) if entry.report else None
    return status is not None and status.seq == seq and status.state is ComponentState.OK


def _wait(done: Callable[[], bool], what: str, processes: list[subprocess.Popen[bytes]], root: Path) -> None:
    deadline = time.monotonic() + CONVERGE_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if done():
            return
        dead = [p.args for p in processes if p.poll() is not None]
        if dead:
            raise DeployerError(f"an agent exited while waiting for {what}: {dead}; see {root}/agent-*/agent.log")
        time.sleep(0.05)
    raise DeployerError(
        f"timed out after {CONVERGE_TIMEOUT_SECONDS:.0f}s waiting for {what}; see {root}/agent-*/agent.log"
    )


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=DEMO_POLL_WAIT_SECONDS + 10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
