"""`deployer apply`: stretcher's one-shot, so `echo s3://…/manifest.yml | deployer apply` can replace `| stretcher`,
and its signed form, `deployer apply --trust FILE --document s3://…/latest.json`.

stdin is read as stretcher reads it: one line holding the manifest URL, or the JSON array a
`consul watch -type event` handler receives, whose last event's base64 Payload is the URL.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import structlog

from deployer.apply.engine import Applier, ApplyResult
from deployer.apply.fetch import fetch_release_manifest, read_source
from deployer.apply.lock import ApplyLock
from deployer.aws.secrets import SecretReader
from deployer.protocol.envelope import MAX_ENVELOPE_BYTES
from deployer.protocol.errors import ConfigError
from deployer.protocol.limits import MAX_MANIFEST_BYTES
from deployer.protocol.manifest import parse_manifest
from deployer.protocol.release import RELEASE_ID_PATTERN
from deployer.protocol.trust import DeployVerifier, Trust

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)


def manifest_url_from_stdin(text: str) -> str | None:
    """The manifest URL in stretcher's stdin formats; None for an empty Consul event list."""
    stripped = text.strip()
    if not stripped:
        raise ConfigError("no manifest URL on stdin (expected a URL line or a Consul event JSON array)")
    if not stripped.startswith("["):
        return stripped.splitlines()[0].strip()
    try:
        events = json.loads(stripped)
    except ValueError as exc:
        raise ConfigError(f"stdin looks like a Consul event array but is not JSON: {exc}") from None
    if not isinstance(events, list):
        raise ConfigError("stdin JSON must be a Consul event array")
    if not events:
        return None  # consul watch calls its handler once with [] at start: nothing to do
    payload = events[-1].get("Payload") if isinstance(events[-1], dict) else None
    if not isinstance(payload, str):
        raise ConfigError("the last Consul event has no base64 Payload")
    try:
        return base64.b64decode(payload, validate=True).decode().strip()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"the last Consul event's Payload is not base64 text: {exc}") from None


def oneshot_release_id(checksum: str | None) -> str:
    """`deployer apply`'s release directory name: the same artifact → the same directory, so a
    re-run reuses it instead of downloading (a published release is named by CI instead:
    `publisher.publish.default_release_id`)."""
    return f"sha-{checksum[:16]}" if checksum else "commands-only"


def check_manifest_url(url: str, *, allow_http: bool) -> None:
    """Refuse a plain-http manifest unless asked: whoever sits on that network path would choose
    the commands this machine runs (the manifest's checksum pins the artifact, nothing pins the
    manifest). stretcher fetched them anyway; we only do when told to."""
    if urlparse(url).scheme == "http" and not allow_http:
        raise ConfigError(
            f"refusing the http:// manifest URL {url}: anyone on the network path could replace it and run "
            "commands here; use https:// or s3://, or allow it with --allow-http (config: allow_http_manifests: true)"
        )


def apply_manifest_url(
    url: str,
    *,
    s3: S3Client,
    root_dir: Path,
    state_dir: Path,
    hook_timeout: float,
    release_id: str | None = None,
    allow_http: bool = False,
    secrets: SecretReader | None = None,
) -> ApplyResult:
    check_manifest_url(url, allow_http=allow_http)
    manifest = parse_manifest(read_source(url, s3, MAX_MANIFEST_BYTES))
    release_id = release_id or oneshot_release_id(manifest.checksum)
    if not RELEASE_ID_PATTERN.match(release_id):
        raise ConfigError(f"release id {release_id!r} does not match {RELEASE_ID_PATTERN.pattern}")
    structlog.contextvars.bind_contextvars(release_id=release_id)
    with ApplyLock(state_dir):
        log.info("apply_started", manifest=url, strategy=manifest.sync_strategy.value)
        applier = Applier(s3=s3, root_dir=root_dir, hook_timeout=hook_timeout, secrets=secrets)
        result = applier.apply(manifest, release_id, env={})
    log.info("apply_succeeded", release_dir=str(result.release_dir or ""), reused=result.reused)
    return result


def apply_signed_document(
    url: str,
    *,
    trust: Trust,
    s3: S3Client,
    root_dir: Path,
    state_dir: Path,
    hook_timeout: float,
    secrets: SecretReader | None = None,
) -> ApplyResult:
    """`deployer apply --trust FILE --document s3://…`: a channel's pointer or history entry, checked
    as an agent checks it (envelope, type, signatures, floor), then its manifest (sha256 pinned)
    and its artifact (sha256 and size pinned). Signatures are required: that is what --trust asks."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError(f"--document {url!r} must be an s3:// URL of a pointer or history object")
    deploy = DeployVerifier(trust, required=True).open(read_source(url, s3, MAX_ENVELOPE_BYTES))
    manifest = fetch_release_manifest(deploy, parsed.netloc, s3)
    structlog.contextvars.bind_contextvars(release_id=deploy.release_id, seq=deploy.seq, deploy_id=deploy.deploy_id)
    with ApplyLock(state_dir):
        log.info("apply_started", document=url, channel=str(deploy.channel), strategy=manifest.sync_strategy.value)
        applier = Applier(s3=s3, root_dir=root_dir, hook_timeout=hook_timeout, secrets=secrets)
        result = applier.apply(manifest, deploy.release_id, env={}, artifact_size=deploy.artifact_size)
    log.info("apply_succeeded", release_dir=str(result.release_dir or ""), reused=result.reused)
    return result
