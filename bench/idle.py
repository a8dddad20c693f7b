"""Figure 4: what an idle agent costs — RSS, CPU, AWS requests per hour (and US$), growth after many deploys."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from typing import Any

from bench.common import (
    BUCKET,
    DEV,
    REGION,
    REPO,
    ROLE,
    STAGE,
    AgentProc,
    Bench,
    cpu_seconds,
    mib,
    rss_kib,
    run_child,
    small_artifact,
    stop_all,
    wait_for,
)
from bench.report import Section, Table, Target
from deployer.agent.config import load_config
from deployer.agent.loop import Booted, boot
from deployer.agent.shutdown import Shutdown
from deployer.aws.clients import make_clients
from deployer.protocol.manifest import Manifest, SyncStrategy
from deployer.protocol.names import Channel
from publisher.publish import Publisher

COMPONENTS = ["provision", "api"]
#: Public prices, us-east-1, standard tiers, free tier ignored (https://aws.amazon.com/sqs/pricing/,
#: https://aws.amazon.com/s3/pricing/), US$ per request.
SQS_PER_REQUEST = 0.40 / 1e6
S3_GET_PER_REQUEST = 0.0004 / 1000
S3_PUT_PER_REQUEST = 0.005 / 1000
HOURS_PER_MONTH = 730
#: Allocator noise we do not call growth.
GROWTH_ALLOWANCE_KIB = 2048


class OpCounter:
    """Counts AWS operations by name through botocore's `before-call` event (one hook per client)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        #: When each ReceiveMessage started: the rate comes from the intervals, not from count / window,
        #: which would be off by up to one 20 s poll at either end of the window.
        self.receives: list[float] = []

    def __call__(self, model: Any = None, params: Any = None, **_: Any) -> None:
        name = model.name if model is not None else "?"
        if name in ("GetObject", "PutObject") and isinstance(params, dict):
            key = str(params.get("url_path", ""))  # before-call sees the serialised request
            name += ":status" if "/status/" in key else ":channels" if "/channels/" in key else ":releases"
        with self.lock:
            self.ops[name] += 1
            if name == "ReceiveMessage":
                self.receives.append(time.monotonic())

    def take(self) -> Counter[str]:
        with self.lock:
            taken, self.ops = self.ops, Counter()
        return taken


def _publish(bench: Bench, publisher: Publisher, component: str, release_id: str) -> int:
    template = Manifest(dest=f"/opt/{component}/current", sync_strategy=SyncStrategy.SYMLINK)
    return publisher.publish(
        Channel(STAGE, ROLE, component), small_artifact(bench.workdir), template=template, release_id=release_id
    ).deploy.seq


def run(bench: Bench) -> Section:
    bench.fresh()
    window = 45.0 if bench.quick else 90.0
    deploys = 20 if bench.quick else 200
    publisher = Publisher(bench.clients, BUCKET, bench.topic_arn, bench.layout)
    for component in COMPONENTS:
        _publish(bench, publisher, component, f"idle-{component}")
    home = bench.dir("idle")

    # A: the real process, defaults (poll_wait_seconds 20, reconcile 300 s, heartbeat 900 s), for RSS and CPU:
    # in the venv the base image bakes (core dependencies only), and beside it in this dev venv.
    proc = AgentProc(bench, home / "process", "i-idleproc000000001", COMPONENTS, venv=bench.baked).start()
    dev = AgentProc(bench, home / "dev", "i-idledevv000000001", COMPONENTS).start()
    # B: the same agent in-process with counting clients, for requests by operation.
    counted = AgentProc(bench, home / "inproc", "i-idlecount00000001", COMPONENTS)
    clients = make_clients(REGION, bench.emulator.url)
    counter = OpCounter()
    for client in (clients.s3, clients.sns, clients.sqs):
        client.meta.events.register("before-call", counter)
    shutdown = Shutdown(60.0)  # no signal handlers: this agent runs in a thread, stopped by its flag
    booted: list[Booted] = []

    def run_counted() -> None:
        booted.append(boot(load_config(counted.config_path), clients, shutdown))
        booted[0].agent.serve()

    thread = threading.Thread(target=run_counted, name="counted-agent", daemon=True)
    try:
        wait_for(lambda: proc.watcher.find("agent_serving") is not None, "the idle agent to boot", 60, [proc])
        wait_for(lambda: dev.watcher.find("agent_serving") is not None, "the dev-venv agent to boot", 60, [dev])
        thread.start()
        wait_for(
            lambda: bool(booted) and counter.ops["ReceiveMessage"] > 0,
            "the counted agent to boot",
            60,
        )
        boot_ops = counter.take()
        boot_ops["ReceiveMessage"] += 0
        time.sleep(1.0)
        rss_start = rss_kib(proc.pid)
        cpu_start = cpu_seconds(proc.pid)
        counter.take()
        started = time.monotonic()
        rss_samples, dev_samples = [], []
        while time.monotonic() - started < window:
            rss_samples.append(rss_kib(proc.pid))
            dev_samples.append(rss_kib(dev.pid))
            time.sleep(1.0)
        elapsed = time.monotonic() - started
        window_ops = counter.take()
        cpu = cpu_seconds(proc.pid) - cpu_start
        rss_end = rss_kib(proc.pid)
        # Cost of one periodic reconcile and one heartbeat, triggered directly (at the defaults they
        # happen every 300 s and 900 s, so a window of a minute or two would not see them).
        agent, reporter = booted[0].agent, booted[0].reporter
        agent.reconcile(reason="periodic")
        reconcile_ops = Counter({k: v for k, v in counter.take().items() if k != "ReceiveMessage"})
        reporter.write()
        heartbeat_ops = Counter({k: v for k, v in counter.take().items() if k != "ReceiveMessage"})
        # One small deploy through the counted agent: what applying costs in requests.
        seq = _publish(bench, publisher, "api", "idle-deploy")
        wait_for(
            lambda: reporter.components["api"].seq == seq and reporter.components["api"].state.value == "ok",
            "the counted agent to apply",
            60,
        )
        time.sleep(1.0)  # the DeleteMessage and the next long poll
        deploy_ops = counter.take()
        shutdown.stop.set()
        print(f"  idle window {elapsed:.0f}s: {dict(window_ops)}; RSS {mib(rss_end)}", flush=True)

        # C: growth after many deploys (poll_wait_seconds 1 so the agent turns round fast; say so).
        grower = AgentProc(bench, home / "grower", "i-idlegrow00000001", ["api"], poll_wait_seconds=1).start()
        wait_for(lambda: grower.watcher.find("agent_serving") is not None, "the growth agent to boot", 60, [grower])
        checkpoints = {max(1, deploys // 20): 0, deploys // 2: 0, deploys: 0}
        grow_started = time.monotonic()
        for k in range(1, deploys + 1):
            seq = _publish(bench, publisher, "api", f"grow-{k}")
            wait_for(lambda: grower.watcher.find("apply_succeeded", seq=seq) is not None, f"deploy {k}", 60, [grower])  # noqa: B023
            if k in checkpoints:
                time.sleep(0.5)
                checkpoints[k] = rss_kib(grower.pid)
        grow_seconds = time.monotonic() - grow_started
        grower_hwm = _hwm(grower.pid)
    finally:
        stop_all([p for p in (proc, dev, locals().get("grower")) if p is not None], timeout=30)
        shutdown.stop.set()
        thread.join(timeout=25)

    breakdowns = {
        venv.name: json.loads(
            run_child([venv.python, "-m", "bench.rss_breakdown"], env={**os.environ, **venv.env}, cwd=REPO).stdout
        )
        for venv in (bench.baked, DEV)
    }
    hours = elapsed / 3600
    receives = window_ops["ReceiveMessage"]
    starts = [t for t in counter.receives if started <= t <= started + elapsed]
    interval = (starts[-1] - starts[0]) / (len(starts) - 1) if len(starts) >= 2 else 20.0
    receive_per_hour = 3600 / interval
    other_window = {k: v for k, v in window_ops.items() if k != "ReceiveMessage"}
    n_comp = len(COMPONENTS)
    reconcile_per_hour = sum(reconcile_ops.values()) * 3600 / agent.config.reconcile_interval_seconds
    heartbeat_per_hour = sum(heartbeat_ops.values()) * 3600 / agent.config.heartbeat_interval_seconds
    per_instance_month = {
        "ReceiveMessage (SQS)": receive_per_hour * HOURS_PER_MONTH * SQS_PER_REQUEST,
        "reconcile GETs (S3)": reconcile_per_hour * HOURS_PER_MONTH * S3_GET_PER_REQUEST,
        "heartbeat PUTs (S3)": heartbeat_per_hour * HOURS_PER_MONTH * S3_PUT_PER_REQUEST,
    }
    total = sum(per_instance_month.values())
    floor_cost = 180 * HOURS_PER_MONTH * SQS_PER_REQUEST

    usage = Table(
        ["measure", "value", "notes"],
        [
            ["window", f"{elapsed:.0f} s", "after boot, nothing published"],
            [
                "RSS (VmRSS) at start / end / max",
                f"{mib(rss_start)} / {mib(rss_end)} / {mib(max(rss_samples))}",
                "the `deployer agent` process, in the base image's venv (core dependencies only)",
            ],
            [
                "the same, dev venv",
                f"{mib(dev_samples[0])} / {mib(dev_samples[-1])} / {mib(max(dev_samples))}",
                "a second agent beside it, in this checkout's venv (dev extras: moto, pytest, rich, …)",
            ],
            [
                "CPU (utime+stime)",
                f"{cpu:.2f} s = {100 * cpu / elapsed:.2f} % of one core",
                f"≈ {cpu / hours:.0f} CPU-s per hour",
            ],
            [
                "ReceiveMessage calls",
                f"{receives} started in window, one every {interval:.2f} s → {receive_per_hour:.1f} per agent-hour",
                "floor at 20 s long polls: 180",
            ],
            ["other requests in window", ", ".join(f"{k} {v}" for k, v in sorted(other_window.items())) or "none", ""],
            [
                "one reconcile",
                ", ".join(f"{k} {v}" for k, v in sorted(reconcile_ops.items())),
                f"every {agent.config.reconcile_interval_seconds:.0f} s (±10 %) → {reconcile_per_hour:.0f}/agent-hour = {reconcile_per_hour / n_comp:.0f} per component-hour",
            ],
            [
                "one heartbeat",
                ", ".join(f"{k} {v}" for k, v in sorted(heartbeat_ops.items())),
                f"every {agent.config.heartbeat_interval_seconds:.0f} s → {heartbeat_per_hour:.0f}/agent-hour = {heartbeat_per_hour / n_comp:.0f} per component-hour",
            ],
            [
                "one deploy (small artifact)",
                ", ".join(f"{k} {v}" for k, v in sorted(deploy_ops.items())),
                "not idle cost; the ReceiveMessage that got the message was already in flight, the one counted is the next long poll",
            ],
            ["boot (once)", ", ".join(f"{k} {v}" for k, v in sorted(boot_ops.items())), "not part of the hourly cost"],
        ],
        caption=f"One agent following {n_comp} components ({', '.join(COMPONENTS)}), defaults (poll_wait_seconds 20, "
        "reconcile 300 s, heartbeat 900 s). RSS/CPU from /proc of a `deployer agent` subprocess; requests by a "
        "botocore `before-call` hook on an identical agent run in-process over the same window.",
    )
    cost = Table(
        ["request kind", "per agent-hour", "price", "US$ / 1000 instances / month"],
        [
            [
                "ReceiveMessage (SQS)",
                f"{receive_per_hour:.0f}",
                "$0.40 per million",
                f"${per_instance_month['ReceiveMessage (SQS)'] * 1000:.2f}",
            ],
            [
                "reconcile GETs (S3)",
                f"{reconcile_per_hour:.0f}",
                "$0.0004 per 1000",
                f"${per_instance_month['reconcile GETs (S3)'] * 1000:.2f}",
            ],
            [
                "heartbeat PUTs (S3)",
                f"{heartbeat_per_hour:.0f}",
                "$0.005 per 1000",
                f"${per_instance_month['heartbeat PUTs (S3)'] * 1000:.2f}",
            ],
            ["**total**", "", "", f"**${total * 1000:.2f}**"],
            [
                "floor: one 20 s long poll at a time, nothing else",
                "180",
                "$0.40 per million",
                f"${floor_cost * 1000:.2f}",
            ],
        ],
        caption=f"Public us-east-1 prices (SQS standard requests $0.40/million; S3 Standard GET $0.0004/1000, PUT "
        f"$0.005/1000), free tiers ignored, {HOURS_PER_MONTH} hours a month. SNS→SQS deliveries are free; "
        "deploy traffic (downloads, status writes on apply) is not idle cost and is not included.",
    )
    growth_rows = [[f"after {k} deploys", mib(v)] for k, v in sorted(checkpoints.items())]
    growth_rows.append(["peak (VmHWM)", mib(grower_hwm)])
    growth_table = Table(
        ["growth agent", "VmRSS"],
        growth_rows,
        caption=f"{deploys} small deploys applied one after another by one agent ({grow_seconds:.0f} s; "
        "poll_wait_seconds 1 for speed — the wait length does not change what is kept in memory).",
    )
    first_k, last_k = min(checkpoints), max(checkpoints)
    growth = checkpoints[last_k] - checkpoints[first_k]
    targets = [
        Target(
            "≤ 181 ReceiveMessage per agent-hour",
            receive_per_hour <= 181,
            f"{receive_per_hour:.1f} (one ReceiveMessage every {interval:.2f} s over {elapsed:.0f} s)",
        ),
        Target(
            "reconcile requests ≤ 13 per component-hour",
            reconcile_per_hour / n_comp <= 13,
            f"{reconcile_per_hour / n_comp:.1f}",
        ),
        Target(
            "heartbeat requests ≤ 13 per component-hour",
            heartbeat_per_hour / n_comp <= 13,
            f"{heartbeat_per_hour / n_comp:.1f} ({heartbeat_per_hour:.0f} per agent-hour)",
        ),
        Target(
            "idle RSS < 60 MB, in the base image's venv",
            max(rss_samples) * 1024 < 60e6,
            f"{_mb_detail(max(rss_samples), 60)} (dev venv: max {mib(max(dev_samples))} = "
            f"{max(dev_samples) * 1024 / 1e6:.1f} MB)",
        ),
        Target(
            f"no RSS growth after {deploys} deploys",
            growth <= GROWTH_ALLOWANCE_KIB,
            f"{mib(checkpoints[first_k])} after {first_k} → {mib(checkpoints[last_k])} after {last_k} ({growth / 1024:+.1f} MiB; ≤ 2 MiB counts as none)",
        ),
    ]
    meaning = (
        "What an agent costs while nothing is deployed, which is almost all of the time: memory and CPU on the "
        "instance, and AWS requests, which are what the bill counts. Request counts are measured over the window "
        f"({elapsed:.0f} s) and extrapolated linearly to an hour: at poll_wait_seconds 20 an idle agent can only "
        "make one ReceiveMessage per 20 s; the rate is taken from the mean interval between the calls' starts "
        "(a plain count / window would be off by up to one poll at either end). A "
        "reconcile (every 300 s) and a heartbeat (every 900 s) do not happen in that window at the defaults, so "
        "each was triggered once directly on the in-process agent, counted, and multiplied by its rate."
    )
    memory = Table(
        ["loaded", "VmRSS, base image's venv", "VmRSS, dev venv"],
        [
            [name, f"{baked:.1f} MiB", f"{dev_rss:.1f} MiB"]
            for (name, baked), (_, dev_rss) in zip(breakdowns["baked"], breakdowns["dev"], strict=True)
        ],
        caption="Where the idle RSS comes from (a child process importing step by step, in each venv):",
    )
    notes = [cost.markdown(), "", growth_table.markdown(), "", memory.markdown()]
    moves = (
        "the long-poll wait (20 s is the SQS maximum, so ReceiveMessage cannot go lower without giving up push "
        "latency), the reconcile interval (one GET per component each time; doubling it halves that line) and the "
        "heartbeat interval (PUTs are 12.5× the price of GETs, so the heartbeat is the second-largest line with a "
        "quarter of the requests). RSS is the interpreter, its libraries and above all botocore (see the breakdown: the three "
        "clients' service models and endpoint rule sets cost about as much as importing boto3); it does not grow with "
        "deploys. Already done: one boto3 session per region for every client of the process, and botocore's endpoint "
        "table cut to the services the deployer calls (the whole table is ~6.7 MiB of dicts per session; "
        "`deployer.aws.clients`). The dev venv costs a few MiB more than the base image's: `rich`, which structlog "
        "imports when it is installed (import-linter brings it). Going lower would mean fewer loaded models (S3's is "
        "the largest) or a smaller HTTP stack — nothing in the agent's own data. CPU is the interpreter waking once "
        "per long poll, essentially zero."
    )
    return Section("idle", "4. Idle cost", meaning, [usage], targets, notes, moves)


def _mb_detail(kib: int, limit_mb: float) -> str:
    """Both units: the targets say MB, and 1 MiB = 1.048576 MB matters at this margin."""
    mb = kib * 1024 / 1e6
    verdict = f"{mb - limit_mb:.1f} MB over" if mb >= limit_mb else f"{limit_mb - mb:.1f} MB under"
    return f"max {mib(kib)} = {mb:.1f} MB, {verdict} the {limit_mb:.0f} MB (decimal) target"


def _hwm(pid: int) -> int:
    from pathlib import Path

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
