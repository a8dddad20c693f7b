"""`deployer history`: the deploys of one channel, newest first, from `history/<seq>.json`.

History objects are written once per seq by the publisher's claim (If-None-Match: *), so
listing the history prefix gives every deploy in seq order (the keys are zero-padded).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import structlog

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import get_document, list_objects, read_pointer
from deployer.protocol.deploy import Deploy
from deployer.protocol.errors import InvalidMessage
from deployer.protocol.layout import Layout
from deployer.protocol.names import Channel
from deployer.protocol.trust import UNVERIFIED
from publisher.text import render_table

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)


def history_keys(
    s3: S3Client, bucket: str, layout: Layout, channel: Channel, policy: RetryPolicy = DEFAULT_POLICY
) -> list[str]:
    """Every history key of the channel, oldest seq first (a LIST costs one request per 1000 keys)."""
    listed = list_objects(s3, bucket, layout.history_prefix(channel), policy)
    return sorted(item.key for item in listed if item.key.endswith(".json"))


def iter_history(
    s3: S3Client, bucket: str, layout: Layout, channel: Channel, policy: RetryPolicy = DEFAULT_POLICY
) -> Iterator[Deploy]:
    """Deploys newest first, read lazily, so a caller that stops early GETs only what it used."""
    for key in reversed(history_keys(s3, bucket, layout, channel, policy)):
        found = get_document(s3, bucket, key, policy)
        if found is None:
            continue
        try:
            yield UNVERIFIED.open(found[0])
        except InvalidMessage as exc:
            log.warning("history_entry_invalid", key=key, error=str(exc), next="skipped")


def pointer_deploys(
    s3: S3Client, bucket: str, layout: Layout, channels: Iterable[Channel], policy: RetryPolicy = DEFAULT_POLICY
) -> dict[Channel, Deploy]:
    """The pointer's deploy of each channel that has one (unreadable pointers are left out)."""
    found: dict[Channel, Deploy] = {}
    for channel in sorted(channels):
        try:
            pointer = read_pointer(s3, bucket, layout, channel, policy)
        except InvalidMessage as exc:
            log.warning("pointer_invalid", channel=str(channel), error=str(exc), next="not compared with")
            continue
        if pointer is not None:
            found[channel] = pointer.deploy
    return found


def describe_origin(origin: Mapping[str, str]) -> str:
    """Who published and from where, in one short cell: CI run first, else user@host."""
    parts = []
    if "github_repository" in origin:
        parts.append(
            f"github:{origin['github_repository']}"
            + (f"#{origin['github_run_id']}" if "github_run_id" in origin else "")
        )
    if "ci_project_path" in origin:
        parts.append(
            f"gitlab:{origin['ci_project_path']}"
            + (f"#{origin['ci_pipeline_id']}" if "ci_pipeline_id" in origin else "")
        )
    if "build_url" in origin:
        parts.append(origin["build_url"])
    who = origin.get("github_actor") or origin.get("gitlab_user_login") or origin.get("user")
    if who or "host" in origin:
        parts.append(f"{who or '?'}@{origin.get('host', '?')}")
    if origin.get("action") == "rollback":
        parts.append(f"(rollback from seq {origin.get('rollback_from_seq', '?')})")
    return " ".join(parts) or "-"


def format_history(deploys: Sequence[Deploy], current_seq: int | None) -> str:
    header = ("SEQ", "RELEASE", "DEPLOY", "PUBLISHED", "BY / FROM")
    body = [
        (
            f"{d.seq}{' *' if d.seq == current_seq else ''}",
            d.release_id,
            d.deploy_id,
            d.published_at,
            describe_origin(d.origin),
        )
        for d in deploys
    ]
    return render_table(header, body)
