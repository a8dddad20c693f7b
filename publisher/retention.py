"""`deployer gc releases`: delete the releases nothing refers to any more, in two phases.

Releases are immutable and one is written per publish, so they accumulate. A release may go
only when nothing can still want it:

- no channel's pointer names it, as its release or as its rollout's stable release (a rollout
  in flight is its channel's pointer: the candidate and the stable side are both kept);
- none of the last `keep` history entries of any channel of its component does (what
  `deployer rollback` returns to; a claimed seq whose pointer move is still pending is one);
- no instance's status report says it runs it;
- its newest object is older than `older_than`.

Reading all that and then deleting is a race: a rollback (or a CI retry re-publishing an
identical build) can start referring to an old release between gc's reads and its deletes. So
gc never deletes what it has just judged. It **condemns** the release: writes
`releases/<component>/<release_id>/condemned.json` (If-None-Match). A later run, once that mark
is older than `SWEEP_AFTER_SECONDS`, judges the release again from fresh reads and only then
deletes it (its manifest first, so nobody can start deploying it, the mark last, so an
interrupted run is finished by the next one; objects written after the mark are left alone).
Meanwhile every publish looks for the mark before it reads or writes the release's objects
(`check_not_condemned`): a mark younger than `REPRIEVE_WITHIN_SECONDS` is deleted (the release
is taken back), an older one makes the publish fail with an error saying to publish the build
again under a new release id.

Why that is safe: a publisher that saw no mark either finds the release's objects (a sweep
deletes the mark last, so none was under way) or uploads them itself, and writes its history
entry long before any sweep of a mark made after its check could act (the sweep re-reads
history); a publisher that reprieved a mark removed it half a grace period before any sweep
could act on it; and from `REPRIEVE_WITHIN_SECONDS` on no publisher refers to the release any
more. The argument holds as long as a publish takes less than `REPRIEVE_WITHIN_SECONDS` from its
check to its history write (upload included), and machine clocks are within minutes of S3's
(docs/design.md, "Release retention").

Unknown means keep: a component whose pointer or recent history cannot be read is left alone
whole, with a warning. Unreadable status reports refer to nothing (any instance can write
garbage into its own report; that must not stop collection for everyone), and are counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from deployer.aws.clients import CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS, Clients
from deployer.aws.rawget import BucketAddress, SignedGetter
from deployer.aws.reports import FLEET_READ_CONCURRENCY, ReportReader
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import delete_object, get_document, head, list_objects, put_conditional
from deployer.protocol.deploy import Deploy
from deployer.protocol.errors import DeployerError, PreconditionFailed, PublishError
from deployer.protocol.layout import ARTIFACTS, CONDEMNED_NAME, MANIFEST_NAME, Layout
from deployer.protocol.manifest import parse_manifest
from deployer.protocol.names import Channel
from deployer.protocol.retention import DEFAULT_GRACE, DEFAULT_KEEP, DEFAULT_OLDER_THAN_DAYS, SWEEP_AFTER_SECONDS, Grace
from deployer.protocol.timestamps import age_seconds, utc_now_iso
from deployer.protocol.trust import UNVERIFIED

log = structlog.get_logger(__name__)

SECONDS_PER_DAY = 86400.0


class ReleaseCondemned(PublishError):
    """Raised when a publish would refer to a release that gc is about to delete."""


@dataclass(frozen=True)
class Release:
    """One release directory, or one content-addressed artifact (`component` is then
    `ARTIFACTS` and `release_id` its sha256), as listed: its objects, their bytes, gc's mark."""

    component: str
    release_id: str
    #: (key, size) of every object but the mark, manifest first.
    objects: tuple[tuple[str, int], ...]
    newest: datetime
    condemned_at: datetime | None
    #: Where gc's mark is, and what a sweep lists again before deleting.
    mark: str
    prefix: str

    @property
    def size(self) -> int:
        return sum(size for _, size in self.objects)

    @property
    def name(self) -> str:
        return f"{self.component}/{self.release_id}"


@dataclass(frozen=True)
class References:
    """What may still be wanted, per component; components that could not be judged are `unknown`."""

    releases: Mapping[str, frozenset[str]]
    unknown: frozenset[str] = frozenset()
    unreadable_reports: int = 0

    def wanted(self, component: str, release_id: str) -> bool:
        return component in self.unknown or release_id in self.releases.get(component, frozenset())


@dataclass
class Judgement:
    """What one run does. Pure output of `judge` (filled in by it, read-only after)."""

    condemn: list[Release] = field(default_factory=list)
    sweep: list[Release] = field(default_factory=list)
    #: Condemned earlier, wanted again (a report, a history entry): the mark goes.
    pardon: list[Release] = field(default_factory=list)
    kept: int = 0


def judge(
    releases: Iterable[Release], refs: References, now: datetime, older_than_s: float, grace: Grace = DEFAULT_GRACE
) -> Judgement:
    """Pure: which releases to condemn, which condemned ones to delete now, which to pardon."""
    out = Judgement()
    for release in sorted(releases, key=lambda r: (r.component, r.newest, r.release_id)):
        wanted = refs.wanted(release.component, release.release_id)
        if release.condemned_at is not None:
            if wanted:
                out.pardon.append(release)
            elif age_seconds(release.condemned_at, now) >= grace.sweep_after_s:
                out.sweep.append(release)
        elif wanted or age_seconds(release.newest, now) < older_than_s:
            out.kept += 1
        else:
            out.condemn.append(release)
    return out


def group_releases(layout: Layout, listed: Iterable[tuple[str, int, datetime]]) -> list[Release]:
    """LIST rows (key, size, LastModified) → releases. Pure. Keys the publisher cannot have
    written (not `releases/<component>/<release_id>/<name>`) are not part of any release."""
    objects: dict[tuple[str, str], list[tuple[str, int, datetime]]] = {}
    marks: dict[tuple[str, str], datetime] = {}
    for key, size, modified in listed:
        parsed = layout.release_object(key)
        if parsed is None:
            continue
        component, release_id, name = parsed
        if name == CONDEMNED_NAME:
            marks[(component, release_id)] = modified
        else:
            objects.setdefault((component, release_id), []).append((key, size, modified))
    releases = []
    for (component, release_id), rows in objects.items():
        # The manifest first: deleting it first makes the release undeployable before it is incomplete.
        rows.sort(key=lambda row: (not row[0].endswith(f"/{MANIFEST_NAME}"), row[0]))
        releases.append(
            Release(
                component,
                release_id,
                tuple((key, size) for key, size, _ in rows),
                max(modified for _, _, modified in rows),
                marks.pop((component, release_id), None),
                layout.condemned_key(component, release_id),
                layout.release_dir(component, release_id) + "/",
            )
        )
    for (component, release_id), marked in marks.items():  # a sweep interrupted after its last object
        mark, prefix = layout.condemned_key(component, release_id), layout.release_dir(component, release_id) + "/"
        releases.append(Release(component, release_id, (), marked, marked, mark, prefix))
    return releases


def group_blobs(layout: Layout, listed: Iterable[tuple[str, int, datetime]]) -> list[Release]:
    """LIST rows under artifacts/ → one candidate per content-addressed artifact. Pure."""
    objects: dict[str, tuple[str, int, datetime]] = {}
    marks: dict[str, datetime] = {}
    for key, size, modified in listed:
        parsed = layout.blob_object(key)
        if parsed is None:
            continue
        digest, is_mark = parsed
        if is_mark:
            marks[digest] = modified
        else:
            objects[digest] = (key, size, modified)
    blobs = []
    for digest in sorted(set(objects) | set(marks)):
        if digest in objects:
            key, size, modified = objects[digest]
            rows: tuple[tuple[str, int], ...] = ((key, size),)
        else:  # a sweep interrupted after the artifact, before its mark
            rows, modified = (), marks[digest]
        blobs.append(
            Release(
                ARTIFACTS,
                digest,
                rows,
                modified,
                marks.get(digest),
                layout.blob_mark_key(digest),
                layout.blob_key(digest),
            )
        )
    return blobs


def deploy_references(layout: Layout, deploy: Deploy) -> set[tuple[str, str]]:
    """(component, release_id) a deploy can make an instance fetch: its release and its rollout's
    stable one, by id and by the manifest key it actually names. Pure."""
    refs = {(deploy.component, deploy.release_id)}
    manifests = [deploy.manifest_key]
    if deploy.rollout is not None:
        refs.add((deploy.component, deploy.rollout.stable.release_id))
        manifests.append(deploy.rollout.stable.manifest_key)
    for key in manifests:
        parsed = layout.release_object(key)
        if parsed is not None:
            refs.add(parsed[:2])
    return refs


@dataclass(frozen=True)
class Collection:
    """What one `gc releases` run condemned, deleted, pardoned and kept."""

    dry_run: bool
    condemned: list[Release]
    deleted: list[Release]
    pardoned: list[Release]
    kept: int
    unknown: frozenset[str]
    unreadable_reports: int

    @property
    def bytes_reclaimed(self) -> int:
        return sum(release.size for release in self.deleted)

    def to_dict(self) -> dict[str, object]:
        def rows(releases: list[Release]) -> list[dict[str, object]]:
            return [{"component": r.component, "release_id": r.release_id, "bytes": r.size} for r in releases]

        return {
            "dry_run": self.dry_run,
            "deleted": rows(self.deleted),
            "condemned": rows(self.condemned),
            "pardoned": rows(self.pardoned),
            "kept": self.kept,
            "skipped_components": sorted(self.unknown),
            "unreadable_reports": self.unreadable_reports,
            "bytes_reclaimed": self.bytes_reclaimed,
        }


class ReleaseCollector:
    def __init__(
        self,
        clients: Clients,
        bucket: str,
        layout: Layout,
        policy: RetryPolicy = DEFAULT_POLICY,
        grace: Grace = DEFAULT_GRACE,
    ) -> None:
        self.clients = clients
        self.bucket = bucket
        self.layout = layout
        self.policy = policy
        self.grace = grace

    def releases(self, component: str | None) -> list[Release]:
        """One LIST per 1,000 release objects."""
        listed = list_objects(self.clients.s3, self.bucket, self.layout.releases_prefix(component), self.policy)
        return group_releases(self.layout, ((o.key, o.size, o.last_modified) for o in listed))

    def references(self, components: set[str], keep: int) -> References:
        """Pointers and the last `keep` history entries of every channel of these components, and
        every status report: one LIST of channels/, (1 + keep) GETs per channel, the reports."""
        wanted: dict[str, set[str]] = {component: set() for component in components}
        unknown = self._channel_references(components, keep, wanted)
        unreadable = 0
        for entry in ReportReader(self.clients.s3, self.bucket, self.layout, policy=self.policy).refresh().values():
            if entry.report is None:
                unreadable += 1
                continue
            for component, status in entry.report.components.items():
                if status.release_id:
                    wanted.setdefault(component, set()).add(status.release_id)
        return References({c: frozenset(ids) for c, ids in wanted.items()}, frozenset(unknown), unreadable)

    def _channel_references(self, components: set[str], keep: int, wanted: dict[str, set[str]]) -> set[str]:
        """Add what the channels of `components` refer to; return the components it could not tell."""
        unknown: set[str] = set()
        listed = list_objects(self.clients.s3, self.bucket, self.layout.channels_prefix(), self.policy)
        by_dir: dict[str, list[str]] = {}
        for item in listed:
            by_dir.setdefault(item.key.rpartition("/")[0] + "/", []).append(item.key)
        for channel in (self.layout.channel_of_pointer(item.key) for item in listed):
            if channel is None or channel.component not in components:
                continue
            history = sorted(by_dir.get(self.layout.history_prefix(channel), []))
            try:
                deploys = self._recent(channel, history[-keep:] if keep else [])
            except DeployerError as exc:  # unparseable, or unreadable after retries
                log.warning(
                    "release_gc_channel_unreadable",
                    channel=str(channel),
                    error=str(exc),
                    next="keeping every release of the component",
                )
                unknown.add(channel.component)
                continue
            for deploy in deploys:
                for component, release_id in deploy_references(self.layout, deploy):
                    wanted.setdefault(component, set()).add(release_id)
        return unknown

    def _recent(self, channel: Channel, recent: list[str]) -> list[Deploy]:
        """The pointer's deploy and these history entries. A missing or unparseable one raises:
        what it names is unknown, so its component must be kept whole."""
        deploys = []
        for key in [self.layout.pointer_key(channel), *recent]:
            found = get_document(self.clients.s3, self.bucket, key, self.policy)
            if found is None:
                raise DeployerError(f"s3://{self.bucket}/{key} disappeared while gc read it")
            deploys.append(UNVERIFIED.open(found[0]))
        return deploys

    def run(
        self,
        *,
        keep: int = DEFAULT_KEEP,
        older_than_days: float = DEFAULT_OLDER_THAN_DAYS,
        component: str | None = None,
        dry_run: bool = False,
        now: datetime | None = None,
    ) -> Collection:
        """List the releases, then read what refers to them (in that order: a release that
        appears after the LIST is not judged at all), then condemn, pardon and sweep."""
        now = now or datetime.now(UTC)
        releases = self.releases(component)
        refs = self.references({r.component for r in releases}, keep)
        verdict = judge(releases, refs, now, older_than_days * SECONDS_PER_DAY, self.grace)
        deleted = self._carry_out(verdict, now, dry_run)
        # Then the artifacts, judged by the manifests that are left (a condemned release's still counts).
        gone = {(r.component, r.release_id) for r in deleted}
        blobs = self.blobs()
        blob_refs = self.blob_references([r for r in releases if (r.component, r.release_id) not in gone])
        blob_verdict = judge(blobs, blob_refs, now, older_than_days * SECONDS_PER_DAY, self.grace)
        deleted += self._carry_out(blob_verdict, now, dry_run)
        return Collection(
            dry_run,
            verdict.condemn + blob_verdict.condemn,
            deleted,
            verdict.pardon + blob_verdict.pardon,
            verdict.kept + blob_verdict.kept,
            refs.unknown | blob_refs.unknown,
            refs.unreadable_reports,
        )

    def _carry_out(self, verdict: Judgement, now: datetime, dry_run: bool) -> list[Release]:
        """Condemn, pardon and sweep as judged; the ones actually deleted (all swept ones in a dry run)."""
        if dry_run:
            return verdict.sweep
        for release in verdict.condemn:
            self._condemn(release)
        for release in verdict.pardon:
            delete_object(self.clients.s3, self.bucket, self._mark(release), self.policy)
            log.info("release_pardoned", release=release.name, next="kept; it is referenced again")
        return [release for release in verdict.sweep if self._sweep(release, now)]

    def blobs(self) -> list[Release]:
        listed = list_objects(self.clients.s3, self.bucket, self.layout.blobs_prefix(), self.policy)
        return group_blobs(self.layout, ((o.key, o.size, o.last_modified) for o in listed))

    def blob_references(self, releases: list[Release]) -> References:
        """The artifacts the manifests of these releases name (one GET per manifest, concurrent).
        A manifest that cannot be parsed names something unknown: no artifact is collected."""
        manifests = [key for r in releases for key, _ in r.objects if key.endswith(f"/{MANIFEST_NAME}")]
        if not manifests:
            return References({ARTIFACTS: frozenset()}, frozenset())
        where = BucketAddress.of(self.clients.s3, self.bucket, manifests[0])
        getter = SignedGetter(where, FLEET_READ_CONCURRENCY, (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS))
        with ThreadPoolExecutor(min(FLEET_READ_CONCURRENCY, len(manifests))) as pool:
            bodies = list(pool.map(lambda key: self.policy.call(getter.get, key), manifests))
        named: set[str] = set()
        unknown: set[str] = set()
        for key, found in zip(manifests, bodies, strict=True):
            if found is None:
                continue  # deleted since the LIST: a concurrent sweep
            try:
                src = parse_manifest(found[0]).src or ""
            except DeployerError as exc:
                log.warning("release_gc_manifest_unreadable", key=key, error=str(exc), next="keeping every artifact")
                unknown.add(ARTIFACTS)
                continue
            digest = self.layout.blob_named_by(self.bucket, src)
            if digest is not None:
                named.add(digest)
        return References({ARTIFACTS: frozenset(named)}, frozenset(unknown))

    def _mark(self, release: Release) -> str:
        return release.mark

    def _condemn(self, release: Release) -> None:
        body = f'{{"condemned_at": "{utc_now_iso()}"}}\n'.encode()
        with contextlib.suppress(PreconditionFailed):  # a concurrent run condemned it first: same mark
            put_conditional(self.clients.s3, self.bucket, self._mark(release), body, policy=self.policy)
        log.info("release_condemned", release=release.name, bytes=release.size, next="deleted by a run in an hour")

    def _sweep(self, release: Release, now: datetime) -> bool:
        """Delete a release whose mark is still there and old enough (a publisher or an operator
        may have removed it since the LIST): manifest, other objects, then the mark. The release
        is listed again, so an object written after the run's LIST does not outlive the rest."""
        mark = head(self.clients.s3, self.bucket, self._mark(release), self.policy)
        modified = mark.get("LastModified") if mark else None
        if not isinstance(modified, datetime) or age_seconds(modified, now) < self.grace.sweep_after_s:
            log.info("release_reprieved", release=release.name, next="kept; its mark was taken back")
            return False
        listed = list_objects(self.clients.s3, self.bucket, release.prefix, self.policy)
        rows = ((o.key, o.size, o.last_modified) for o in listed)
        current = (
            group_blobs(self.layout, rows) if release.component == ARTIFACTS else group_releases(self.layout, rows)
        )
        if current and current[0].objects and current[0].newest > modified:
            # Written again after it was condemned (a publisher re-uploading a swept release): not ours to delete.
            delete_object(self.clients.s3, self.bucket, self._mark(release), self.policy)
            log.info("release_pardoned", release=release.name, next="kept; it was uploaded again")
            return False
        for key, _ in current[0].objects if current else ():
            delete_object(self.clients.s3, self.bucket, key, self.policy)
        delete_object(self.clients.s3, self.bucket, self._mark(release), self.policy)
        log.info("release_deleted", release=release.name, bytes=release.size)
        return True


def take_back(
    clients: Clients,
    bucket: str,
    mark_key: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    grace: Grace = DEFAULT_GRACE,
    now: datetime | None = None,
) -> bool:
    """Before a publish relies on an object gc may have condemned: True if nothing condemned it
    or the mark was young enough to delete (the object is taken back), False if gc may be
    deleting it now. One HEAD when nothing condemned it."""
    mark = head(clients.s3, bucket, mark_key, policy)
    if mark is None:
        return True
    modified = mark.get("LastModified")
    if not isinstance(modified, datetime) or age_seconds(modified, now) >= grace.reprieve_within_s:
        return False
    delete_object(clients.s3, bucket, mark_key, policy)
    log.info("condemned_object_taken_back", mark=mark_key, next="publishing it")
    return True


def check_not_condemned(
    clients: Clients,
    bucket: str,
    layout: Layout,
    component: str,
    release_id: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    grace: Grace = DEFAULT_GRACE,
    now: datetime | None = None,
) -> None:
    """Before a publish refers to a release: take it back from gc, or refuse if gc may be
    deleting it. Called before the release's objects are read or written."""
    if not take_back(clients, bucket, layout.condemned_key(component, release_id), policy, grace, now):
        raise ReleaseCondemned(
            f"release {release_id} of {component} was condemned by `deployer gc releases` "
            f"more than {grace.reprieve_within_s:.0f} s ago and may be being deleted; "
            "publish the build again under a new release id"
        )


def describe_releases(outcome: Collection) -> list[str]:
    """What a run did (or would do), one line per release and a total. Pure."""
    dry = outcome.dry_run
    lines = [f"{'would delete' if dry else 'deleted'} {r.name} ({format_bytes(r.size)})" for r in outcome.deleted]
    lines += [f"{'would condemn' if dry else 'condemned'} {r.name} ({format_bytes(r.size)})" for r in outcome.condemned]
    lines += [f"{'would pardon' if dry else 'pardoned'} {r.name}: referenced again" for r in outcome.pardoned]
    lines += [f"skipped component {c}: its pointer or recent history is unreadable" for c in sorted(outcome.unknown)]
    if outcome.unreadable_reports:
        lines.append(f"{outcome.unreadable_reports} unreadable status report(s) refer to nothing")
    lines.append(
        f"{len(outcome.deleted)} release(s) {'would be ' if dry else ''}deleted, "
        f"{format_bytes(outcome.bytes_reclaimed)} {'would be ' if dry else ''}reclaimed; "
        f"{len(outcome.condemned)} condemned (deleted by a run at least "
        f"{SWEEP_AFTER_SECONDS / 3600:.0f} h later if still unreferenced); {outcome.kept} kept"
    )
    return lines


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
