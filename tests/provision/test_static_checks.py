"""The image's files pass the real tools: shellcheck, packer validate, systemd-analyze, cloud-init."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployer.agent.config import config_from_dict
from tests.provision.conftest import PACKER, REPO, SCRIPTS, UNITS, require_tool, run

USER_DATA = sorted((SCRIPTS / "cloud-init").glob("*.yml"))


def shell_scripts() -> list[Path]:
    """Every shell script under scripts/ and packer/, found by extension or shebang."""
    found = []
    for path in sorted([*SCRIPTS.rglob("*"), *PACKER.rglob("*")]):
        if not path.is_file():
            continue
        with path.open("rb") as handle:
            first = handle.readline()
        if path.suffix == ".sh" or (first.startswith(b"#!") and (b"sh" in first.split(b"/")[-1])):
            found.append(path)
    return found


def test_every_shell_script_passes_shellcheck() -> None:
    shellcheck = require_tool("shellcheck")
    scripts = shell_scripts()
    names = {p.name for p in scripts}
    # The list is found, not written down: make sure it found the scripts that matter.
    assert {"provision.sh", "deployer-prepare-dirs", "deployer-config-from-tags", "test", "demo"} <= names
    result = run([shellcheck, "--external-sources", *map(str, scripts)], cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def packer_env(closed_port: int, tmp_path: Path) -> dict[str, str]:
    """Dummy AWS credentials, and every proxy pointed at a closed loopback port: no network."""
    proxy = f"http://127.0.0.1:{closed_port}"
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "AKIADUMMYDUMMYDUMMY0",
        "AWS_SECRET_ACCESS_KEY": "dummy",
        "AWS_EC2_METADATA_DISABLED": "true",
        "CHECKPOINT_DISABLE": "1",  # Packer's version check would call checkpoint-api.hashicorp.com
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "NO_PROXY": "",
        "PACKER_CACHE_DIR": str(tmp_path / "packer-cache"),
        "HOME": str(tmp_path),
    }


@pytest.fixture
def packer_dir(tmp_path: Path) -> Path:
    """packer/ without plugins.pkr.hcl (Packer 1.6 rejects `required_plugins`), beside scripts/."""
    copy = tmp_path / "repo" / "packer"
    copy.mkdir(parents=True)
    for path in PACKER.glob("*.pkr.hcl"):
        if path.name != "plugins.pkr.hcl":
            shutil.copy(path, copy)
    (tmp_path / "repo" / "scripts").symlink_to(SCRIPTS)
    return copy


@pytest.mark.parametrize("distro", ["al2023", "ubuntu-24.04"])
def test_the_ami_template_validates_offline_for_each_distro_with_a_wheel(
    distro: str, packer_dir: Path, packer_env: dict[str, str], tmp_path: Path
) -> None:
    packer = require_tool("packer")
    dummy_wheel = tmp_path / "fleet_deployer-0.1.0-py3-none-any.whl"
    dummy_wheel.write_bytes(b"not really a wheel; validate only checks it exists")
    result = run(
        [packer, "validate", "-var", f"agent={dummy_wheel}", "-var", f"distro={distro}", str(packer_dir)],
        env=packer_env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_ami_template_validates_with_an_agent_version_instead_of_a_wheel(
    packer_dir: Path, packer_env: dict[str, str]
) -> None:
    packer = require_tool("packer")
    result = run([packer, "validate", "-var", "agent=0.1.0", str(packer_dir)], env=packer_env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_ami_template_rejects_an_unknown_distro_and_a_missing_wheel(
    packer_dir: Path, packer_env: dict[str, str], tmp_path: Path
) -> None:
    packer = require_tool("packer")
    distro = run([packer, "validate", "-var", "agent=0.1.0", "-var", "distro=centos", str(packer_dir)], env=packer_env)
    assert distro.returncode != 0
    assert "al2023 or ubuntu-24.04" in distro.stdout + distro.stderr
    missing = run([packer, "validate", "-var", f"agent={tmp_path / 'missing.whl'}", str(packer_dir)], env=packer_env)
    assert missing.returncode != 0
    assert "missing.whl" in missing.stdout + missing.stderr


def test_the_ami_template_seeds_each_release_it_is_given_with_the_installed_agent(
    packer_dir: Path, packer_env: dict[str, str]
) -> None:
    packer = require_tool("packer")
    args = ["-var", "agent=0.1.0", "-var", 'seed=["prod/web/api","prod/web/worker=20261207T0000Z-abc1234"]',
            "-var", "seed_bucket=my-deploys", str(packer_dir)]  # fmt: skip
    assert run([packer, "validate", *args], env=packer_env).returncode == 0
    rendered = subprocess.run(
        [packer, "console", *args],
        input="local.seed_commands",
        capture_output=True,
        text=True,
        env=packer_env,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert json.loads(rendered.stdout.replace(",\n]", "\n]")) == [
        "sudo /opt/deployer/venv/bin/deployer seed --bucket my-deploys --prefix deployer --region eu-west-1 "
        "--stage prod --role web --component api",
        "sudo /opt/deployer/venv/bin/deployer seed --bucket my-deploys --prefix deployer --region eu-west-1 "
        "--stage prod --role web --component worker --release-id 20261207T0000Z-abc1234",
    ]


def test_modern_packer_gets_the_amazon_plugin_requirement_from_its_own_file(packer_env: dict[str, str]) -> None:
    packer = require_tool("packer")
    plugins = (PACKER / "plugins.pkr.hcl").read_text()
    assert "required_plugins" in plugins
    assert 'source  = "github.com/hashicorp/amazon"' in plugins
    # No other file may need it: that is what lets Packer 1.6 validate the rest.
    assert not any(
        "required_plugins" in p.read_text() for p in PACKER.rglob("*.pkr.hcl") if p.name != "plugins.pkr.hcl"
    )
    for directory in (PACKER, PACKER / "local"):  # Packer 1.6's fmt has no -recursive
        result = run([packer, "fmt", "-check", str(directory)], env=packer_env)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_local_provisioning_template_validates(packer_env: dict[str, str], tmp_path: Path) -> None:
    packer = require_tool("packer")
    args = ["-var", f"root={tmp_path}", "-var", f"agent={tmp_path}"]
    result = run([packer, "validate", *args, str(PACKER / "local")], env=packer_env)
    assert result.returncode == 0, result.stdout + result.stderr


def units_with_stub_binaries(root: Path) -> list[Path]:
    """Copies of the units whose /opt/deployer paths point at executable stubs under root.

    systemd-analyze verify checks that every Exec binary exists and is executable.
    """
    for stub in ("opt/deployer/venv/bin/deployer", "opt/deployer/bin/deployer-prepare-dirs"):
        path = root / stub
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    copies = []
    for unit in UNITS:
        text = (SCRIPTS / "systemd" / unit).read_text().replace("/opt/deployer/", f"{root}/opt/deployer/")
        copy = root / unit
        copy.write_text(text)
        copies.append(copy)
    return copies


def verify_units(units: list[Path]) -> str:
    systemd_analyze = require_tool("systemd-analyze")
    result = run([systemd_analyze, "verify", *map(str, units)], cwd=units[0].parent)
    # verify exits 0 on many problems (unknown keys, bad values): it only prints them.
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}".strip()


def test_systemd_analyze_verifies_the_units_without_a_single_warning(tmp_path: Path) -> None:
    assert verify_units(units_with_stub_binaries(tmp_path)) == "exit 0"


def test_systemd_analyze_reports_a_misspelt_sandbox_setting(tmp_path: Path) -> None:
    units = units_with_stub_binaries(tmp_path)
    agent = units[1]
    agent.write_text(agent.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    assert "Unknown key 'ProtectSytem'" in verify_units(units)


def test_the_agent_unit_restarts_and_is_sandboxed_but_can_write_releases_and_state() -> None:
    settings: dict[str, list[str]] = {}
    for line in (SCRIPTS / "systemd/deployer-agent.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Restart"] == ["always"]
    assert settings["After"] == ["network-online.target deployer-boot.service"]
    assert settings["User"] == ["deployer"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["ReadWritePaths"] == ["/opt"]
    assert settings["StateDirectory"] == ["deployer"]  # /var/lib/deployer, the default state_dir


@pytest.mark.parametrize("user_data", USER_DATA, ids=lambda p: p.name)
def test_cloud_init_accepts_the_example_user_data(user_data: Path) -> None:
    cloud_init = require_tool("cloud-init")
    result = run([cloud_init, "schema", "--config-file", str(user_data)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_cloud_init_rejects_a_broken_copy_of_the_user_data(tmp_path: Path) -> None:
    cloud_init = require_tool("cloud-init")
    broken = tmp_path / "user-data.yml"
    text = (SCRIPTS / "cloud-init/user-data.yml").read_text()
    broken.write_text(text.replace("write_files:", "write_files: yes\nunused_files:"))
    result = run([cloud_init, "schema", "--config-file", str(broken)])
    assert result.returncode == 1
    assert "write_files" in result.stdout + result.stderr


def test_the_user_data_writes_an_agent_config_the_agent_accepts() -> None:
    doc = yaml.safe_load((SCRIPTS / "cloud-init/user-data.yml").read_text())
    (entry,) = [f for f in doc["write_files"] if f["path"] == "/etc/deployer/agent.yml"]
    config = config_from_dict(yaml.safe_load(entry["content"]), source="user-data")
    assert config.components == ("provision", "api")
    assert config.topic_arn.startswith("arn:aws:sns:")


def test_the_config_skeleton_in_the_image_is_a_valid_agent_config() -> None:
    config = config_from_dict(yaml.safe_load((SCRIPTS / "config/agent.yml.example").read_text()), source="skeleton")
    assert config.components == ("provision", "api")


class _CloudFormation(yaml.SafeLoader):
    """YAML with CloudFormation's short forms (!Ref, !Sub, !GetAtt) read as their long forms."""


def _long_form(name: str) -> Callable[[yaml.SafeLoader, yaml.Node], dict[str, Any]]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        assert isinstance(node, yaml.ScalarNode)
        return {name: loader.construct_scalar(node)}

    return construct


for _tag, _name in (("Ref", "Ref"), ("Sub", "Fn::Sub"), ("GetAtt", "Fn::GetAtt")):
    _CloudFormation.add_constructor(f"!{_tag}", _long_form(_name))


def test_the_cloudformation_example_wires_the_hooks_the_agent_config_names(tmp_path: Path) -> None:
    template = yaml.load((REPO / "docs/fleet-lifecycle.cfn.yml").read_text(), Loader=_CloudFormation)
    resources = template["Resources"]
    user_data = resources["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    filled = (
        user_data.replace("${DeployBucket}", "my-deploys")
        .replace("${DeployTopicArn}", "arn:aws:sns:eu-west-1:123456789012:deployer")
        .replace(
            "${TargetGroupArn}", "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/web/0123456789abcdef"
        )
    )
    # cloud-init's own schema check, then the agent's own parser, on what the instance would get.
    (tmp_path / "user-data.yml").write_text(filled)
    checked = run([require_tool("cloud-init"), "schema", "--config-file", str(tmp_path / "user-data.yml")])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (entry,) = yaml.safe_load(filled)["write_files"]
    config = config_from_dict(yaml.safe_load(entry["content"]), source="cloudformation example")
    group = resources["Group"]["Properties"]
    hooks = {h["LifecycleTransition"]: h for h in group["LifecycleHookSpecificationList"]}
    assert hooks["autoscaling:EC2_INSTANCE_LAUNCHING"]["LifecycleHookName"] == config.lifecycle_hook_name
    assert hooks["autoscaling:EC2_INSTANCE_TERMINATING"]["LifecycleHookName"] == config.terminate_hook_name
    assert hooks["autoscaling:EC2_INSTANCE_TERMINATING"]["DefaultResult"] == "CONTINUE"  # scale-in goes on
    assert 30 <= hooks["autoscaling:EC2_INSTANCE_TERMINATING"]["HeartbeatTimeout"] <= 7200
    assert group["AutoScalingGroupName"] == config.lifecycle_asg_name
    assert group["TargetGroupARNs"] == [{"Ref": "TargetGroupArn"}]
    assert resources["WarmPool"]["Properties"]["PoolState"] == "Stopped"
