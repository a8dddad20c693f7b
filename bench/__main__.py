"""`python -m bench` (or `scripts/bench`): run the figures, print the tables, write docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import apply, boot, events, fanout, idle, publish, rollout, scale, traffic
from bench.common import REPO, Bench, aws_env, cpu_seconds
from bench.report import Section, code_state, print_section, render
from deployer import logs
from deployer.local.emulator import Emulator
from deployer.local.loopback import install_loopback_guard

FIGURES: dict[str, Callable[[Bench], Section]] = {
    "fanout": fanout.run,
    "apply": apply.run,
    "boot": boot.run,
    "idle": idle.run,
    "publish": publish.run,
    "scale": scale.run,
    "rollout": rollout.run,
    "traffic": traffic.run,
    "events": events.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument(
        "--only", default=",".join(FIGURES), help=f"comma-separated subset of: {', '.join(FIGURES)} [default: all]"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer agents/deploys/reps, 20 MB artifact")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output [default: docs/benchmarks.md; docs/benchmarks-quick.md with --quick or --only]",
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/fleet-bench"), help="scratch space (artifacts are cached here)"
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    partial = args.quick or chosen != list(FIGURES)
    out = args.out or REPO / "docs" / ("benchmarks-quick.md" if partial else "benchmarks.md")
    command = "scripts/bench" + (
        "" if argv is None and len(sys.argv) == 1 else " " + shlex.join(argv if argv is not None else sys.argv[1:])
    )

    install_loopback_guard()
    logs.configure(json=False, level="warning")  # the in-process publisher's info lines would drown the tables
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(args.workdir)
    # Children start as installed code does: from compiled bytecode (pip compiles a wheel at install),
    # kept under the workdir so the checkout stays clean. With PYTHONDONTWRITEBYTECODE every child
    # would compile the deployer from source first (~60 ms a start, none of it the product's).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(args.workdir / "pycache")
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *(str(REPO / name) for name in ("deployer", "publisher", "bench"))],
        check=True,
    )
    started = time.monotonic()
    code_at_start = code_state()
    sections: list[Section] = []
    failed = False
    with Emulator(log_path=args.workdir / "moto.log") as emulator:
        os.environ.update(aws_env(emulator.url))
        bench = Bench(emulator=emulator, workdir=args.workdir, quick=args.quick)
        print(
            f"emulator on {emulator.url}; workdir {args.workdir}; figures {chosen}{' (quick)' if args.quick else ''}",
            flush=True,
        )
        for name in chosen:
            print(f"\n-- {name}", flush=True)
            t0 = time.monotonic()
            cpu_before = _cpu_snapshot(emulator)
            try:
                section = FIGURES[name](bench)
            except Exception:  # noqa: BLE001 - one broken figure must not lose the others' numbers
                failed = True
                traceback.print_exc()
                section = Section(
                    name,
                    f"{name} (FAILED)",
                    "This figure failed in this run:\n\n```\n" + traceback.format_exc()[-2000:] + "```",
                )
            section.seconds = time.monotonic() - t0
            section.others_cpu = _others_cpu(cpu_before, _cpu_snapshot(emulator), section.seconds)
            sections.append(section)
            print_section(section)
    total = time.monotonic() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        render(sections, command=command, quick=args.quick, total_seconds=total, code=(code_at_start, code_state()))
    )
    print(f"wrote {out} ({total / 60:.1f} min)")
    return 1 if failed else 0


def _cpu_snapshot(emulator: Emulator) -> tuple[float, float]:
    """(machine busy CPU seconds, this benchmark's own CPU seconds: itself, reaped children, the emulator)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
    if emulator.process is not None and emulator.process.poll() is None:
        own += cpu_seconds(emulator.process.pid)
    return busy, own


def _others_cpu(before: tuple[float, float], after: tuple[float, float], seconds: float) -> float:
    """Share of the machine's CPU capacity used by processes that are not this benchmark's, over a figure."""
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others) / (seconds * (os.cpu_count() or 1))


if __name__ == "__main__":
    sys.exit(main())
