"""CI's side of freshness: sign each channel's timestamp (deployer.protocol.freshness).

`publish` (and `rollback`) vouch for the pointer they moved; `deployer trust refresh`, run on a
schedule more often than the trust's `refresh_s`, vouches again for every channel's current
pointer, so a fleet whose CI is alive never sees its timestamps expire, and one whose CI stopped
(or whose writes are withheld) sees them expire within `expires_s` and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import list_objects, read_pointer
from deployer.protocol.deploy import Deploy
from deployer.protocol.envelope import TIMESTAMP_PAYLOAD_TYPE
from deployer.protocol.errors import ConfigError, InvalidMessage
from deployer.protocol.freshness import Timestamp
from deployer.protocol.layout import Layout
from deployer.protocol.names import Channel
from publisher.signing import Signer, sign

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)


def vouch(
    s3: S3Client,
    bucket: str,
    layout: Layout,
    signers: Sequence[Signer],
    deploy: Deploy,
    policy: RetryPolicy = DEFAULT_POLICY,
    now: datetime | None = None,
) -> Timestamp:
    """Sign and store `deploy`'s channel timestamp: its seq is current as of `now`.

    Unconditional: the newest write wins, and an agent keeps the highest seq any valid timestamp
    vouched for, so a refresh that read the pointer just before a publish moved it can only make
    the timestamp say the older seq for one refresh period, never lower what an agent refuses.
    """
    if not signers:
        raise ConfigError("--sign-key is required: a timestamp vouches only when signed by the deploy keys")
    stamp = Timestamp(deploy.channel, deploy.seq, deploy.deploy_id, (now or datetime.now(UTC)).replace(microsecond=0))
    body = sign(stamp.to_json().encode(), TIMESTAMP_PAYLOAD_TYPE, signers).to_json().encode()
    policy.call(
        s3.put_object,
        Bucket=bucket,
        Key=layout.timestamp_key(deploy.channel),
        Body=body,
        ContentType="application/json",
    )
    return stamp


def channels_with_pointers(
    s3: S3Client, bucket: str, layout: Layout, policy: RetryPolicy = DEFAULT_POLICY
) -> list[Channel]:
    """Every channel that has a pointer (one LIST per 1,000 keys under channels/)."""
    found = {layout.channel_of_pointer(item.key) for item in list_objects(s3, bucket, layout.channels_prefix(), policy)}
    return sorted(channel for channel in found if channel is not None)


def refresh(
    s3: S3Client,
    bucket: str,
    layout: Layout,
    signers: Sequence[Signer],
    channels: Sequence[Channel] | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> list[Timestamp]:
    """Vouch again for the current pointer of `channels` (default: every channel with one)."""
    stamps = []
    for channel in channels if channels is not None else channels_with_pointers(s3, bucket, layout, policy):
        try:
            pointer = read_pointer(s3, bucket, layout, channel, policy)
        except InvalidMessage as exc:
            log.error("pointer_invalid", channel=str(channel), error=str(exc), next="not vouched for; fix the pointer")
            continue
        if pointer is None:
            continue
        stamps.append(vouch(s3, bucket, layout, signers, pointer.deploy, policy))
    return stamps
