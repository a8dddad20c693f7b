"""Figure 6: fleet reads at 10,000 instances — `deployer status`, one `publish --wait` poll, a `gc` scan.

10,000 synthetic status reports are written to the emulator, next to a few real agents that
booted and converged on a deploy. Each read is measured twice: straight to the emulator (wall
time, CPU, peak RSS) and through the counting proxy of the test suite (requests by kind). The
projection to real S3 replaces the emulator's latency with S3's (see `ASSUMED_*`) and follows
the structure of the read (`projection`, `status_projection`); for `status` the timed run also
says how its read's CPU split between the parent and the worker processes (`NOTING_STATUS`).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from math import ceil
from pathlib import Path

from bench.common import (
    BUCKET,
    PYTHON,
    REGION,
    REPO,
    ROLE,
    STAGE,
    AgentProc,
    Bench,
    ChildRun,
    aws_env,
    mib,
    run_child,
    sec,
    small_artifact,
    stop_all,
    wait_for,
)
from bench.report import Section, Table, Target
from deployer.aws.clients import make_clients
from deployer.aws.reports import (
    FLEET_READ_CONCURRENCY,
    LARGE_READ_CONCURRENCY,
    LARGE_READ_RATE,
    ReadStats,
    ReportReader,
    read_processes,
)
from deployer.protocol.layout import ReportKey
from deployer.protocol.limits import S3_LIST_PAGE_KEYS
from deployer.protocol.manifest import Manifest, SyncStrategy
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState, ComponentStatus, StatusReport
from publisher.publish import Publisher
from tests.awsproxy import AwsProxy, aws_proxy

#: S3's own figure for small-object latency is "roughly 100–200 milliseconds" (Performance design
#: patterns for Amazon S3, timeouts and retries): the lower end is assumed for a GET of a ~1 KiB
#: report and the upper for a LIST page of 1,000 keys (a ~250 KiB answer). In-region GETs are
#: often faster; that only makes the client's own CPU the larger term sooner.
#: https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance-design-patterns.html
ASSUMED_GET_S = 0.100
ASSUMED_LIST_PAGE_S = 0.200
#: Reports that change between two `--wait` polls in the figure (instances converging, heartbeats).
CHANGED = 50
REAL_AGENTS = 3
#: The issue's targets.
STATUS_EMULATOR_TARGET_S = 120.0
STATUS_PROJECTED_TARGET_S = 5.0
STATUS_RSS_TARGET_MB = 150.0


@dataclass(frozen=True)
class Measured:
    run: ChildRun
    lists: int
    gets: int

    def projected(self) -> float:
        """Wall time on S3 of a read in one process (see `projection`), with its CPU as measured here."""
        return projection(self.lists, self.gets, self.run.cpu)


def projection(lists: int, gets: int, cpu: float) -> float:
    """A read in one process (gc, a `--wait` poll): LIST pages one after another (each needs the
    previous one's token), then the GETs, `FLEET_READ_CONCURRENCY` in flight, taking the longer of
    their latency and the client's CPU (one Python process: parsing and signing do not overlap
    each other, only the waits). A `--wait` poll's GETs in fact start behind each page; counting
    them after the listing only overstates it."""
    return lists * ASSUMED_LIST_PAGE_S + max(cpu, ceil(gets / FLEET_READ_CONCURRENCY) * ASSUMED_GET_S)


def status_projection(lists: int, gets: int, command_cpu: float, probe: ReadStats, cores: int) -> float:
    """`status` on S3, as its read is built (`deployer.aws.reports`): the parent lists page after
    page and hands each page's GETs out at once, to worker processes for a large read.

    - The command's CPU outside the read (interpreter, imports, clients, the pointers, the rows and
      the JSON) is `command_cpu` minus the read's CPU in every process (`probe`), counted as if
      nothing overlapped it.
    - The read takes the longest of: the chain of LIST pages, with all of the parent's CPU during
      the read on it (parsing a page delays the next request), then the last page's GETs (their
      latency rounds, or their share of the busiest worker's CPU); the GETs themselves, C in
      flight from the first page on; the pacing (`LARGE_READ_RATE`); the first page and then the
      busiest worker's CPU; and all the read's CPU spread over this machine's `cores`.
    """
    parallel = probe.processes > 0
    in_flight = LARGE_READ_CONCURRENCY if parallel else FLEET_READ_CONCURRENCY
    busiest = max(probe.worker_cpu_s, default=0.0) if parallel else probe.cpu_s
    read_cpu = probe.cpu_s + sum(probe.worker_cpu_s)
    last_share = probe.last_page_gets / probe.gets if probe.gets else 0.0
    tail = max(ceil(probe.last_page_gets / in_flight) * ASSUMED_GET_S, busiest * last_share if parallel else 0.0)
    read = max(
        lists * ASSUMED_LIST_PAGE_S + probe.cpu_s + tail,
        ASSUMED_LIST_PAGE_S + ceil(gets / in_flight) * ASSUMED_GET_S,
        gets / LARGE_READ_RATE if parallel else 0.0,
        ASSUMED_LIST_PAGE_S + busiest,
        read_cpu / cores,
    )
    return max(0.0, command_cpu - read_cpu) + read


#: `deployer status ARGS` run as the command runs, which also writes what its read cost
#: (`ReportReader.stats`) to the file `sys.argv[1]` names: the read's CPU split taken from the
#: very run whose CPU is measured, so the CPU outside the read is one run's, not the difference
#: between two 10,000-GET runs (that difference swung between -0.5 s and +1.8 s).
NOTING_STATUS = """
import dataclasses, json, sys
from deployer.aws import reports
from deployer.cli import main
stats_path = sys.argv.pop(1)
refresh = reports.ReportReader.refresh
def noting(self, *args, **kwargs):
    try:
        return refresh(self, *args, **kwargs)
    finally:
        with open(stats_path, "w") as out:
            json.dump(dataclasses.asdict(self.stats), out)
reports.ReportReader.refresh = noting
main(sys.argv[1:])
"""


def read_stats(path: Path) -> ReadStats:
    found = json.loads(path.read_text())
    return ReadStats(**{**found, "worker_cpu_s": tuple(found["worker_cpu_s"])})


def synthetic_report(n: int, now: datetime) -> tuple[str, bytes]:
    who = ReportKey(STAGE, ROLE, f"i-{n:017x}")
    status = ComponentStatus(
        state=ComponentState.OK, release_id="rel-1", seq=1, deploy_id="d-synthetic", updated_at=now.isoformat()
    )
    report = StatusReport(
        key=who, heartbeat_at=now.replace(microsecond=0), agent_version="bench", components={"api": status}
    )
    return f"{who.instance_id}", report.to_json()


def write_reports(bench: Bench, first: int, count: int) -> None:
    now = datetime.now(UTC)
    s3 = bench.clients.s3

    def put(n: int) -> None:
        instance, body = synthetic_report(n, now)
        key = bench.layout.status_key(ReportKey(STAGE, ROLE, instance))
        s3.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType="application/json")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(first, first + count)))


def measured(
    proxy: AwsProxy, command: list[str], direct_env: dict[str, str], timed: list[str] | None = None
) -> Measured:
    """The command straight to the emulator (timings; as `timed` if given), then through the proxy (requests)."""
    run = run_child(timed or command, env=direct_env, cwd=REPO)
    proxy.reset_counts()
    run_child(command, env={**direct_env, **aws_env(proxy.url)}, cwd=REPO)
    return Measured(run, proxy.count("s3", "LIST"), proxy.count("s3", "GET"))


def run(bench: Bench) -> Section:
    bench.fresh()
    n = 1_000 if bench.quick else 10_000
    agents = [
        AgentProc(bench, bench.dir(f"scale-agent-{i}"), f"i-real{i:012d}", ["api"]).start() for i in range(REAL_AGENTS)
    ]
    try:
        publisher = Publisher(bench.clients, BUCKET, bench.topic_arn, bench.layout)
        template = Manifest(dest="/opt/api/current", sync_strategy=SyncStrategy.SYMLINK)
        deploy = publisher.publish(
            Channel(STAGE, ROLE, "api"), small_artifact(bench.workdir), template=template, release_id="scale-1"
        ).deploy
        wait_for(
            lambda: all(a.watcher.find("apply_succeeded") is not None for a in agents),
            "real agents to converge",
            60,
            agents,
        )
        print(f"  writing {n} synthetic reports", flush=True)
        write_reports(bench, 0, n)
        env = {**os.environ, **aws_env(bench.emulator.url)}
        with aws_proxy(bench.emulator.url) as proxy:
            args = ["status", "--bucket", BUCKET, "--json"]
            stats_path = bench.workdir / "status-read.json"
            noting = [PYTHON, "-c", NOTING_STATUS, str(stats_path), *args]
            status = measured(proxy, [PYTHON, "-m", "deployer", *args], env, timed=noting)
            probe = read_stats(stats_path)
            cores = read_processes()
            status_projected = status_projection(status.lists, status.gets, status.run.cpu, probe, cores)
            print(f"  status: {sec(status.run.wall)}, {status.lists} LIST + {status.gets} GET; {probe}", flush=True)
            gc = measured(
                proxy,
                [PYTHON, "-m", "deployer", "gc", "--bucket", BUCKET, "--topic-arn", bench.topic_arn, "--dry-run"],
                env,
            )
            print(f"  gc scan: {sec(gc.run.wall)}, {gc.lists} LIST + {gc.gets} GET", flush=True)
            poll_wall, poll_cpu, poll_lists, poll_gets = one_wait_poll(bench, proxy, n)
            print(f"  --wait poll: {sec(poll_wall)}, {poll_lists} LIST + {poll_gets} GET", flush=True)
    finally:
        stop_all(agents)
    total = n + REAL_AGENTS
    pages = ceil(total / S3_LIST_PAGE_KEYS)
    poll_budget = pages + CHANGED + 2
    table = Table(
        ["read", "emulator wall", "CPU", "peak RSS", "LIST", "GET", "projected on S3"],
        [
            _row("`deployer status --json`", status, status_projected),
            _row("`deployer gc --dry-run` (scan, nothing stale)", gc),
            [
                f"one `--wait` poll ({CHANGED} reports changed)",
                sec(poll_wall),
                sec(poll_cpu),
                "",
                str(poll_lists),
                str(poll_gets),
                sec(projection(poll_lists, poll_gets, poll_cpu)),
            ],
        ],
        caption=(
            f"{n:,} synthetic reports + {REAL_AGENTS} real agents (converged on seq {deploy.seq}), one stage/role. "
            f"S3 assumed at {ASSUMED_LIST_PAGE_S * 1000:.0f} ms per LIST page and {ASSUMED_GET_S * 1000:.0f} ms per GET. "
            f"`status` read its {status.gets - 1:,} reports in {probe.processes or 'no'} worker process(es) "
            f"(parent {sec(probe.cpu_s)} of CPU during the read, workers "
            f"{', '.join(sec(cpu) for cpu in probe.worker_cpu_s) or '-'}; {cores} core(s) here), "
            f"{LARGE_READ_CONCURRENCY if probe.processes else FLEET_READ_CONCURRENCY} in flight"
            f"{f', at most {LARGE_READ_RATE:,.0f}/s' if probe.processes else ''}, each page's GETs behind it; projected as "
            f"its CPU outside the read + max(LIST pages × {ASSUMED_LIST_PAGE_S * 1000:.0f} ms + the parent's read CPU + the "
            f"last page's GETs, 1 page + GETs / in flight × {ASSUMED_GET_S * 1000:.0f} ms, GETs / rate, 1 page + the busiest "
            f"worker's CPU, the read's CPU / cores). gc and the poll read in one process, {FLEET_READ_CONCURRENCY} in flight: "
            f"LIST pages × {ASSUMED_LIST_PAGE_S * 1000:.0f} ms + max(client CPU, GETs / {FLEET_READ_CONCURRENCY} × "
            f"{ASSUMED_GET_S * 1000:.0f} ms)."
        ),
    )
    meaning = (
        "What reading the fleet costs at 10,000 instances: `deployer status` and `gc` read every report (gc only "
        "GETs those whose object is older than its TTL), and a `publish --wait` poll re-lists and GETs only the "
        "reports whose ETag changed. On the emulator every request is served one at a time by moto; the "
        "projection replaces moto's latency with S3's."
    )
    targets = [
        Target(
            "requests per `--wait` poll ≤ N/1000 + changed + 2",
            poll_lists + poll_gets <= poll_budget,
            f"{poll_lists} LIST + {poll_gets} GET = {poll_lists + poll_gets} (budget {poll_budget} for N = {total:,})",
        ),
        Target(
            f"`status` for {n:,} instances on the emulator < 2 min",
            status.run.wall < STATUS_EMULATOR_TARGET_S,
            sec(status.run.wall),
        ),
        Target(
            f"`status` projected on S3 ≤ {STATUS_PROJECTED_TARGET_S:.0f} s",
            status_projected <= STATUS_PROJECTED_TARGET_S,
            sec(status_projected),
        ),
        Target(
            "`status` peak RSS < 150 MB",
            status.run.max_rss_kib * 1024 < STATUS_RSS_TARGET_MB * 1e6,
            f"{mib(status.run.max_rss_kib)} = {status.run.max_rss_kib * 1024 / 1e6:.0f} MB (decimal)",
        ),
    ]
    notes = [
        f"Requests are counted by the loopback proxy of the test suite (`tests/awsproxy.py`), on a second run of "
        f"the same command; `status` also reads the channel's pointer (one GET). `{REGION}` emulator, "
        f"{FLEET_READ_CONCURRENCY} concurrent reads in one process (`deployer.aws.reports.FLEET_READ_CONCURRENCY`), "
        f"{LARGE_READ_CONCURRENCY} between the workers of a large read (`LARGE_READ_CONCURRENCY`). The split of "
        f"`status`'s CPU comes from a third run of its read alone (`ReportReader.stats`).",
    ]
    return Section("scale", "6. Fleet reads at 10,000 instances", meaning, [table], targets, notes)


def one_wait_poll(bench: Bench, proxy: AwsProxy, n: int) -> tuple[float, float, int, int]:
    """A waiter's steady state: a first refresh read everything; between two polls CHANGED reports changed."""
    reader = ReportReader(make_clients(REGION, proxy.url).s3, BUCKET, bench.layout, STAGE, ROLE)
    reader.refresh()
    write_reports(bench, 0, CHANGED)  # rewritten: new ETags
    proxy.reset_counts()
    started, cpu = time.perf_counter(), time.process_time()
    entries = reader.refresh()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert len(entries) == n + REAL_AGENTS, len(entries)
    return wall, cpu, proxy.count("s3", "LIST"), proxy.count("s3", "GET")


def _row(name: str, m: Measured, projected: float | None = None) -> list[str]:
    return [
        name,
        sec(m.run.wall),
        sec(m.run.cpu),
        mib(m.run.max_rss_kib),
        str(m.lists),
        str(m.gets),
        sec(m.projected() if projected is None else projected),
    ]
