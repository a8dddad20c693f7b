"""The one reader of status reports: list `status/`, GET what changed (concurrently), parse each strictly.

Every reader of the fleet (`deployer status`, `publish --wait`, `deployer gc`, the demo) goes
through `ReportReader`. A report that cannot be parsed is kept as an entry with its error, so
callers show it as unreadable and count it honestly instead of crashing or hiding it; a report
deleted between LIST and GET (gc, a deregistering agent) is simply absent.

At fleet scale the reads are what costs: one LIST per 1,000 keys, then one GET per changed
report (docs/design.md, "Scale"). Three things keep 10,000 reports within seconds on S3
(docs/benchmarks.md, figure 6):

- **Signed GETs, not botocore calls** (`deployer.aws.rawget`): the same s3:GetObject, ~0.3 ms
  of CPU per report on one thread instead of ~0.8 ms.
- **GETs behind the listing.** Each LIST page's changed reports are handed out as soon as the
  page arrives, so the GETs run while the next pages are listed; the chain of pages (each needs
  the previous one's token) is the floor, not a phase before the GETs.
- **Worker processes for a large read.** Once a read has `PROCESS_THRESHOLD` reports to GET and
  the machine more than one core, they go to one spawned worker per core, each with its own
  connection pool, `LARGE_READ_CONCURRENCY` in flight between them and paced to
  `LARGE_READ_RATE`; the parent lists and merges. Below the threshold, and on one core, the
  reads stay in this process, `FLEET_READ_CONCURRENCY` at a time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

import structlog

from deployer.aws.clients import CONNECT_TIMEOUT_SECONDS, MAX_POOL_CONNECTIONS, READ_TIMEOUT_SECONDS
from deployer.aws.rawget import BucketAddress, Found, Item, SignedGetter, Worker, WorkerJob, read_report
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import AwsError, IncompleteAnswer
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.limits import S3_LIST_PAGE_KEYS, S3_READS_PER_PREFIX_PER_SECOND
from deployer.protocol.report import StatusReport

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

#: Reports read at once in the reader's own process. S3 serves 5,500 GET/s per prefix
#: (`S3_READS_PER_PREFIX_PER_SECOND`); this many in flight at 20-100 ms each is 640-3,200/s, and
#: it fits the connection pool.
FLEET_READ_CONCURRENCY = MAX_POOL_CONNECTIONS
#: Reports read at once by the worker processes of a large read, between them: at S3's 100 ms
#: (ASSUMED_GET_S in bench/scale.py) 10,000 reports take 2 s instead of 16 s at 64. Each worker
#: holds its share as its own pool (256 connections each on 2 cores: far below a process's
#: 1,024 descriptors).
LARGE_READ_CONCURRENCY = 512
#: ... and started at most this many per second between them, whatever the latency: 512 in flight
#: at an in-region 20 ms would be 25,600 GET/s, and S3 answers 503 SlowDown past 5,500 per prefix
#: (every report is under one). Some room is left for the other readers of the fleet.
#: https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html
LARGE_READ_RATE = 0.9 * S3_READS_PER_PREFIX_PER_SECOND
#: A read with at least this many reports to GET goes to worker processes. A worker costs ~0.17 s
#: of CPU to start (an interpreter and `deployer.aws.rawget`, no boto3), and a report ~0.6 ms read
#: in this process against ~0.3 ms of wall on each of two cores in workers: the start is paid
#: back from ~600 reports, so a full first LIST page decides. A `--wait` poll (its changed
#: reports) never gets here; its first read of a large fleet does.
PROCESS_THRESHOLD = 1000
#: Workers at most, whatever the core count: LARGE_READ_CONCURRENCY is shared between them.
MAX_READ_PROCESSES = 8


def read_processes() -> int:
    """One worker per core this process may run on (a container's CPU set, not the host's)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(cores, MAX_READ_PROCESSES)


@dataclass(frozen=True)
class ReportEntry:
    """One object under status/: whose it is (from the key), when S3 last wrote it, and what it says."""

    who: ReportKey
    s3_key: str
    etag: str
    last_modified: datetime
    report: StatusReport | None
    #: Why `report` is None: the body did not parse, or disagreed with its key.
    error: str | None = None


@dataclass(frozen=True)
class Listed:
    s3_key: str
    etag: str
    last_modified: datetime
    size: int = 0


@dataclass(frozen=True)
class ReadStats:
    """What the last read cost, for the benchmark's projection: LIST pages, GETs, where they ran,
    and the CPU each process spent on the read."""

    pages: int = 0
    gets: int = 0
    #: GETs of the last LIST page: what is left to read once the listing ends.
    last_page_gets: int = 0
    processes: int = 0
    #: CPU seconds of this process during the read (listing, handing out, merging, parsing here).
    cpu_s: float = 0.0
    #: CPU seconds of each worker process (empty when the read stayed in this process).
    worker_cpu_s: tuple[float, ...] = ()


@dataclass
class ReportReader:
    """Repeated reads of the status prefix that GET only the reports whose ETag changed.

    `publish --wait` polls every few seconds; listing is one request per 1000 instances, and
    an idle fleet's reports change once per heartbeat, so most polls cost a LIST and no GET.
    """

    s3: S3Client
    bucket: str
    layout: Layout
    stage: str | None = None
    role: str | None = None
    policy: RetryPolicy = DEFAULT_POLICY
    _seen: dict[str, ReportEntry] = field(default_factory=dict)
    #: What the last `refresh` or `read` cost.
    stats: ReadStats = field(default_factory=ReadStats)

    def pages(self) -> Iterator[list[tuple[ReportKey, Listed]]]:
        """The well-formed report keys under the prefix, one LIST page at a time (no GET). Each
        page is one attempt under the policy, resumed from the previous page's token."""
        prefix = self.layout.status_prefix(self.stage, self.role if self.stage else None)
        token: str | None = None
        while True:
            page = self.policy.call(self._list_page, prefix, token)
            listed = []
            for obj in page.get("Contents", []):
                who = self.layout.report_key(obj["Key"])
                if who is None:
                    log.debug("status_key_ignored", key=obj["Key"], next="not a report key; skipped")
                    continue
                listed.append((who, Listed(obj["Key"], obj.get("ETag", ""), obj["LastModified"], obj.get("Size", 0))))
            yield listed
            if not page["IsTruncated"]:
                return
            token = page["NextContinuationToken"]

    def _list_page(self, prefix: str, token: str | None) -> dict[str, Any]:
        resume: dict[str, Any] = {"ContinuationToken": token} if token else {}
        page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=S3_LIST_PAGE_KEYS, **resume)
        if page["IsTruncated"] and not page.get("NextContinuationToken"):
            # Without the token the rest of the listing is unreachable: cut short, not the end.
            raise IncompleteAnswer("AWS s3 ListObjectsV2 answered a truncated page without its token")
        return dict(page)

    def listing(self) -> dict[ReportKey, Listed]:
        """Every well-formed report key under the prefix, with its ETag and LastModified (no GET)."""
        return {who: listed for page in self.pages() for who, listed in page}

    def refresh(self) -> dict[ReportKey, ReportEntry]:
        """Every report as listed now; unchanged ones from the last refresh, deleted ones dropped.

        Requests: one LIST per 1,000 reports plus one GET per report whose ETag changed; the GETs
        of each page start as soon as it is listed.
        """
        fresh: dict[str, ReportEntry] = {}
        with _Reads(self) as reads:
            for page in self.pages():
                changed: list[tuple[ReportKey, Listed]] = []
                for who, listed in page:
                    cached = self._seen.get(listed.s3_key)
                    if cached is not None and cached.etag == listed.etag:
                        fresh[listed.s3_key] = cached
                    else:
                        changed.append((who, listed))
                reads.add(changed)
            for entry in reads.finish():
                fresh[entry.s3_key] = entry
        self._seen = fresh
        return {entry.who: entry for entry in fresh.values()}

    def read(self, listed: Iterable[tuple[ReportKey, Listed]]) -> list[ReportEntry]:
        """GET and parse these reports (in this process or, for many, in workers); deleted ones are left out."""
        with _Reads(self) as reads:
            reads.add(list(listed))
            return reads.finish()


class _Reads:
    """The GETs of one read, handed out as they are known (`add`), gathered by `finish`.

    In this process while there are fewer than PROCESS_THRESHOLD or only one core; from the add
    that reaches the threshold on, in worker processes (`deployer.aws.rawget.serve`), each
    page dealt round-robin between them. Entries carry the listing's LastModified; a worker's
    unreadable report is logged here, where every other warning of the read is.
    """

    def __init__(self, reader: ReportReader) -> None:
        self.reader = reader
        self.listed: dict[str, tuple[ReportKey, Listed]] = {}
        self.found: list[Found | None] = []
        self.local: list[Future[Found | None]] = []
        self.pool: ThreadPoolExecutor | None = None
        self.getter: SignedGetter | None = None
        self.where: BucketAddress | None = None
        self.workers: list[Worker] = []
        self.answers: SimpleQueue[tuple[Any, ...]] = SimpleQueue()
        self.worker_cpu: list[float] = []
        self.pages = 0
        self.last_page = 0
        self.cpu = time.process_time()

    def __enter__(self) -> _Reads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, items: list[tuple[ReportKey, Listed]]) -> None:
        self.pages += 1
        self.last_page = len(items)
        if not items:
            return
        for who, listed in items:
            self.listed[listed.s3_key] = (who, listed)
        if self.where is None:
            self.where = BucketAddress.of(self.reader.s3, self.reader.bucket, items[0][1].s3_key)
        if not self.workers and len(self.listed) >= PROCESS_THRESHOLD and read_processes() > 1:
            self._start_workers()
        work: list[Item] = [(who, listed.s3_key, listed.size) for who, listed in items]
        if self.workers:
            for index, worker in enumerate(self.workers):
                worker.send(work[index :: len(self.workers)])
            self._gather(block=False)
            return
        if self.pool is None:
            self.getter = SignedGetter(
                self.where, FLEET_READ_CONCURRENCY, (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
            )
            self.pool = ThreadPoolExecutor(FLEET_READ_CONCURRENCY, thread_name_prefix="report-read")
        getter, policy = self.getter, self.reader.policy
        assert getter is not None
        self.local += [self.pool.submit(read_report, getter, policy, *item) for item in work]

    def _start_workers(self) -> None:
        assert self.where is not None
        count = read_processes()
        job = WorkerJob.of(
            self.where,
            LARGE_READ_CONCURRENCY // count,
            LARGE_READ_RATE / count,
            (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
            self.reader.policy,
        )
        self.workers = [Worker(job, self.answers) for _ in range(count)]
        log.debug("report_workers_started", workers=count, concurrency=LARGE_READ_CONCURRENCY, rate=LARGE_READ_RATE)

    def _gather(self, block: bool) -> None:
        """Take the workers' answers: what is there (`block=False`), or until every worker is done."""
        while len(self.worker_cpu) < len(self.workers):
            if not block and self.answers.empty():
                return
            message = self.answers.get()
            if message[0] == "found":
                self.found += message[1]
            elif message[0] == "done":
                self.worker_cpu.append(message[1])
            else:
                _, text, code, status = message
                raise AwsError(text, code=code, status=status)

    def finish(self) -> list[ReportEntry]:
        """Every entry read (deleted reports left out), once every GET finished."""
        if self.workers:
            for worker in self.workers:
                worker.send(None)
            self._gather(block=True)
        self.found += [future.result() for future in self.local]
        entries = []
        for found in self.found:
            if found is None:
                continue  # deleted between LIST and GET (gc, or an agent deregistering)
            s3_key, etag, report, error = found
            who, listed = self.listed[s3_key]
            if error is not None:
                log.warning("status_report_unreadable", key=s3_key, error=error, next="shown as unreadable")
            entries.append(ReportEntry(who, s3_key, etag or listed.etag, listed.last_modified, report, error))
        self.reader.stats = ReadStats(
            pages=self.pages,
            gets=len(self.listed),
            last_page_gets=self.last_page,
            processes=len(self.workers),
            cpu_s=time.process_time() - self.cpu,
            worker_cpu_s=tuple(self.worker_cpu),
        )
        return entries

    def close(self) -> None:
        """Stop what is still running: a read that failed ends its workers and its threads."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for worker in self.workers:
            worker.close()
