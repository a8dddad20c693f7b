"""Where everything lives in the bucket. The one place S3 keys are spelled out."""

from __future__ import annotations

from dataclasses import dataclass

from deployer.protocol import Channel

ARTIFACT_NAME = "artifact.tar.gz"
MANIFEST_NAME = "manifest.yml"


@dataclass(frozen=True)
class Layout:
    """The S3 key layout under one prefix (DESIGN.md, "S3 layout")."""

    prefix: str = "deployer"

    def _key(self, *parts: str) -> str:
        base = self.prefix.strip("/")
        return "/".join([base, *parts] if base else parts)

    def release_dir(self, component: str, release_id: str) -> str:
        return self._key("releases", component, release_id)

    def artifact_key(self, component: str, release_id: str, name: str = ARTIFACT_NAME) -> str:
        return f"{self.release_dir(component, release_id)}/{name}"

    def manifest_key(self, component: str, release_id: str) -> str:
        return f"{self.release_dir(component, release_id)}/{MANIFEST_NAME}"

    def channel_dir(self, channel: Channel) -> str:
        return self._key("channels", channel.stage, channel.role, channel.component)

    def pointer_key(self, channel: Channel) -> str:
        return f"{self.channel_dir(channel)}/latest.json"

    def history_key(self, channel: Channel, seq: int) -> str:
        # Zero-padded so a lexical listing is in seq order.
        return f"{self.channel_dir(channel)}/history/{seq:010d}.json"

    def history_prefix(self, channel: Channel) -> str:
        return f"{self.channel_dir(channel)}/history/"

    def status_prefix(self, stage: str | None = None, role: str | None = None) -> str:
        parts = [p for p in (stage, role) if p]
        return self._key("status", *parts) + "/"

    def status_key(self, stage: str, role: str, instance_id: str) -> str:
        return self._key("status", stage, role, f"{instance_id}.json")
