"""Releases baked into an image: `deployer seed`, run on the Packer builder.

A deploy reuses a release directory already on disk when `releases/.meta/<id>.json` records the
same artifact checksum as the (authenticated) deploy's manifest (`engine._verified_on_disk`):
an instance launched from an image that carries it converges with no artifact download, its
hooks still run (they start the app), and a release that is no longer current is simply
downloaded as usual. Seeding writes exactly that and nothing else: the verified release tree
and its record, staged like any download. No queue, no subscription, no status report, no
ledger entry, no hook: the builder leaves nothing behind in the fleet, and the image carries no
state that says a deploy happened.

Only the symlink strategy keeps releases side by side, so only its releases can be seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deployer.apply.engine import Applier
from deployer.apply.fetch import fetch_release_manifest
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import get_document, read_pointer
from deployer.protocol.errors import ManifestError, PublishError
from deployer.protocol.layout import Layout
from deployer.protocol.manifest import Manifest, SyncStrategy, parse_manifest
from deployer.protocol.names import Channel

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass(frozen=True)
class Seeded:
    channel: Channel
    release_id: str
    release_dir: Path
    reused: bool


def seed(
    s3: S3Client,
    bucket: str,
    layout: Layout,
    channel: Channel,
    *,
    root_dir: Path,
    release_id: str | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Seeded:
    """Stage one release of `channel` under `root_dir`: its current one, or `release_id`."""
    manifest, release = _manifest(s3, bucket, layout, channel, release_id, policy)
    if manifest.sync_strategy is not SyncStrategy.SYMLINK or manifest.src is None:
        raise ManifestError(
            f"{channel} release {release} uses sync_strategy {manifest.sync_strategy.value}"
            f"{'' if manifest.src else ' without src'}: only symlink releases can be seeded (they live side by side)"
        )
    release_dir, reused = Applier(s3=s3, root_dir=root_dir, policy=policy).stage(manifest, release)
    return Seeded(channel, release, release_dir, reused)


def _manifest(
    s3: S3Client, bucket: str, layout: Layout, channel: Channel, release_id: str | None, policy: RetryPolicy
) -> tuple[Manifest, str]:
    if release_id is None:
        pointer = read_pointer(s3, bucket, layout, channel, policy)
        if pointer is None:
            raise PublishError(f"{channel} has never been published: nothing to seed")
        return fetch_release_manifest(pointer.deploy, bucket, s3, policy), pointer.deploy.release_id
    key = layout.manifest_key(channel.component, release_id)
    found = get_document(s3, bucket, key, policy)
    if found is None:
        raise PublishError(f"release {release_id} of {channel.component} does not exist (no {key})")
    return parse_manifest(found[0]), release_id
