"""Real `deployer agent` subprocesses against the emulator, with helpers to watch them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployer.manifest import Commands, Hook, Manifest, SyncStrategy
from deployer.protocol import Channel, Deploy
from publisher.publish import Publisher
from tests.conftest import BUCKET, REGION, Fleet, make_tree

WAIT_SECONDS = 30.0
#: Every deploy's post hook appends its deploy id here, so tests can count hook runs per agent.
HOOK_LOG = "hooks.log"


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class AgentProcess:
    def __init__(self, fleet: Fleet, home: Path, instance_id: str | None, **overrides: Any) -> None:
        self.fleet = fleet
        self.home = home
        self.instance_id = instance_id
        home.mkdir(parents=True, exist_ok=True)
        self.root = home / "root"
        self.config_path = home / "agent.yml"
        self.log_path = home / "agent.log"
        config: dict[str, Any] = {
            "stage": "prod",
            "role": "web",
            "components": ["api"],
            "bucket": BUCKET,
            "topic_arn": fleet.topic_arn,
            "region": REGION,
            "root_dir": str(self.root),
            "state_dir": str(home / "state"),
            "poll_wait_seconds": 1,
        }
        if instance_id:
            config["instance_id"] = instance_id
        config.update(overrides)
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, verb: str = "agent") -> list[str]:
        return [sys.executable, "-m", "deployer", verb, "--config", str(self.config_path), "--log-json"]

    def start(self) -> AgentProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        return self

    def run_once(self, verb: str = "boot") -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(verb), capture_output=True, text=True, timeout=60, check=False)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"agent {self.instance_id} ignored SIGTERM for 15s") from None
        return self.process.returncode

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text().splitlines() if self.log_path.exists() else []:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def status(self) -> dict[str, Any] | None:
        key = self.fleet.layout.status_key(self.config["stage"], self.config["role"], self.instance_id or "")
        try:
            body = self.fleet.clients.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except self.fleet.clients.s3.exceptions.NoSuchKey:
            return None
        return json.loads(body)  # type: ignore[no-any-return]

    def component(self, name: str = "api") -> dict[str, Any]:
        status = self.status() or {}
        return status.get("components", {}).get(name, {})  # type: ignore[no-any-return]

    def on_seq(self, seq: int, component: str = "api") -> bool:
        status = self.component(component)
        return status.get("seq") == seq and status.get("state") == "ok"

    def served(self, component: str = "api") -> str:
        return (self.root / "opt" / component / "current" / "index.html").read_text()

    def hook_runs(self, component: str = "api") -> list[str]:
        path = self.root / "opt" / component / HOOK_LOG
        return path.read_text().split() if path.exists() else []

    def queue_url(self) -> str:
        name = f"deployer-{self.config['stage']}-{self.config['role']}-{self.instance_id}"
        return self.fleet.clients.sqs.get_queue_url(QueueName=name)["QueueUrl"]


@pytest.fixture
def start_agent(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(instance_id: str | None = None, boot: bool = True, **overrides: Any) -> AgentProcess:
        index = len(started) + 1
        agent = AgentProcess(fleet, tmp_path / f"agent-{index}", instance_id or f"i-e2e{index:013d}", **overrides)
        started.append(agent.start())
        if boot:
            wait_until(lambda: agent.status() is not None or not agent.alive(), f"agent {index} to boot")
            assert agent.alive(), agent.log_path.read_text()
        return agent

    yield start
    codes = {}
    for agent in started:
        if agent.process is not None:
            codes[agent.instance_id] = agent.stop()
    # Every agent must stop cleanly on SIGTERM: exit 0, nothing left running.
    assert all(code == 0 for code in codes.values()), codes


def release_template(post: tuple[Hook, ...] = ()) -> Manifest:
    record = Hook(f'echo "$DEPLOYER_DEPLOY_ID" >> "$DEPLOYER_RELEASE_DIR/../../{HOOK_LOG}"')
    return Manifest(
        dest="/opt/api/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(post=(*post, record)),
    )


@pytest.fixture
def publish(fleet: Fleet, tmp_path: Path) -> Callable[..., Deploy]:
    counter = iter(range(1, 10_000))
    publisher = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)

    def do(text: str | None = None, component: str = "api", post: tuple[Hook, ...] = ()) -> Deploy:
        n = next(counter)
        build = make_tree(tmp_path / f"build-{n}", {"index.html": text or f"release {n}"})
        artifact = tmp_path / f"build-{n}.tar.gz"
        from publisher.pack import pack_directory

        pack_directory(build, artifact)
        template = release_template(post)
        template = Manifest(**{**template.__dict__, "dest": f"/opt/{component}/current"})
        channel = Channel("prod", "web", component)
        return publisher.publish(channel, artifact, template=template, release_id=f"rel-{component}-{n}").deploy

    return do


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deployer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )
