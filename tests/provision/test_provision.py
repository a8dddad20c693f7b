"""provision.sh into a throwaway root (prefix mode): the layout an AMI gets, and idempotence."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

import deployer
from deployer.protocol.trust import DEPLOY_ROLE, TRUST_ROLE, Role, Trust
from publisher.signing import keygen
from tests.provision.conftest import PACKER, UNITS, Provisioned, provision_command, require_tool, run, snapshot


def test_provisioning_installs_the_agent_into_its_own_venv(provisioned: Provisioned) -> None:
    version = run([str(provisioned.venv / "bin/deployer"), "--version"], cwd=provisioned.root)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"deployer, version {deployer.__version__}"
    # The code that runs is the installed copy in the root, not this working tree.
    where = run([str(provisioned.venv / "bin/python"), "-I", "-c", "import deployer; print(deployer.__file__)"])
    assert Path(where.stdout.strip()).is_relative_to(provisioned.venv)
    assert (provisioned.root / "opt/deployer/installed").read_text().strip() != ""


def test_provisioning_installs_the_units_enabled_for_multi_user_boot(provisioned: Provisioned) -> None:
    for unit in UNITS:
        installed = provisioned.root / "etc/systemd/system" / unit
        assert installed.read_text() == (Path(__file__).parents[2] / "scripts/systemd" / unit).read_text()
        link = provisioned.root / "etc/systemd/system/multi-user.target.wants" / unit
        # The link is absolute as on the instance: it names /etc/..., not the throwaway root.
        assert os.readlink(link) == f"/etc/systemd/system/{unit}"


def test_provisioning_installs_helpers_and_a_config_skeleton_but_no_config(provisioned: Provisioned) -> None:
    for helper in ("deployer-prepare-dirs", "deployer-config-from-tags"):
        assert os.access(provisioned.root / "opt/deployer/bin" / helper, os.X_OK)
    skeleton = yaml.safe_load((provisioned.root / "etc/deployer/agent.yml.example").read_text())
    assert skeleton["components"] == ["provision", "api"]
    # The units wait for agent.yml (ConditionPathExists); only cloud-init may write it.
    assert not (provisioned.root / "etc/deployer/agent.yml").exists()
    state = provisioned.root / "var/lib/deployer"
    assert state.is_dir()
    assert state.stat().st_mode & 0o777 == 0o750


def test_a_second_provisioning_run_changes_nothing(provisioned: Provisioned) -> None:
    before = snapshot(provisioned.root / "opt")
    before_etc = snapshot(provisioned.root / "etc/systemd")
    result = provisioned.provision()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"provision: done: deployer, version {deployer.__version__} in {provisioned.venv}"
    ]
    assert snapshot(provisioned.root / "opt") == before
    assert snapshot(provisioned.root / "etc/systemd") == before_etc


def test_packer_runs_the_same_provisioning_through_its_local_template(provisioned: Provisioned) -> None:
    packer = require_tool("packer")
    before = snapshot(provisioned.root / "opt")
    args = [
        "-var",
        f"root={provisioned.root}",
        "-var",
        f"agent={provisioned.wheel}",
        "-var",
        f"python={sys.executable}",
    ]
    result = run(
        [packer, "build", "-color=false", *args, str(PACKER / "local")],
        env={**os.environ, "CHECKPOINT_DISABLE": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "provision: done: deployer" in result.stdout
    assert snapshot(provisioned.root / "opt") == before


def test_provisioning_without_a_wheel_stops_with_the_reason(tmp_path: Path) -> None:
    result = run(
        [
            "bash",
            str(Path(__file__).parents[2] / "scripts/provision.sh"),
            "--root",
            str(tmp_path),
            "--wheel",
            str(tmp_path),
        ]
    )
    assert result.returncode == 1
    assert "no fleet_deployer wheel" in result.stderr


def test_provisioning_bakes_a_checked_trust_file_and_refuses_a_broken_one(
    provisioned: Provisioned, tmp_path: Path
) -> None:
    key = keygen(tmp_path / "release.pem")
    role = Role(frozenset({key.keyid}), 1)
    trust = tmp_path / "trust.json"
    trust.write_text(Trust(1, {key.keyid: key}, {DEPLOY_ROLE: role, TRUST_ROLE: role}).to_json())
    broken = tmp_path / "broken.json"
    broken.write_text('{"v": 1, "version": 0}')
    refused = run(
        [*provision_command(provisioned.root, provisioned.wheel), "--trust", str(broken)], cwd=provisioned.root
    )
    assert refused.returncode != 0
    assert "version must be a positive integer" in refused.stderr
    assert not (provisioned.root / "etc/deployer/trust.json").exists()
    baked = run([*provision_command(provisioned.root, provisioned.wheel), "--trust", str(trust)], cwd=provisioned.root)
    assert baked.returncode == 0, baked.stdout + baked.stderr
    assert (provisioned.root / "etc/deployer/trust.json").read_text() == trust.read_text()
