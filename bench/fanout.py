"""Figure 1: publish → every agent applied the new release, vs the floor (bare boto3 long-poll loops)."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from bench.common import (
    BUCKET,
    REGION,
    ROLE,
    STAGE,
    AgentProc,
    Bench,
    cpu_seconds,
    event_time,
    median,
    ms,
    percentile,
    small_artifact,
    stop_all,
    wait_for,
)
from bench.report import Section, Table, Target
from deployer.aws.clients import kms_client
from deployer.aws.kms import KmsSigner
from deployer.protocol.deploy import Deploy, new_deploy_id
from deployer.protocol.envelope import DEPLOY_PAYLOAD_TYPE
from deployer.protocol.manifest import Manifest, SyncStrategy
from deployer.protocol.names import Channel
from deployer.protocol.trust import DEPLOY_ROLE, TRUST_ROLE, DeployVerifier, Role, Trust
from publisher.publish import Publisher
from publisher.signing import FileSigner, keygen, public_key, sign

FLOOR_KEY = "floor/artifact.tar.gz"


@dataclass(frozen=True)
class CpuShare:
    """CPU seconds per deploy of the processes that share the cores while a fan-out converges."""

    agents: float
    emulator: float
    #: The benchmark's own process: the floor's loops, or the publisher and the agents' log watchers.
    driver: float

    @property
    def total(self) -> float:
        return self.agents + self.emulator + self.driver


class CpuMeter:
    """`CpuShare` over an interval: started before the first measured deploy, read after the last."""

    def __init__(self, bench: Bench, agents: list[AgentProc]) -> None:
        self.pids = [a.pid for a in agents]
        self.emulator_pid = bench.emulator.process.pid if bench.emulator.process else None
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        emulator = cpu_seconds(self.emulator_pid) if self.emulator_pid else 0.0
        return sum(cpu_seconds(pid) for pid in self.pids), emulator, time.process_time()

    def per_deploy(self, deploys: int) -> CpuShare:
        now = self._now()
        return CpuShare(*((b - a) / deploys for a, b in zip(self.start, now, strict=True)))


@dataclass
class AgentRun:
    """What N real agents did over the measured deploys."""

    ours: list[float]
    ours_from_sns: list[float]
    #: Per deploy: publisher's own part, SNS publish → first agent started applying, median per-agent apply,
    #: first → last agent done.
    phases: list[tuple[float, float, float, float]]
    #: How long each apply stood still for history's answer once its release was staged (`history_waited_ms`).
    history_waits: list[float]
    #: CPU per deploy of every process on the machine's cores: the agents' sum, the emulator, this one.
    cpu: CpuShare
    agents: int

    @property
    def cpu_per_deploy(self) -> float:
        """CPU (user + system) of one agent process per deploy, mean over the agents (the long polls included)."""
        return self.cpu.agents / self.agents


@dataclass
class FloorRun:
    """The floor's convergence times, and the CPU its process and the emulator spent per deploy."""

    times: list[float]
    cpu: CpuShare


@dataclass
class Samples:
    n: int
    floor_run: FloorRun
    run: AgentRun

    @property
    def floor(self) -> list[float]:
        return self.floor_run.times

    @property
    def ours(self) -> list[float]:
        return self.run.ours

    @property
    def ours_from_sns(self) -> list[float]:
        return self.run.ours_from_sns

    @property
    def phases(self) -> list[tuple[float, float, float, float]]:
        return self.run.phases


def _pause(n: int) -> None:
    # Let every agent finish its tail (status PUT, DeleteMessage) and go back to its long poll.
    time.sleep(0.3 + 0.01 * n + random.uniform(0, 0.2))


def measure_floor(bench: Bench, n: int, deploys: int) -> FloorRun:  # noqa: C901 - the baseline stays as measured
    """N bare loops in threads: ReceiveMessage(20 s) → one S3 GET of the artifact → DeleteMessage."""
    bench.fresh()
    body = small_artifact(bench.workdir).read_bytes()
    bench.clients.s3.put_object(Bucket=BUCKET, Key=FLOOR_KEY, Body=body)
    config = Config(max_pool_connections=n + 10, retries={"total_max_attempts": 1}, read_timeout=40)
    session = boto3.session.Session(region_name=REGION)
    sqs = session.client("sqs", endpoint_url=bench.emulator.url, config=config)
    s3 = session.client("s3", endpoint_url=bench.emulator.url, config=config)
    sns = bench.clients.sns
    urls = []
    for i in range(n):
        url = sqs.create_queue(QueueName=f"floor-{i}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=bench.topic_arn, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"})
        urls.append(url)
    done: list[dict[int, float]] = [{} for _ in range(n)]
    errors: list[BaseException] = []

    def loop(i: int, url: str) -> None:
        try:
            while True:
                for message in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20, MaxNumberOfMessages=10).get(
                    "Messages", []
                ):
                    doc = json.loads(message["Body"])
                    if doc.get("stop"):
                        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
                        return
                    s3.get_object(Bucket=BUCKET, Key=FLOOR_KEY)["Body"].read()
                    done[i][doc["k"]] = time.time()
                    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i, url), daemon=True) for i, url in enumerate(urls)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # every loop is in its long poll
    # A deploy-sized message (~450 bytes, like the real deploy document).
    filler = "x" * 300
    results = []
    meter: CpuMeter | None = None
    for k in range(deploys + 1):  # k = 0 is a warm-up
        if k == 1:
            meter = CpuMeter(bench, [])
        started = time.time()
        sns.publish(TopicArn=bench.topic_arn, Message=json.dumps({"k": k, "filler": filler}))
        wait_for(lambda: all(k in d for d in done) or bool(errors), f"floor deploy {k} on {n} queues", 60)  # noqa: B023
        if errors:
            raise RuntimeError(f"floor loop failed: {errors[0]!r}")
        if k:
            results.append(max(d[k] for d in done) - started)
        _pause(n)
    assert meter is not None
    cpu = meter.per_deploy(deploys)
    sns.publish(TopicArn=bench.topic_arn, Message=json.dumps({"stop": True}))
    for thread in threads:
        thread.join(timeout=30)
    return FloorRun(results, cpu)


def measure_agents(bench: Bench, n: int, deploys: int, signed: bool = False) -> AgentRun:
    """N real `deployer agent` processes (poll_wait_seconds 20); converged = each logged apply_succeeded.

    `signed`: the publisher signs with an Ed25519 file key and every agent requires its signature."""
    bench.fresh()
    artifact = small_artifact(bench.workdir)
    home = bench.dir(f"fanout-{n}{'-signed' if signed else ''}")
    signers, trust = _release_key(home) if signed else ([], {})
    agents = [AgentProc(bench, home / f"a{i:02d}", f"i-bench{n:03d}{i:09d}", ["api"], **trust) for i in range(n)]
    sns_at: list[float] = []

    def on_publish(**_: Any) -> None:
        sns_at.append(time.time())

    bench.clients.sns.meta.events.register("before-call.sns.Publish", on_publish)
    # Inline manifests on: every agent here is of this version (README, "Upgrading").
    publisher = Publisher(bench.clients, BUCKET, bench.topic_arn, bench.layout, signers=signers, inline_manifests=True)
    template = Manifest(dest="/opt/api/current", sync_strategy=SyncStrategy.SYMLINK)
    channel = Channel(STAGE, ROLE, "api")
    ours: list[float] = []
    from_sns: list[float] = []
    phases: list[tuple[float, float, float, float]] = []
    waits: list[float] = []
    meter: CpuMeter | None = None
    try:
        for agent in agents:
            agent.start()
        wait_for(lambda: all(a.watcher.find("agent_serving") for a in agents), f"{n} agents to boot", 240, agents)
        time.sleep(1.0)
        for k in range(deploys + 1):  # k = 0 is a warm-up
            if k == 1:
                meter = CpuMeter(bench, agents)
            started = time.time()
            deploy = publisher.publish(channel, artifact, template=template, release_id=f"fan-{n}-{k}").deploy
            seq = deploy.seq
            wait_for(
                lambda: all(a.watcher.find("apply_succeeded", seq=seq) for a in agents),  # noqa: B023
                f"seq {seq} on {n} agents",
                120,
                agents,
            )
            done = [event_time(a.watcher.find("apply_succeeded", seq=seq) or {}) for a in agents]
            starts = [a.watcher.find("apply_started", seq=seq) or {} for a in agents]
            began = [event_time(start) for start in starts]
            last = max(done)
            if k:
                waits.extend(float(start.get("history_waited_ms", 0.0)) / 1000 for start in starts)
                ours.append(last - started)
                from_sns.append(last - sns_at[-1])
                phases.append(
                    (
                        sns_at[-1] - started,
                        min(began) - sns_at[-1],
                        median([d - b for d, b in zip(done, began, strict=True)]),
                        last - min(done),
                    )
                )
            _pause(n)
        assert meter is not None
        share = meter.per_deploy(deploys)
    finally:
        bench.clients.sns.meta.events.unregister("before-call.sns.Publish", on_publish)
        stop_all(agents, timeout=30)
    return AgentRun(ours, from_sns, phases, waits, share, n)


def _release_key(home: Path) -> tuple[list[FileSigner], dict[str, Any]]:
    """A release key for the publisher, and the agent settings that require its signature."""
    key = keygen(home / "release.pem")
    role = Role(frozenset({key.keyid}), 1)
    (home / "trust.json").write_text(Trust(1, {key.keyid: key}, {DEPLOY_ROLE: role, TRUST_ROLE: role}).to_json())
    return [FileSigner(home / "release.pem")], {"trust_file": str(home / "trust.json"), "require_signatures": True}


def signing_costs(bench: Bench) -> Table:
    """In-process: signing a deploy (file key, KMS on the emulator), verifying it, and the envelope's size."""
    home = bench.dir("signing")
    [file_signer], _ = _release_key(home)
    kms = kms_client(REGION, bench.emulator.url)
    key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    kms_signer = KmsSigner(kms, key_id)
    deploy = Deploy(
        deploy_id=new_deploy_id(), stage=STAGE, role=ROLE, component="api", seq=42, release_id="20261126T110624Z-f9465c9",
        manifest_key="deployer/releases/api/20261126T110624Z-f9465c9/manifest.yml", manifest_sha256="a" * 64,
        published_at="2026-11-26T11:06:24Z", origin={"github_repository": "acme/shop", "github_run_id": "1234567890"},
        artifact_sha256="b" * 64, artifact_size=65_536,
    )  # fmt: skip
    payload = deploy.to_json().encode()
    rows = []
    for name, signer in (("Ed25519 file key", file_signer), ("KMS ECC_NIST_P256 (emulator)", kms_signer)):
        reps = 200 if signer is file_signer else 20
        t0 = time.perf_counter()
        for _ in range(reps):
            envelope = sign(payload, DEPLOY_PAYLOAD_TYPE, [signer])
        signing = (time.perf_counter() - t0) / reps
        key = public_key(signer)
        trust = Trust(
            1,
            {key.keyid: key},
            {DEPLOY_ROLE: Role(frozenset({key.keyid}), 1), TRUST_ROLE: Role(frozenset({key.keyid}), 1)},
        )
        verifier, body = DeployVerifier(trust, required=True), envelope.to_json()
        verifier.open(body)  # loads the key once, as an agent does
        t0 = time.perf_counter()
        for _ in range(200):
            verifier.open(body)
        verifying = (time.perf_counter() - t0) / 200
        rows.append(
            [name, f"{signing * 1000:.2f} ms", f"{verifying * 1000:.2f} ms", f"{len(payload)} B", f"{len(body)} B"]
        )
    return Table(
        [
            "key",
            "sign (publisher, once per deploy)",
            "open + verify (agent, per message)",
            "deploy document",
            "signed envelope",
        ],
        rows,
        caption="In-process means over 200 repetitions (KMS: 20); the KMS row includes the round trip to the emulator "
        "and the publisher's local check of the signature it got back.",
    )


def run(bench: Bench) -> Section:
    sizes = (1, 10) if bench.quick else (1, 10, 50)
    deploys = 3 if bench.quick else 10
    samples: list[Samples] = []
    for n in sizes:
        print(f"  fan-out N={n}: floor ...", flush=True)
        floor = measure_floor(bench, n, deploys)
        print(f"  fan-out N={n}: agents ...", flush=True)
        samples.append(Samples(n, floor, measure_agents(bench, n, deploys)))
        print(f"  N={n}: floor p50 {ms(median(floor.times))}, ours p50 {ms(median(samples[-1].ours))}", flush=True)
    print("  fan-out N=10 signed: agents ...", flush=True)
    signed_run = measure_agents(bench, 10, deploys, signed=True)
    signed = signed_run.ours
    unsigned = next(s for s in samples if s.n == 10)
    print(f"  N=10 signed: p50 {ms(median(signed))} (unsigned {ms(median(unsigned.ours))})", flush=True)
    costs = signing_costs(bench)

    table = Table(
        [
            "N agents",
            "floor p50",
            "floor p95",
            "deployer p50",
            "deployer p95",
            "p50 ratio",
            "p95 ratio",
            "deployer p50 from SNS publish",
        ],
        [],
        caption=f"{deploys} measured deploys per N (after one warm-up), small artifact "
        f"({small_artifact(bench.workdir).stat().st_size // 1024} KiB), agents with poll_wait_seconds 20.",
    )
    for s in samples:
        table.rows.append(
            [
                str(s.n),
                ms(median(s.floor)),
                ms(percentile(s.floor, 95)),
                ms(median(s.ours)),
                ms(percentile(s.ours, 95)),
                f"{median(s.ours) / median(s.floor):.2f}×",
                f"{percentile(s.ours, 95) / percentile(s.floor, 95):.2f}×",
                ms(median(s.ours_from_sns)),
            ]
        )
    runs = [(str(s.n), s.run) for s in samples] + [("10, signed", signed_run)]
    breakdown = Table(
        [
            "N",
            "publisher: call → SNS Publish",
            "SNS Publish → first agent starts applying",
            "one agent's apply (median)",
            "first → last agent done",
            "apply waiting for history (median / max)",
            "CPU per agent per deploy",
        ],
        [
            [
                name,
                *(ms(median([p[i] for p in run.phases])) for i in range(4)),
                f"{ms(median(run.history_waits))} / {ms(max(run.history_waits))}",
                ms(run.cpu_per_deploy),
            ]
            for name, run in runs
        ],
        caption="Where the deployer's time goes (p50 over the deploys, from the agents' `apply_started` / "
        "`apply_succeeded` log timestamps). *Starts applying* is logged once the message was received and "
        "decided, the manifest read (inline: no request) and the artifact downloaded, verified, extracted and "
        "flushed (`syncfs`) into a hidden staging directory while the history GET confirmed the deploy; *one "
        "agent's apply* covers what follows: the fsync'd state records, the rename into `releases/`, the symlink "
        "swap and pruning (and an `applying` status PUT if the apply runs over 1 s). The status report and the "
        "DeleteMessage follow `apply_succeeded`, the report after the acknowledgement. *Waiting for history*: "
        "how long the staged release stood still for the history GET's answer (the agent's `history_waited_ms`): "
        "~0 means that GET, sent beside the download, is off the critical path. *CPU*: each agent process's "
        "user + system time over the measured deploys, per deploy (long polls included).",
    )
    cpu_rows = [(str(s.n), s.floor_run.cpu, s.run.cpu, median(s.ours) / median(s.floor)) for s in samples]
    cpu_rows.append(("10, signed", unsigned.floor_run.cpu, signed_run.cpu, median(signed) / median(unsigned.floor)))
    cpu_table = Table(
        [
            "N",
            "floor: its process + the emulator",
            "deployer: agents + the emulator + the publisher's process",
            "CPU ratio",
            "p50 ratio",
        ],
        [
            [
                name,
                f"{ms(f.driver)} + {ms(f.emulator)} = {ms(f.total)}",
                f"{ms(d.agents)} + {ms(d.emulator)} + {ms(d.driver)} = {ms(d.total)}",
                f"{d.total / f.total:.2f}×",
                f"{ratio:.2f}×",
            ]
            for name, f, d, ratio in cpu_rows
        ],
        caption="CPU per deploy of every process on the machine's cores (user + system, over the measured "
        "deploys, pauses and long polls included): both sides are CPU-bound on 2 cores, so their p50 ratio "
        "follows the ratio of their CPU. The floor's process is its N loops and the SNS call; the deployer's "
        "third term is the benchmark's process: the publisher, and the threads reading the agents' logs.",
    )
    by_n = {s.n: s for s in samples}
    targets = []
    at10 = by_n[10]
    r10 = median(signed) / median(at10.floor)
    targets.append(
        Target(
            "p50 ≤ 2× the floor at N = 10, deploys signed",
            r10 <= 2.0,
            f"{ms(median(signed))} vs floor {ms(median(at10.floor))} = {r10:.2f}× (from the SNS Publish "
            f"call instead of `publish()`: {ms(median(signed_run.ours_from_sns))} = "
            f"{median(signed_run.ours_from_sns) / median(at10.floor):.2f}×; unsigned {ms(median(at10.ours))} = "
            f"{median(at10.ours) / median(at10.floor):.2f}×)",
        )
    )
    growth = Table(
        ["N from → to", "floor growth", "deployer growth", "floor ms per added agent", "deployer ms per added agent"],
        [],
    )
    for a, b in itertools.pairwise(samples):
        fg = median(b.floor) / median(a.floor)
        og = median(b.ours) / median(a.ours)
        fs = (median(b.floor) - median(a.floor)) / (b.n - a.n)
        os_ = (median(b.ours) - median(a.ours)) / (b.n - a.n)
        growth.rows.append([f"{a.n} → {b.n}", f"{fg:.2f}×", f"{og:.2f}×", f"{fs * 1000:.1f}", f"{os_ * 1000:.1f}"])
    last, first = samples[-1], samples[0]
    fg = median(last.floor) / median(first.floor)
    og = median(last.ours) / median(first.ours)
    fslope = (median(last.floor) - median(first.floor)) / (last.n - first.n)
    oslope = (median(last.ours) - median(first.ours)) / (last.n - first.n)
    targets.append(
        Target(
            f"growth with N no worse than the floor's (p50, N = {first.n} → {last.n}, relative)",
            og <= fg * 1.1,
            f"deployer ×{og:.2f} vs floor ×{fg:.2f} (10 % noise allowance); in absolute terms "
            f"{oslope * 1000:.1f} vs {fslope * 1000:.1f} ms per added agent ({oslope / fslope:.1f}×)",
        )
    )
    meaning = (
        "How long from `Publisher.publish()` being called (artifact + manifest upload, history, pointer, SNS) "
        "until the last of N real `deployer agent` processes logged `apply_succeeded` for the new seq — the "
        "release is live on every instance (symlink swapped, state recorded; the status report is written "
        "right after). Convergence is read from the agents' JSON logs (`timestamp` of `apply_succeeded`), "
        "not by polling their S3 status reports, so the benchmark adds no load to the emulator while it "
        "waits; the agents and the benchmark share the machine's clock. The last column starts the clock at "
        "the SNS Publish call instead (caught by a botocore `before-call` hook), i.e. without the publisher's "
        "own uploads. The **floor** is what no deployer can beat on this emulator: N bare boto3 loops (threads "
        "in one process) long-polling N raw-delivery queues subscribed to the same topic; clock from "
        "`sns.publish` to the last loop having received the message and done one S3 GET of the same artifact."
    )
    notes = [
        "Why the deployer sits above the floor: per deploy and per agent the floor makes 3 requests "
        "(ReceiveMessage, GetObject, DeleteMessage); an agent makes 5 (the ReceiveMessage, the history GET that "
        "authenticates the deploy beside the artifact GET, the DeleteMessage, then the status PUT; the manifest "
        "travels inline) and does real work between them: extract into a staging dir, "
        "`syncfs`, fsync'd state records, a symlink swap, pruning — each agent in its own Python process, the 2 "
        "cores shared by N agents, the emulator and the benchmark. The emulator serialises requests "
        "(~400–500 req/s here), so at N = 50 every extra request per agent adds ~2 ms to the last agent's "
        "convergence. The publisher's own requests (head bucket, topic attributes, artifact, manifest, pointer "
        "read, history, pointer) come before the SNS Publish and are the first column of the breakdown.",
        "Growth table (p50s between consecutive N):",
        "",
        growth.markdown(),
    ]
    moves = (
        "the agents' own CPU, and little else. The CPU table shows why: on 2 cores both sides are CPU-bound, "
        "so the p50 ratio tracks the ratio of the CPU every process spends per deploy. A cheaper emulator "
        "would not help: it serves the floor's requests too, and the floor is mostly emulator, so the ratio "
        "would grow. The publisher's part is latency, not CPU (its process is under a tenth of the total): "
        "six requests in a row before the SNS call, each ordered by an invariant (gc's mark before the "
        "artifact's HEAD, the manifest before history, history before the pointer, the pointer before SNS). "
        "What is left is each agent's CPU per deploy against the floor's loop: five botocore calls (about "
        "40 % of an agent's samples in a py-spy profile) where the floor makes three in one process that "
        "pays its start-up once, and the work the floor skips (verify, extract, `syncfs`, fsync'd records, "
        "logs). Reaching 2× would take roughly a third off that CPU: the agent's S3 requests signed and sent "
        "without botocore (as `status` reads reports, `deployer.aws.rawget`), and fewer threads started per "
        "apply. On real AWS the emulator's share leaves the instance, and each agent has its own cores."
    )
    signing = Table(
        ["N = 10", "deployer p50", "deployer p95"],
        [
            ["unsigned", ms(median(unsigned.ours)), ms(percentile(unsigned.ours, 95))],
            ["signed (Ed25519, agents require it)", ms(median(signed)), ms(percentile(signed, 95))],
        ],
        caption="The same fan-out with every deploy signed at publish and verified by each agent before anything "
        "else (and its history entry verified again under the apply lock).",
    )
    return Section(
        "fanout",
        "1. Fan-out convergence",
        meaning,
        [table, breakdown, cpu_table, signing, costs],
        targets,
        notes,
        moves,
    )
