"""Shared pieces of the benchmark: the emulator, the environment, artifacts, agent subprocesses, timing."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from deployer.aws.clients import Clients, make_clients
from deployer.local.emulator import Emulator
from deployer.protocol.layout import Layout
from publisher.infra import init_resources
from publisher.pack import Compression, pack_directory

REGION = "us-east-1"
BUCKET = "deployer-bench"
TOPIC = "deployer-bench"
STAGE, ROLE = "bench", "web"
PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent


def aws_env(endpoint_url: str) -> dict[str, str]:
    """Environment for this process and every child: credentials for the emulator, no IMDS, no proxy."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@dataclass(frozen=True)
class Venv:
    """A Python to run the product's processes with: its interpreter and what its environment adds."""

    name: str
    python: str
    env: dict[str, str]


#: This process's venv (`scripts/_venv.sh`: the project editable, with the dev extras: moto, pytest,
#: import-linter and with it rich, which structlog then imports too).
DEV = Venv("dev", PYTHON, {})


def baked_venv(workdir: Path) -> Venv:
    """The venv the base image carries (`scripts/provision.sh`: `python -m venv`, then `pip install`
    of the project): its core dependencies only. Made once per dependency list, under `workdir`;
    the project itself comes from this checkout on PYTHONPATH, so it is the code measured."""
    import hashlib
    import tomllib

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    digest = hashlib.sha256("\n".join(sorted(dependencies)).encode()).hexdigest()[:12]
    home = workdir / f"baked-venv-{digest}"
    python = home / "bin" / "python"
    if not (home / ".complete").exists():
        shutil.rmtree(home, ignore_errors=True)
        print(f"  making the baked venv {home} ({len(dependencies)} dependencies)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *dependencies], check=True
        )
        (home / ".complete").touch()
    return Venv("baked", str(python), {"PYTHONPATH": str(REPO)})


@dataclass
class Bench:
    """What every figure gets: the emulator, a work directory, clients and the run mode."""

    emulator: Emulator
    workdir: Path
    quick: bool
    clients: Clients = field(init=False)
    topic_arn: str = ""
    layout: Layout = field(default_factory=Layout)
    _baked: Venv | None = None

    def __post_init__(self) -> None:
        self.clients = make_clients(REGION, self.emulator.url)

    @property
    def baked(self) -> Venv:
        """The base image's venv (`baked_venv`), made on first use."""
        if self._baked is None:
            self._baked = baked_venv(self.workdir)
        return self._baked

    def fresh(self) -> None:
        """Empty emulator (moto grows in memory and slows down), then bucket + topic again."""
        self.emulator.reset()
        self.topic_arn = init_resources(self.clients, BUCKET, TOPIC).topic_arn

    def dir(self, name: str) -> Path:
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


# -- artifacts -------------------------------------------------------------------------------

WORDS = [
    "deploy",
    "release",
    "fleet",
    "agent",
    "queue",
    "topic",
    "bucket",
    "manifest",
    "checksum",
    "extract",
    "symlink",
    "rsync",
    "hook",
    "health",
    "rollback",
    "status",
    "heartbeat",
    "reconcile",
    "pointer",
    "history",
    "seq",
    "channel",
    "stage",
    "role",
    "component",
    "instance",
    "boot",
    "replay",
    "idempotent",
    "ordered",
    "crash",
    "safe",
    "report",
    "lambda",
    "function",
    "return",
    "import",
    "class",
]


def make_tree(root: Path, *, files: int, total_bytes: int, random_share: float, seed: int) -> Path:
    """A deterministic tree: `random_share` of the bytes incompressible, the rest text-like."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    per_file = total_bytes // files
    text_line = [" ".join(rng.choices(WORDS, k=12)) + "\n" for _ in range(4096)]
    for index in range(files):
        sub = root / f"pkg{index % 40:02d}" / f"mod{index % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        size = max(1, int(per_file * rng.uniform(0.2, 1.8)))
        if rng.random() < random_share:
            (sub / f"blob{index:05d}.bin").write_bytes(rng.randbytes(size))
        else:
            lines: list[str] = []
            written = 0
            while written < size:
                line = text_line[rng.randrange(len(text_line))]
                lines.append(line)
                written += len(line)
            (sub / f"file{index:05d}.txt").write_text("".join(lines)[:size])
    (root / "index.html").write_text(f"bench tree seed {seed}\n")
    return root


def tree_stats(tree: Path) -> tuple[int, int]:
    count = size = 0
    for dirpath, _, names in os.walk(tree):
        for name in names:
            count += 1
            size += (Path(dirpath) / name).stat().st_size
    return count, size


@dataclass(frozen=True)
class BigArtifact:
    path: Path
    files: int
    tree_bytes: int
    sha256: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def big_artifact(workdir: Path, quick: bool) -> BigArtifact:
    """~100 MB tar.gz of ~3000 files (quick: ~20 MB, 600 files), built once and cached in workdir."""
    from publisher.pack import sha256_file

    name = "big-quick" if quick else "big"
    files, total = (600, 36 * 1024**2) if quick else (3000, 180 * 1024**2)
    out = workdir / f"{name}.tar.gz"
    tree = workdir / f"{name}-tree"
    marker = workdir / f"{name}.done"
    if not marker.exists():
        shutil.rmtree(tree, ignore_errors=True)
        # About half the bytes random: the artifact is then ~half incompressible, like binaries + assets.
        make_tree(tree, files=files, total_bytes=total, random_share=0.5, seed=7)
        pack_directory(tree, out, compression=Compression.GZIP)  # the stretcher baseline runs `tar xzf`
        marker.write_text("ok\n")
    count, size = tree_stats(tree)
    return BigArtifact(out, count, size, sha256_file(out))


def small_artifact(workdir: Path) -> Path:
    """A small release (~64 KiB: an index page, some text, one 48 KiB binary), as the DESIGN floor used."""
    out = workdir / "small.tar.gz"
    if not out.exists():
        tree = workdir / "small-tree"
        shutil.rmtree(tree, ignore_errors=True)
        rng = random.Random(3)
        tree.mkdir(parents=True)
        (tree / "index.html").write_text("small release\n")
        (tree / "app.txt").write_text("".join(" ".join(rng.choices(WORDS, k=12)) + "\n" for _ in range(200)))
        (tree / "asset.bin").write_bytes(rng.randbytes(48 * 1024))
        pack_directory(tree, out, compression=Compression.GZIP)
    return out


# -- agent subprocesses -----------------------------------------------------------------------


class LogWatcher:
    """Reads an agent's JSON log incrementally (no re-reading of the whole file on every check)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        new = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                new.append(event)
        self.events.extend(new)
        return new

    def find(self, name: str, **match: Any) -> dict[str, Any] | None:
        self.poll()
        for event in self.events:
            if event.get("event") == name and all(event.get(k) == v for k, v in match.items()):
                return event
        return None


def event_time(event: dict[str, Any]) -> float:
    """Epoch seconds of a structlog ISO timestamp (UTC, microseconds)."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


class AgentProc:
    """One real `deployer agent` (or `boot`) process with its own root, state dir and instance id."""

    def __init__(
        self, bench: Bench, home: Path, instance_id: str, components: list[str], venv: Venv = DEV, **overrides: Any
    ) -> None:
        self.home = home
        self.venv = venv
        home.mkdir(parents=True, exist_ok=True)
        self.instance_id = instance_id
        self.root = home / "root"
        self.state = home / "state"
        self.log_path = home / "agent.log"
        config: dict[str, Any] = {
            "stage": STAGE,
            "role": ROLE,
            "components": components,
            "bucket": BUCKET,
            "topic_arn": bench.topic_arn,
            "region": REGION,
            "endpoint_url": bench.emulator.url,
            "instance_id": instance_id,
            "root_dir": str(self.root),
            "state_dir": str(self.state),
            "poll_wait_seconds": 20,
        }
        config.update(overrides)
        self.config_path = home / "agent.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, **aws_env(bench.emulator.url), **venv.env}
        self.process: subprocess.Popen[bytes] | None = None
        self.watcher = LogWatcher(self.log_path)

    def command(self, verb: str = "agent") -> list[str]:
        return [self.venv.python, "-m", "deployer", verb, "--config", str(self.config_path), "--log-json"]

    def start(self) -> AgentProc:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env, cwd=self.home
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stop_all(agents: Iterable[AgentProc], timeout: float = 30.0) -> None:
    """SIGTERM everyone at once (each finishes its current long poll, up to poll_wait_seconds), then wait."""
    agents = list(agents)
    for agent in agents:
        agent.terminate()
    deadline = time.monotonic() + timeout
    for agent in agents:
        agent.wait_stopped(max(0.1, deadline - time.monotonic()))


def wait_for(check: Callable[[], bool], what: str, timeout: float, agents: Iterable[AgentProc] = ()) -> None:
    deadline = time.monotonic() + timeout
    agents = list(agents)
    while time.monotonic() < deadline:
        if check():
            return
        for agent in agents:
            if not agent.alive():
                tail = agent.log_path.read_text()[-2000:] if agent.log_path.exists() else ""
                raise RuntimeError(f"agent {agent.instance_id} exited while waiting for {what}:\n{tail}")
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- /proc and child accounting -----------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class ChildRun:
    wall: float
    max_rss_kib: int
    cpu: float
    returncode: int
    stdout: str
    stderr: str


def run_child(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> ChildRun:
    """Run a child to completion: wall time, CPU of its whole tree (wait4), and its peak RSS.

    Peak RSS comes from GNU time (`%M`, the largest single process of the tree), not from our own
    wait4: Linux carries the parent's RSS high-water mark across fork + exec into the child's
    ru_maxrss, so a child of this ~80 MB process would never report less than that.
    """
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-child-{os.getpid()}"
    rss_file = Path(f"{out}.rss")
    wrapped = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *command]
    with open(f"{out}.out", "wb") as stdout, open(f"{out}.err", "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(wrapped, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    rss_lines = [line for line in rss_file.read_text().splitlines() if line.strip().isdigit()]
    result = ChildRun(
        wall=wall,
        max_rss_kib=int(rss_lines[-1]) if rss_lines else 0,
        cpu=usage.ru_utime + usage.ru_stime,
        returncode=process.returncode,
        stdout=Path(f"{out}.out").read_text(errors="replace"),
        stderr=Path(f"{out}.err").read_text(errors="replace"),
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


# -- statistics -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with 10 samples p95 is the largest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def sec(seconds: float) -> str:
    return f"{seconds:.2f} s"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}×" if base > 0 else "n/a"
