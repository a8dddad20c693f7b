"""deployer-config-from-tags: the agent config from instance tags, read through a fake IMDSv2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deployer.agent.config import load_config
from tests.provision.conftest import SCRIPTS, require_tool, run
from tests.support import FakeImds, serve_imds

TAGS = {
    "deployer:stage": "prod",
    "deployer:role": "web",
    "deployer:components": "provision api",
    "deployer:bucket": "my-deploys",
    "deployer:topic-arn": "arn:aws:sns:eu-west-1:123456789012:deployer",
}


@pytest.fixture
def imds() -> Iterator[type[FakeImds]]:
    with serve_imds(TAGS) as handler:
        yield handler


def from_tags(imds: type[FakeImds], out: Path) -> tuple[int, str]:
    require_tool("curl")
    env = {"PATH": "/usr/bin:/bin", "DEPLOYER_IMDS_ENDPOINT": imds.url}
    result = run(["bash", str(SCRIPTS / "deployer-config-from-tags"), str(out)], env=env)
    return result.returncode, result.stdout + result.stderr


def test_instance_tags_become_an_agent_config_the_agent_accepts(imds: type[FakeImds], tmp_path: Path) -> None:
    out = tmp_path / "agent.yml"
    code, output = from_tags(imds, out)
    assert code == 0, output
    config = load_config(out)
    assert (config.stage, config.role, config.components) == ("prod", "web", ("provision", "api"))
    assert config.bucket == "my-deploys"
    assert config.topic_arn == TAGS["deployer:topic-arn"]
    assert config.region == "eu-west-1"
    assert config.metadata_endpoint == imds.url


def test_an_unchanged_config_is_left_alone_at_the_next_boot(imds: type[FakeImds], tmp_path: Path) -> None:
    out = tmp_path / "agent.yml"
    assert from_tags(imds, out)[0] == 0
    written = out.stat().st_mtime_ns
    code, output = from_tags(imds, out)
    assert code == 0
    assert output == ""
    assert out.stat().st_mtime_ns == written


def test_a_missing_tag_stops_boot_with_the_reason_and_writes_nothing(imds: type[FakeImds], tmp_path: Path) -> None:
    del imds.tags["deployer:role"]
    out = tmp_path / "agent.yml"
    code, output = from_tags(imds, out)
    assert code == 1
    assert "instance tag deployer:role is missing" in output
    assert list(tmp_path.iterdir()) == []


def test_a_tag_that_could_break_the_yaml_is_refused(imds: type[FakeImds], tmp_path: Path) -> None:
    imds.tags["deployer:stage"] = 'prod"\nroot_dir: /'
    code, output = from_tags(imds, tmp_path / "agent.yml")
    assert code == 1
    assert "characters the config does not allow" in output


def test_a_baked_trust_file_is_used_and_signatures_are_required_only_when_tagged(
    imds: type[FakeImds], tmp_path: Path
) -> None:
    out = tmp_path / "agent.yml"
    (tmp_path / "trust.json").write_text("{}")  # the image's; only its presence matters here
    imds.tags["deployer:require-signatures"] = "true"
    code, output = from_tags(imds, out)
    assert code == 0, output
    config = load_config(out)
    assert config.trust_file == tmp_path / "trust.json"
    assert config.require_signatures is True
    imds.tags["deployer:require-signatures"] = "yes"
    code, output = from_tags(imds, out)
    assert code == 1
    assert "deployer:require-signatures must be true or false, got yes" in output
