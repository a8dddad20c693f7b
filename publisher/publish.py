"""`deployer publish`: immutable release → history → pointer → SNS, in that order (docs/design.md, "Publish order").

The seq claim is lock-free. `history/<seq>.json` is written with If-None-Match: *, so exactly
one publisher claims each seq; the pointer is then moved with If-Match on the etag it was read
with. A publisher that finds seq N claimed but the pointer still behind (its claimant is slow
or died) completes the pointer move for the claimant, then tries N+1. So two CI jobs racing
never share a seq, never lose an update, and a crashed publisher never wedges the channel.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import re
import socket
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import structlog

from deployer.aws.clients import Clients
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import (
    Pointer,
    Upload,
    bucket_exists,
    checksums_match,
    get_document,
    head,
    put_conditional,
    put_file_conditional,
    read_pointer,
    stored_checksum,
)
from deployer.protocol.deploy import Deploy, inlinable, new_deploy_id
from deployer.protocol.envelope import DEPLOY_PAYLOAD_TYPE
from deployer.protocol.errors import AwsError, ConfigError, PreconditionFailed, PublishError, ReleaseConflict
from deployer.protocol.freshness import Timestamp
from deployer.protocol.layout import Layout
from deployer.protocol.limits import MAX_DEPLOY_MESSAGE_BYTES, MAX_SNS_MESSAGE_BYTES
from deployer.protocol.manifest import Manifest, parse_manifest
from deployer.protocol.names import Channel
from deployer.protocol.release import RELEASE_ID_PATTERN
from deployer.protocol.retention import DEFAULT_GRACE, Grace
from deployer.protocol.rollout import Plan
from deployer.protocol.timestamps import utc_now_iso
from deployer.protocol.trust import UNVERIFIED
from publisher.artifact_file import ArtifactFile, check, known
from publisher.cache import PublishCache
from publisher.freshness import vouch
from publisher.pack import Artifact
from publisher.retention import ReleaseCondemned, check_not_condemned, take_back
from publisher.signing import Signer, sign

log = structlog.get_logger(__name__)

#: Bound on seq-claim rounds; each lost round means another publisher made progress.
MAX_CLAIM_ROUNDS = 100
#: CI variables copied into the deploy's `origin`, so `history` can say who published.
ORIGIN_ENV = (
    "GITHUB_REPOSITORY",
    "GITHUB_RUN_ID",
    "GITHUB_SHA",
    "GITHUB_ACTOR",
    "CI_PROJECT_PATH",
    "CI_PIPELINE_ID",
    "CI_COMMIT_SHA",
    "GITLAB_USER_LOGIN",
    "BUILD_URL",
)
_SHA = re.compile(r"^[0-9a-f]{7,40}$")


@dataclass(frozen=True)
class PublishResult:
    deploy: Deploy
    release_reused: bool
    sns_message_id: str | None
    sns_error: str | None


def default_release_id(artifact_sha256: str, env: Mapping[str, str] = os.environ, now: datetime | None = None) -> str:
    """`<UTC time>-<commit>`, the commit from CI variables, else the artifact's own hash."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    commit = next((env[k] for k in ("GITHUB_SHA", "CI_COMMIT_SHA") if _SHA.match(env.get(k, ""))), artifact_sha256)
    return f"{stamp}-{commit[:7]}"


def ci_origin(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    origin = {k.lower(): env[k][:256] for k in ORIGIN_ENV if env.get(k)}
    origin["host"] = socket.gethostname()[:256]
    with contextlib.suppress(KeyError, OSError):  # no passwd entry in some containers
        origin["user"] = getpass.getuser()[:256]
    return origin


class Staged(Protocol):
    """A staged rollout being published (`publisher.rollout.Staging`): its plan once the deploy id
    is known, and its first cursor, written before the pointer moves."""

    def plan(self, deploy_id: str) -> Plan: ...

    def start(self, deploy: Deploy) -> None: ...


class Publisher:
    def __init__(
        self,
        clients: Clients,
        bucket: str,
        topic_arn: str,
        layout: Layout,
        policy: RetryPolicy = DEFAULT_POLICY,
        signers: Sequence[Signer] = (),
        grace: Grace = DEFAULT_GRACE,
        inline_manifests: bool = False,
        cache: PublishCache | None = None,
    ):
        """With `signers`, every deploy document is written (history, pointer, SNS) as an envelope
        they signed, and pins the artifact's sha256 and size. `grace` is release gc's protocol
        (publisher/retention.py): every publish takes its release back from gc before it claims a seq.
        With `inline_manifests`, a small manifest also travels inside the deploy document, saving
        every agent a GET; off by default because agents older than it refuse the document. With
        `cache`, bytes whose check passed before on this machine are not checked again."""
        self.clients = clients
        self.bucket = bucket
        self.topic_arn = topic_arn
        self.layout = layout
        self.policy = policy
        self.signers = tuple(signers)
        self.grace = grace
        self.inline_manifests = inline_manifests
        self.cache = cache

    def check_resources(self) -> None:
        """One clear error for a missing bucket or topic, before anything is uploaded."""
        try:
            exists = bucket_exists(self.clients.s3, self.bucket, self.policy)
        except AwsError as exc:
            raise ConfigError(
                f"bucket {self.bucket!r} does not exist or is not accessible ({exc.code}); run `deployer init`"
            ) from None
        if not exists:
            raise ConfigError(f"bucket {self.bucket!r} does not exist or is not accessible (404); run `deployer init`")
        try:
            self.policy.call(self.clients.sns.get_topic_attributes, TopicArn=self.topic_arn)
        except AwsError as exc:
            raise ConfigError(
                f"topic {self.topic_arn!r} does not exist or is not accessible ({exc.code}); run `deployer init`"
            ) from None

    def publish(
        self,
        channel: Channel,
        artifact: Path | ArtifactFile | Artifact,
        *,
        template: Manifest,
        release_id: str | None = None,
        origin: Mapping[str, str] | None = None,
        staged: Staged | None = None,
    ) -> PublishResult:
        """Publish `artifact` (a packed `Artifact`, or a tarball CI built: its path, or the
        `ArtifactFile` already hashing it) as a new release.

        The artifact is stored once per content, at `artifacts/sha256/<hex>`: a publish that finds
        it there uploads nothing (a CI retry, a rebuild of the same tree, a promotion to another
        stage). A tarball CI built is checked as every agent would check it, in a thread of its
        own while the file is uploaded (unless the cache saw these bytes pass); a failed check
        cancels the upload and publishes nothing. The manifest, history and pointer are written
        conditionally.

        The reads that decide what to write run side by side (the bucket and topic check, gc's
        marks, whether the artifact is stored): on the way to the SNS call every round trip counts.
        """
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(5, thread_name_prefix="publish") as pool:
            resources = pool.submit(self.check_resources)
            if isinstance(artifact, Path):
                artifact = stack.enter_context(ArtifactFile(artifact, self.cache))
            if isinstance(artifact, ArtifactFile):
                checking = artifact.checking
                artifact = artifact.result()
            else:
                checking = pool.submit(check, known(artifact, self.cache), self.cache)
            release_id = release_id or default_release_id(artifact.sha256)
            if not RELEASE_ID_PATTERN.match(release_id):
                raise PublishError(f"release id {release_id!r} does not match {RELEASE_ID_PATTERN.pattern}")
            taken = pool.submit(self._take_back_from_gc, channel.component, release_id)
            stored = pool.submit(self._stored, artifact.sha256, artifact.s3_checksum)
            # The claim starts from the pointer: read now, beside the rest, it costs no round trip
            # of its own; if another publish moves it meanwhile, the claim's round simply fails.
            pointer = pool.submit(read_pointer, self.clients.s3, self.bucket, self.layout, channel, self.policy)
            resources.result()  # a missing bucket or topic: one clear error before anything is written
            taken.result()
            return self._publish(
                channel, artifact, release_id, stored.result(), checking, template, origin, staged, pointer
            )

    def store(self, channel: Channel, artifact: Artifact, *, template: Manifest, release_id: str) -> None:
        """Store the release (artifact and manifest) as `publish` would, and move no pointer: the
        first half of a publish across several targets, done everywhere before any fleet moves
        (`publisher.targets`); `publish_existing` is the second half."""
        self.check_resources()
        if not RELEASE_ID_PATTERN.match(release_id):
            raise PublishError(f"release id {release_id!r} does not match {RELEASE_ID_PATTERN.pattern}")
        self._take_back_from_gc(channel.component, release_id)
        with ThreadPoolExecutor(1, thread_name_prefix="store") as pool:
            checking = pool.submit(check, known(artifact, self.cache), self.cache)
            stored = self._stored(artifact.sha256, artifact.s3_checksum)
            self._store_release(channel, release_id, artifact, stored, checking, template)

    def _store_release(
        self,
        channel: Channel,
        release_id: str,
        artifact: Artifact,
        stored: bool | None,
        checking: Future[None],
        template: Manifest,
    ) -> tuple[bytes, bool]:
        """The artifact before the manifest that names it: (manifest body, whether anything was new)."""
        artifact_key, uploaded = self._store_artifact(channel.component, release_id, artifact, stored, checking)
        manifest = replace(
            template,
            src=f"s3://{self.bucket}/{artifact_key}",
            checksum=artifact.sha256,
            dest=template.dest or f"/opt/{channel.component}/current",
        )
        body, manifest_new = self._put_manifest(self.layout.manifest_key(channel.component, release_id), manifest)
        return body, uploaded or manifest_new

    def _stored(self, sha256: str, checksum: str | None = None) -> bool | None:
        """Is the content-addressed artifact stored (True), absent (False), or being collected by
        gc (None: its mark is past the reprieve)? The mark is read first: a sweep deletes the
        object before its mark, so no mark and the object present means no sweep is under way.

        With `checksum` (the `ObjectChecksum` of the local file), stored means S3's own checksum of
        the object matches it: an object damaged or overwritten since (even at the same size), or
        uploaded before S3 kept a SHA256 checksum for it, is uploaded again and so repaired. A
        size or a writer's metadata would vouch for bytes S3 never checked."""
        if not take_back(self.clients, self.bucket, self.layout.blob_mark_key(sha256), self.policy, self.grace):
            return None
        key = self.layout.blob_key(sha256)
        found = head(self.clients.s3, self.bucket, key, self.policy, checksum=checksum is not None)
        if found is None or checksum is None:
            return found is not None
        held = stored_checksum(found)
        if not checksums_match(held, checksum):
            log.warning(
                "artifact_stored_differs",
                key=key,
                held=held,
                expected=checksum,
                next="uploading it again: S3's checksum of the stored object does not match these bytes",
            )
            return False
        return True

    def _publish(
        self,
        channel: Channel,
        artifact: Artifact,
        release_id: str,
        stored: bool | None,
        checking: Future[None],
        template: Manifest,
        origin: Mapping[str, str] | None,
        staged: Staged | None,
        pointer: Future[Pointer | None] | None = None,
    ) -> PublishResult:
        # 1. The release: the artifact before the manifest that names it.
        manifest_body, new = self._store_release(channel, release_id, artifact, stored, checking, template)
        return self._deploy(
            channel,
            release_id,
            self.layout.manifest_key(channel.component, release_id),
            hashlib.sha256(manifest_body).hexdigest(),
            origin,
            release_reused=not new,
            artifact=(artifact.sha256, artifact.size),
            staged=staged,
            manifest_body=manifest_body,
            pointer=pointer,
        )

    def _store_artifact(
        self, component: str, release_id: str, artifact: Artifact, stored: bool | None, checking: Future[None]
    ) -> tuple[str, bool]:
        """(key, uploaded?): the content-addressed key, uploaded unless an object of that size is
        already there. If gc may be deleting that object right now (its mark is past the reprieve
        window), the release gets a copy of its own under `releases/` instead, which gc cannot
        touch while a pointer or recent history names it."""
        blob = self.layout.blob_key(artifact.sha256)
        if stored is not None:
            if stored:
                checking.result()
                log.info("artifact_exists", key=blob, next="not uploading it again")
                return blob, False
            upload = Upload(
                self.clients.s3, self.bucket, blob, artifact.path, artifact.sha256, artifact.compression.content_type
            )
            try:
                checking.result()  # the check reads the file while the upload sends it
            except BaseException:
                upload.cancel()
                raise
            upload.result(self.policy)
            return blob, True
        own = self.layout.artifact_key(component, release_id)
        log.warning("artifact_being_collected", key=blob, next=f"uploading the release's own copy to {own}")
        checking.result()
        try:
            put_file_conditional(
                self.clients.s3,
                self.bucket,
                own,
                artifact.path,
                artifact.sha256,
                artifact.compression.content_type,
                self.policy,
            )
        except PreconditionFailed:
            self._same_content(own, artifact.sha256)
            return own, False
        return own, True

    def _put_manifest(self, key: str, manifest: Manifest) -> tuple[bytes, bool]:
        """(the manifest body the release has, written now?). A release published before artifacts
        were content-addressed names its artifact elsewhere: the same release if all else is equal."""
        body = manifest.to_yaml().encode()
        try:
            put_conditional(
                self.clients.s3,
                self.bucket,
                key,
                body,
                policy=self.policy,
                content_type="application/yaml",
                metadata={"sha256": hashlib.sha256(body).hexdigest()},
            )
            return body, True
        except PreconditionFailed:
            pass
        found = get_document(self.clients.s3, self.bucket, key, self.policy)
        existing = parse_manifest(found[0]) if found else None
        if found is None or existing is None or replace(existing, src=manifest.src) != manifest:
            raise ReleaseConflict(
                f"s3://{self.bucket}/{key} already exists with different content; releases are immutable, use a new release id"
            )
        log.info("release_object_exists", key=key, next="reusing the identical release")
        return found[0], False

    def publish_existing(
        self,
        channel: Channel,
        release_id: str,
        *,
        origin: Mapping[str, str] | None = None,
        staged: Staged | None = None,
    ) -> PublishResult:
        """Deploy a release that is already in S3 (a rollback, or a promotion) as the channel's next seq.

        Nothing is uploaded; the manifest is read only to pin its sha256 in the deploy. Instances
        that still keep `releases/<release_id>` on disk re-activate it without downloading.
        """
        self.check_resources()
        if not RELEASE_ID_PATTERN.match(release_id):
            raise PublishError(f"release id {release_id!r} does not match {RELEASE_ID_PATTERN.pattern}")
        manifest_key = self.layout.manifest_key(channel.component, release_id)
        self._take_back_from_gc(channel.component, release_id)
        found = get_document(self.clients.s3, self.bucket, manifest_key, self.policy)
        if found is None:
            raise PublishError(
                f"release {release_id} of component {channel.component} does not exist (no s3://{self.bucket}/{manifest_key})"
            )
        self._take_artifact_back_from_gc(channel.component, release_id, found[0])
        return self._deploy(
            channel,
            release_id,
            manifest_key,
            hashlib.sha256(found[0]).hexdigest(),
            origin,
            release_reused=True,
            artifact=self._existing_artifact(found[0]) if self.signers else None,
            staged=staged,
            manifest_body=found[0],
        )

    def _take_artifact_back_from_gc(self, component: str, release_id: str, manifest_body: bytes) -> None:
        """A stored release's content-addressed artifact is shared and collected on its own: take it
        back from gc (or refuse), and make sure it is still there (`_stored`)."""
        src = parse_manifest(manifest_body).src or ""
        digest = self.layout.blob_named_by(self.bucket, src)
        if digest is None:
            return  # the release's own copy, collected with the release
        stored = self._stored(digest)
        if stored is None:
            raise ReleaseCondemned(
                f"the artifact of release {release_id} of {component} ({src}) is being deleted by "
                "`deployer gc releases`; publish the build again (it gets a copy of its own)"
            )
        if not stored:
            raise PublishError(
                f"release {release_id} of component {component} lost its artifact ({src} does not exist)"
            )

    def _take_back_from_gc(self, component: str, release_id: str) -> None:
        """Before the release's objects are read or written: a release `deployer gc releases`
        condemned is taken back, or refused if gc may be deleting it (publisher/retention.py).
        Checked first because a sweep deletes the mark last: no mark, then objects present,
        means no sweep of this release is under way."""
        check_not_condemned(self.clients, self.bucket, self.layout, component, release_id, self.policy, self.grace)

    def _existing_artifact(self, manifest_body: bytes) -> tuple[str, int]:
        """A stored release's artifact sha256 (from its manifest) and size (from S3), to sign."""
        manifest = parse_manifest(manifest_body)
        if manifest.src is None or manifest.checksum_algorithm != "sha256" or manifest.checksum is None:
            raise PublishError("a signed deploy needs the release's sha256; its manifest carries none")
        bucket, _, key = manifest.src.removeprefix("s3://").partition("/")
        found = head(self.clients.s3, bucket, key, self.policy)
        if found is None:
            raise PublishError(f"the release's artifact {manifest.src} does not exist")
        return manifest.checksum, int(str(found["ContentLength"]))

    def _deploy(
        self,
        channel: Channel,
        release_id: str,
        manifest_key: str,
        manifest_sha256: str,
        origin: Mapping[str, str] | None,
        *,
        release_reused: bool,
        artifact: tuple[str, int] | None,
        staged: Staged | None = None,
        manifest_body: bytes | None = None,
        pointer: Future[Pointer | None] | None = None,
    ) -> PublishResult:
        """Claim the next seq for the release and announce it. `manifest_body` (the bytes that hash
        to `manifest_sha256`) is carried inline when inlining is on and the document stays small;
        `pointer`, the channel's pointer read ahead, saves the claim's first read."""
        signed = bool(self.signers and artifact)
        deploy_id = new_deploy_id()
        template_deploy = Deploy(
            deploy_id=deploy_id,
            stage=channel.stage,
            role=channel.role,
            component=channel.component,
            seq=1,
            release_id=release_id,
            manifest_key=manifest_key,
            manifest_sha256=manifest_sha256,
            published_at=utc_now_iso(),
            origin=dict(origin or {}),
            artifact_sha256=artifact[0] if signed and artifact else None,
            artifact_size=artifact[1] if signed and artifact else None,
            rollout=staged.plan(deploy_id) if staged else None,
            manifest=inlinable(manifest_body) if self.inline_manifests and manifest_body is not None else None,
        )
        size = len(self._document(template_deploy))
        if template_deploy.manifest is not None and size + 32 > MAX_DEPLOY_MESSAGE_BYTES:
            # Agents refuse a document over this bound: the manifest stays in S3 only (a long origin or plan).
            template_deploy = replace(template_deploy, manifest=None)
            size = len(self._document(template_deploy))
        if size + 32 > MAX_SNS_MESSAGE_BYTES:
            raise PublishError("deploy message would exceed the SNS 256 KiB limit; shorten origin")
        if staged is not None:
            staged.start(template_deploy)  # the cursor exists before any agent can see the deploy
        # 2 + 3. History (the seq claim), then the pointer.
        deploy, body = self._claim_and_point(template_deploy, pointer)
        # 4. Fan-out. Agents that miss it still converge by reconcile, so a failure here is reported, not fatal.
        message_id, sns_error = self._notify(deploy, body)
        # 5. A signed fleet's timestamp: the new pointer is current as of now (deployer.protocol.freshness).
        if self.signers:
            self.vouch(deploy)
        return PublishResult(deploy, release_reused=release_reused, sns_message_id=message_id, sns_error=sns_error)

    def _same_content(self, key: str, sha256: str) -> None:
        """An object that was already there must be the same bytes: releases are immutable."""
        existing = head(self.clients.s3, self.bucket, key, self.policy) or {}
        metadata = existing.get("Metadata")
        if not isinstance(metadata, dict) or metadata.get("sha256") != sha256:
            raise ReleaseConflict(
                f"s3://{self.bucket}/{key} already exists with different content; releases are immutable, use a new release id"
            )
        log.info("release_object_exists", key=key, next="reusing the identical object")

    def _document(self, deploy: Deploy) -> bytes:
        """The deploy as written to history, the pointer and SNS: bare, or an envelope the signers signed."""
        payload = deploy.to_json().encode()
        return sign(payload, DEPLOY_PAYLOAD_TYPE, self.signers).to_json().encode() if self.signers else payload

    def _claim_and_point(self, template: Deploy, ahead: Future[Pointer | None] | None = None) -> tuple[Deploy, bytes]:
        channel = template.channel
        for _ in range(MAX_CLAIM_ROUNDS):
            if ahead is not None:
                pointer, ahead = ahead.result(), None
            else:
                pointer = read_pointer(self.clients.s3, self.bucket, self.layout, channel, self.policy)
            seq = pointer.deploy.seq + 1 if pointer else 1
            deploy = replace(template, seq=seq)
            body = self._document(deploy)
            history_key = self.layout.history_key(channel, seq)
            try:
                put_conditional(self.clients.s3, self.bucket, history_key, body, policy=self.policy)
            except PreconditionFailed:
                claimed = self._history(channel, seq)
                if claimed is None or claimed[0].deploy_id != deploy.deploy_id:
                    # Another publisher owns seq; make sure its pointer move happens, then go on to seq+1.
                    if claimed is not None:
                        self._help(*claimed, pointer.etag if pointer else None)
                    log.info("seq_taken", seq=seq, next="re-reading the pointer and trying the next seq")
                    continue
                # Our own earlier attempt whose response was lost: the claim (and its body) is ours.
                deploy, body = claimed
            if self._move_pointer(deploy, body, pointer.etag if pointer else None):
                log.info(
                    "pointer_moved",
                    channel=str(channel),
                    seq=seq,
                    deploy_id=deploy.deploy_id,
                    **deploy.deployment_attributes(),
                )
                return deploy, body
        raise PublishError(f"could not claim a seq on {channel} after {MAX_CLAIM_ROUNDS} rounds of contention")

    def _move_pointer(self, deploy: Deploy, body: bytes, etag: str | None) -> bool:
        """Point at our claimed seq. On a lost race, success if someone moved it there for us."""
        while True:
            try:
                put_conditional(
                    self.clients.s3,
                    self.bucket,
                    self.layout.pointer_key(deploy.channel),
                    body,
                    if_match=etag,
                    policy=self.policy,
                )
                return True
            except PreconditionFailed:
                current = read_pointer(self.clients.s3, self.bucket, self.layout, deploy.channel, self.policy)
                if current is not None and current.deploy.seq >= deploy.seq:
                    # Only history/<seq> content is ever written to the pointer, and history/<seq> is ours.
                    return True
                etag = current.etag if current else None

    def _help(self, claimed: Deploy, body: bytes, etag: str | None) -> None:
        """Move the pointer to another publisher's claim: its history body, byte for byte (its signature too)."""
        try:
            put_conditional(
                self.clients.s3,
                self.bucket,
                self.layout.pointer_key(claimed.channel),
                body,
                if_match=etag,
                policy=self.policy,
            )
            log.info("pointer_completed_for_other_publisher", seq=claimed.seq, deploy_id=claimed.deploy_id)
        except PreconditionFailed:
            pass  # someone (probably the claimant) already moved it

    def _history(self, channel: Channel, seq: int) -> tuple[Deploy, bytes] | None:
        found = get_document(self.clients.s3, self.bucket, self.layout.history_key(channel, seq), self.policy)
        return (UNVERIFIED.open(found[0]), found[0]) if found else None

    def vouch(self, deploy: Deploy) -> Timestamp | None:
        """Sign and store the channel's timestamp for `deploy`. Best effort: agents whose trust sets
        freshness report the channel stale until a later timestamp lands (`deployer trust refresh`,
        scheduled, writes one); nothing of the deploy depends on it."""
        try:
            return vouch(self.clients.s3, self.bucket, self.layout, self.signers, deploy, self.policy)
        except Exception as exc:  # noqa: BLE001 - the pointer already moved; the next refresh vouches for it
            log.warning(
                "timestamp_not_written",
                key=self.layout.timestamp_key(deploy.channel),
                seq=deploy.seq,
                error=str(exc),
                next="run `deployer trust refresh`; agents with freshness report the channel stale meanwhile",
            )
            return None

    def announce(self, channel: Channel) -> str | None:
        """Publish the channel's pointer to SNS again, byte for byte: how a rollout's cursor move
        reaches the agents at once (they re-read the cursor). Returns the SNS error, if any."""
        found = get_document(self.clients.s3, self.bucket, self.layout.pointer_key(channel), self.policy)
        if found is None:
            return f"{channel} has no pointer"
        return self._notify(UNVERIFIED.open(found[0]), found[0])[1]

    def _notify(self, deploy: Deploy, body: bytes) -> tuple[str | None, str | None]:
        try:
            response = self.policy.call(
                self.clients.sns.publish,
                TopicArn=self.topic_arn,
                Message=body.decode(),
                MessageAttributes={
                    name: {"DataType": "String", "StringValue": getattr(deploy, name)}
                    for name in ("stage", "role", "component")
                },
            )
        except Exception as exc:  # noqa: BLE001 - reported to the caller; the pointer already moved
            log.error(
                "sns_publish_failed", error=str(exc), seq=deploy.seq, next="agents converge at their next reconcile"
            )
            return None, f"{type(exc).__name__}: {exc}"
        return response["MessageId"], None
