"""Fixtures for the base-image tests: real tools, the freshly built wheel, a provisioned root.

A missing tool skips a test locally but fails it when CI is set, so a green CI run cannot
hide a missing `apt-get install` in .ci/run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
PACKER = REPO / "packer"
UNITS = ("deployer-boot.service", "deployer-agent.service")
#: The provisioning script's first pip install of the agent's dependencies may take this long.
PROVISION_TIMEOUT_SECONDS = 300


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed, and CI is set: .ci/run must install it")
    pytest.skip(f"{name} is not installed (CI installs it through .ci/run)")


def run(args: list[str], timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


def snapshot(root: Path) -> dict[str, tuple[int, int, float, str]]:
    """Every path under root with mode, size, mtime and (for links) the target: a re-run must not move any."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else ""
        found[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime, target)
    return found


@dataclass(frozen=True)
class Provisioned:
    """A throwaway root the provisioning script installed the agent into (prefix mode)."""

    root: Path
    wheel: Path
    output: str

    @property
    def venv(self) -> Path:
        return self.root / "opt/deployer/venv"

    def provision(self) -> subprocess.CompletedProcess[str]:
        return run(provision_command(self.root, self.wheel), timeout=PROVISION_TIMEOUT_SECONDS, cwd=self.root)

    def unit_commands(self, unit: str, key: str, config_dir: Path) -> list[list[str]]:
        """The unit's Exec lines as an instance would run them: /opt/deployer in the root, /etc/deployer in config_dir.

        `+` (run with full privileges) is dropped: here everything runs as the test's user.
        """
        moves = {"/opt/deployer/": self.root / "opt/deployer", "/etc/deployer/": config_dir}
        commands = []
        for line in (self.root / "etc/systemd/system" / unit).read_text().splitlines():
            name, _, value = line.partition("=")
            if name.strip() == key:
                argv = shlex.split(value.strip().lstrip("+"))
                for prefix, there in moves.items():
                    argv = [str(there / a.removeprefix(prefix)) if a.startswith(prefix) else a for a in argv]
                commands.append(argv)
        return commands


def provision_command(root: Path, wheel: Path) -> list[str]:
    # sys.executable is this venv's Python (>= 3.11): what provision.sh would find on an image.
    return [
        "bash",
        str(SCRIPTS / "provision.sh"),
        "--root",
        str(root),
        "--wheel",
        str(wheel),
        "--python",
        sys.executable,
    ]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent wheel built from this working tree, as CI would build it for Packer."""
    out = tmp_path_factory.mktemp("wheel")
    result = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)], timeout=180)
    assert result.returncode == 0, result.stderr
    (found,) = out.glob("fleet_deployer-*.whl")
    return found


@pytest.fixture(scope="session")
def provisioned(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    """One provisioning run per session: the only step that installs dependencies (from the index)."""
    root = tmp_path_factory.mktemp("image-root")
    result = run(provision_command(root, wheel), timeout=PROVISION_TIMEOUT_SECONDS, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return Provisioned(root=root, wheel=wheel, output=result.stdout)
