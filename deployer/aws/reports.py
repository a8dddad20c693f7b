"""The one reader of status reports: list `status/`, GET what changed (concurrently), parse each strictly.

Every reader of the fleet (`deployer status`, `publish --wait`, `deployer gc`, the demo) goes
through `ReportReader`. A report that cannot be parsed is kept as an entry with its error, so
callers show it as unreadable and count it honestly instead of crashing or hiding it; a report
deleted between LIST and GET (gc, a deregistering agent) is simply absent.

At fleet scale the reads are what costs: one LIST per 1,000 keys, then one GET per changed
report, `FLEET_READ_CONCURRENCY` at a time (docs/design.md, "Scale").
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import structlog

from deployer.aws.clients import MAX_POOL_CONNECTIONS
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import ObjectReader, list_objects
from deployer.protocol.errors import InvalidReport
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.report import MAX_REPORT_BYTES, StatusReport, parse_report

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

#: Reports read at once. S3 serves 5,500 GET/s per prefix (`S3_READS_PER_PREFIX_PER_SECOND`);
#: this many in flight at 20-100 ms each is 640-3,200/s, and it fits the connection pool.
FLEET_READ_CONCURRENCY = MAX_POOL_CONNECTIONS


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
    objects: ObjectReader = field(init=False)

    def __post_init__(self) -> None:
        self.objects = ObjectReader(self.s3, self.bucket, self.policy)

    def listing(self) -> dict[ReportKey, Listed]:
        """Every well-formed report key under the prefix, with its ETag and LastModified (no GET)."""
        prefix = self.layout.status_prefix(self.stage, self.role if self.stage else None)
        listed: dict[ReportKey, Listed] = {}
        for obj in list_objects(self.s3, self.bucket, prefix, self.policy):
            who = self.layout.report_key(obj.key)
            if who is None:
                log.debug("status_key_ignored", key=obj.key, next="not a report key; skipped")
                continue
            listed[who] = Listed(obj.key, obj.etag, obj.last_modified, obj.size)
        return listed

    def refresh(self) -> dict[ReportKey, ReportEntry]:
        """Every report as listed now; unchanged ones from the last refresh, deleted ones dropped.

        Requests: one LIST per 1,000 reports plus one GET per report whose ETag changed.
        """
        fresh: dict[str, ReportEntry] = {}
        changed: list[tuple[ReportKey, Listed]] = []
        for who, listed in self.listing().items():
            cached = self._seen.get(listed.s3_key)
            if cached is not None and cached.etag == listed.etag:
                fresh[listed.s3_key] = cached
            else:
                changed.append((who, listed))
        for entry in self.read(changed):
            fresh[entry.s3_key] = entry
        self._seen = fresh
        return {entry.who: entry for entry in fresh.values()}

    def read(self, listed: Iterable[tuple[ReportKey, Listed]]) -> list[ReportEntry]:
        """GET and parse these reports, `FLEET_READ_CONCURRENCY` at a time; deleted ones are left out."""
        todo = list(listed)
        if len(todo) <= 1:
            found = [self._read(who, item) for who, item in todo]
        else:
            with ThreadPoolExecutor(min(FLEET_READ_CONCURRENCY, len(todo)), thread_name_prefix="report-read") as pool:
                found = list(pool.map(lambda pair: self._read(*pair), todo))
        return [entry for entry in found if entry is not None]

    def _read(self, who: ReportKey, listed: Listed) -> ReportEntry | None:
        """One report, never more than its limit downloaded: the listing's size is checked before
        the GET, and the GET asks for one byte past the limit in case the object grew since."""
        if listed.size > MAX_REPORT_BYTES:
            oversized = f"report is {listed.size} bytes, over the {MAX_REPORT_BYTES}-byte limit"
            log.warning("status_report_unreadable", key=listed.s3_key, error=oversized, next="shown as unreadable")
            return ReportEntry(who, listed.s3_key, listed.etag, listed.last_modified, None, oversized)
        found = self.objects.get(listed.s3_key, limit=MAX_REPORT_BYTES)
        if found is None:
            return None  # deleted between LIST and GET (gc, or an agent deregistering)
        body, etag, size = found
        try:
            if size > MAX_REPORT_BYTES:
                raise InvalidReport(f"report is {size} bytes, over the {MAX_REPORT_BYTES}-byte limit")
            report: StatusReport | None = parse_report(body, who)
            error = None
        except InvalidReport as exc:
            log.warning("status_report_unreadable", key=listed.s3_key, error=str(exc), next="shown as unreadable")
            report, error = None, str(exc)
        return ReportEntry(who, listed.s3_key, etag, listed.last_modified, report, error)
