"""An instance from the image, minus EC2: the units' own commands, run from the provisioned root.

The config goes where cloud-init would write it, ExecStartPre prepares the component
directories, `deployer boot` (deployer-boot.service) converges, and `deployer agent`
(deployer-agent.service) follows new releases, all against the emulator.
"""

from __future__ import annotations

import getpass
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deployer.protocol.deploy import Deploy
from tests.provision.conftest import Provisioned, run
from tests.support import AgentProcess, Fleet, wait_until

pytestmark = pytest.mark.e2e

COMPONENTS = ["provision", "api"]


class InstanceFromImage(AgentProcess):
    """One instance: config in its own /etc/deployer, releases and state under its own root."""

    def __init__(self, fleet: Fleet, image: Provisioned, home: Path, instance_id: str) -> None:
        instance_root = home / "instance"
        super().__init__(
            fleet,
            home / "etc-deployer",
            instance_id,
            components=COMPONENTS,
            root_dir=str(instance_root),
            state_dir=str(instance_root / "var/lib/deployer"),
        )
        self.image = image
        self.root = instance_root
        self.config_dir = self.home

    def command(self, verb: str = "agent") -> list[str]:
        (argv,) = self.image.unit_commands(f"deployer-{verb}.service", "ExecStart", self.config_dir)
        return argv

    def prepare(self) -> subprocess.CompletedProcess[str]:
        (argv,) = self.image.unit_commands("deployer-boot.service", "ExecStartPre", self.config_dir)
        # The unit runs it as root for the deployer user; here the test's user plays both.
        return run([*argv, getpass.getuser()], cwd=self.root.parent)

    def boot(self) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        prepared = self.prepare()
        assert prepared.returncode == 0, prepared.stdout + prepared.stderr
        result = self.run_once("boot")
        return result, time.monotonic() - started


def test_the_units_commands_point_at_the_installed_agent(provisioned: Provisioned, tmp_path: Path) -> None:
    (argv,) = provisioned.unit_commands("deployer-agent.service", "ExecStart", tmp_path)
    assert argv == [
        str(provisioned.venv / "bin/deployer"),
        "agent",
        "--config",
        str(tmp_path / "agent.yml"),
        "--log-json",
    ]


def test_an_instance_from_the_image_converges_at_boot_then_follows_new_releases(
    fleet: Fleet, provisioned: Provisioned, publish: Callable[..., Deploy], tmp_path: Path
) -> None:
    provision = publish("packages installed", component="provision")
    first = publish("api 1", component="api")
    instance = InstanceFromImage(fleet, provisioned, tmp_path, "i-0image0000000001")

    result, _ = instance.boot()
    assert result.returncode == 0, result.stderr
    for component in COMPONENTS:
        assert (instance.root / "opt" / component).is_dir()
    assert instance.served("provision") == "packages installed"
    assert instance.served("api") == "api 1"
    assert instance.on_seq(provision.seq, "provision")
    assert instance.on_seq(first.seq, "api")

    instance.start()
    try:
        wait_until(lambda: bool(instance.events("agent_serving")) or not instance.alive(), "the agent to serve")
        assert instance.alive(), instance.log_path.read_text()
        second = publish("api 2", component="api")
        wait_until(lambda: instance.on_seq(second.seq, "api"), "the installed agent on api seq 2")
    finally:
        assert instance.stop() == 0
    assert instance.served("api") == "api 2"
    # Boot applied the first release, the running agent the second; nothing twice.
    assert instance.hook_runs("api") == [first.deploy_id, second.deploy_id]
    assert instance.hook_runs("provision") == [provision.deploy_id]


def test_an_instance_from_an_image_with_seeded_releases_boots_without_downloading_them(
    fleet: Fleet, provisioned: Provisioned, publish: Callable[..., Deploy], tmp_path: Path
) -> None:
    publish("packages installed", component="provision")
    latest = publish("api 1", component="api")
    cold = InstanceFromImage(fleet, provisioned, tmp_path / "cold", "i-0image0000000002")
    booted, cold_seconds = cold.boot()
    assert booted.returncode == 0, booted.stderr
    # The Packer builder seeds both components into the image with the image's own deployer.
    image = InstanceFromImage(fleet, provisioned, tmp_path / "image", "i-0image0000000003")
    before = _fleet_registrations(fleet)
    for component in COMPONENTS:
        seeded = run(
            [str(provisioned.venv / "bin/deployer"), "seed", "--bucket", fleet.bucket, "--stage", "prod",
             "--role", "web", "--component", component, "--root-dir", str(image.root)],
        )  # fmt: skip
        assert seeded.returncode == 0, seeded.stderr
        assert "downloaded and verified" in seeded.stdout
    assert _fleet_registrations(fleet) == before  # the builder left no queue, subscription or report
    assert not (image.root / "var/lib/deployer").exists()  # and no state: nothing says a deploy happened
    assert not (image.root / "opt/api/current").exists()
    warm, warm_seconds = image.boot()
    assert warm.returncode == 0, warm.stderr
    assert image.served("api") == "api 1"
    assert image.on_seq(latest.seq, "api")
    events = warm.stderr
    assert events.count('"event": "release_reused"') == 2, events[-3000:]  # zero artifact download
    assert '"event": "release_extracted"' not in events
    assert image.hook_runs("api") == [latest.deploy_id]  # its hooks ran: the app starts as after any deploy
    print(f"\nboot to converged, 2 components: cold {cold_seconds:.2f}s, seeded image {warm_seconds:.2f}s")


def _fleet_registrations(fleet: Fleet) -> tuple[list[str], list[str], list[str]]:
    queues = fleet.clients.sqs.list_queues().get("QueueUrls", [])
    subscriptions = fleet.clients.sns.list_subscriptions_by_topic(TopicArn=fleet.topic_arn)["Subscriptions"]
    endpoints = sorted(s.get("Endpoint", "") for s in subscriptions)
    listed = fleet.clients.s3.list_objects_v2(Bucket=fleet.bucket, Prefix=fleet.layout.key("status") + "/")
    return sorted(queues), endpoints, sorted(o["Key"] for o in listed.get("Contents", []))
