"""Where everything lives in the bucket. The one place S3 keys are spelled out, and read back.

```
<prefix>/releases/<component>/<release_id>/artifact.tar.gz   immutable
<prefix>/releases/<component>/<release_id>/manifest.yml      immutable
<prefix>/releases/<component>/<release_id>/condemned.json    gc's mark: deleted after a grace period
<prefix>/artifacts/sha256/<hex>                              an artifact, named by its content (shared)
<prefix>/artifacts/sha256/<hex>.condemned.json               gc's mark on an artifact nothing names
<prefix>/channels/<stage>/<role>/<component>/latest.json     the pointer (conditional writes)
<prefix>/channels/<stage>/<role>/<component>/history/<seq>.json
<prefix>/channels/<stage>/<role>/<component>/rollouts/<deploy_id>.json   a rollout's cursor
<prefix>/channels/<stage>/<role>/<component>/timestamp.json  CI's signed word that the pointer is current
<prefix>/status/<stage>/<role>/<owner>.json                  one report per instance
<prefix>/events/<event>/<stage>/<role>/<deploy_id>/<owner>.json   an instance's event (write-once)
<prefix>/targets/<stage>/<role>/<component>/<record id>.json  one publish across targets (first target's bucket)
<prefix>/trust/<version>.json                                 signed trust updates (immutable)
<prefix>/fleet/index.html                                     the fleet page (`deployer status --upload`)
```

`deployer iam-policy` scopes its statements with the same segments (`RELEASES`, `CHANNELS`,
`STATUS`, `EVENTS`, `TRUST`), so a policy can never drift from the keys the code writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployer.protocol.names import DEFAULT_PREFIX, NAME_PATTERN, Channel, Owner
from deployer.protocol.release import DEPLOY_ID_PATTERN, RELEASE_ID_PATTERN, SHA256_PATTERN

ARTIFACT_NAME = "artifact.tar.gz"
MANIFEST_NAME = "manifest.yml"
CONDEMNED_NAME = "condemned.json"
POINTER_NAME = "latest.json"
TIMESTAMP_NAME = "timestamp.json"
RELEASES = "releases"
ARTIFACTS = "artifacts"
#: The digest that names an artifact under artifacts/.
BLOB_DIGEST = "sha256"
CHANNELS = "channels"
HISTORY = "history"
ROLLOUTS = "rollouts"
STATUS = "status"
EVENTS = "events"
TRUST = "trust"
FLEET = "fleet"
TARGETS = "targets"
FLEET_PAGE_NAME = "index.html"
REPORT_SUFFIX = ".json"


@dataclass(frozen=True, order=True)
class ReportKey:
    """Who a status report is about, read from its S3 key (never from its body).

    The key's last part is the instance's owner (`Owner.userid`): `<role id>:<instance id>` on
    EC2, which IAM's `${aws:userid}` lets only that instance write; the instance id elsewhere.
    """

    stage: str
    role: str
    instance_id: str
    role_id: str = ""

    @property
    def owner(self) -> Owner:
        return Owner(self.instance_id, self.role_id)

    def __str__(self) -> str:
        return f"{self.stage}/{self.role}/{self.instance_id}"


@dataclass(frozen=True)
class Layout:
    """The S3 key layout under one prefix (docs/design.md, "The shape of the system")."""

    prefix: str = DEFAULT_PREFIX

    def key(self, *parts: str) -> str:
        """`<prefix>/<parts…>`; also what `iam-policy` turns into object ARNs."""
        base = self.prefix.strip("/")
        return "/".join([base, *parts] if base else parts)

    def release_dir(self, component: str, release_id: str) -> str:
        return self.key(RELEASES, component, release_id)

    def artifact_key(self, component: str, release_id: str, name: str = ARTIFACT_NAME) -> str:
        return f"{self.release_dir(component, release_id)}/{name}"

    def manifest_key(self, component: str, release_id: str) -> str:
        return f"{self.release_dir(component, release_id)}/{MANIFEST_NAME}"

    def condemned_key(self, component: str, release_id: str) -> str:
        """`deployer gc releases`' mark on a release nothing refers to (publisher/retention.py)."""
        return f"{self.release_dir(component, release_id)}/{CONDEMNED_NAME}"

    def blob_key(self, sha256: str) -> str:
        """Where an artifact lives: named by its own sha256, so identical bytes are stored once and
        a publish that finds the key needs no upload (the agent checks the bytes against the hash)."""
        return self.key(ARTIFACTS, BLOB_DIGEST, sha256)

    def blob_mark_key(self, sha256: str) -> str:
        return f"{self.blob_key(sha256)}.{CONDEMNED_NAME}"

    def blobs_prefix(self) -> str:
        return self.key(ARTIFACTS, BLOB_DIGEST) + "/"

    def blob_object(self, key: str) -> tuple[str, bool] | None:
        """Parse `<prefix>/artifacts/sha256/<hex>[.condemned.json]` into (hex, is the mark); None
        for anything else. Pure."""
        head = self.blobs_prefix()
        name = key[len(head) :] if key.startswith(head) else ""
        digest, _, mark = name.partition(".")
        if not SHA256_PATTERN.match(digest) or mark not in ("", CONDEMNED_NAME):
            return None
        return digest, bool(mark)

    def blob_named_by(self, bucket: str, src: str) -> str | None:
        """The sha256 of the content-addressed artifact a manifest's `src` names in `bucket`; None
        for anything else (a release's own copy, another bucket, a URL). Pure."""
        named, _, key = src.removeprefix("s3://").partition("/")
        parsed = self.blob_object(key) if src.startswith("s3://") and named == bucket else None
        return parsed[0] if parsed is not None and not parsed[1] else None

    def releases_prefix(self, component: str | None = None) -> str:
        return self.key(RELEASES, *([component] if component else [])) + "/"

    def release_object(self, key: str) -> tuple[str, str, str] | None:
        """Parse `<prefix>/releases/<component>/<release_id>/<name>` into its three parts; None for
        anything else. Pure: release gc acts only on keys the publisher could have written."""
        head = self.releases_prefix()
        parts = key[len(head) :].split("/") if key.startswith(head) else []
        if (
            len(parts) != 3
            or not NAME_PATTERN.match(parts[0])
            or not RELEASE_ID_PATTERN.match(parts[1])
            or not parts[2]
        ):
            return None
        return parts[0], parts[1], parts[2]

    def channels_prefix(self) -> str:
        return self.key(CHANNELS) + "/"

    def channel_of_pointer(self, key: str) -> Channel | None:
        """The channel whose pointer is at `key`; None for any other key. Pure."""
        head = self.channels_prefix()
        if not key.startswith(head) or not key.endswith(f"/{POINTER_NAME}"):
            return None
        try:
            return Channel.parse(key[len(head) : -len(POINTER_NAME) - 1])
        except ValueError:
            return None

    def channel_dir(self, channel: Channel) -> str:
        return self.key(CHANNELS, channel.stage, channel.role, channel.component)

    def pointer_key(self, channel: Channel) -> str:
        return f"{self.channel_dir(channel)}/{POINTER_NAME}"

    def history_key(self, channel: Channel, seq: int) -> str:
        # Zero-padded so a lexical listing is in seq order.
        return f"{self.history_prefix(channel)}{seq:010d}.json"

    def history_prefix(self, channel: Channel) -> str:
        return f"{self.channel_dir(channel)}/{HISTORY}/"

    def timestamp_key(self, channel: Channel) -> str:
        """The channel's signed timestamp (deployer.protocol.freshness), rewritten by CI."""
        return f"{self.channel_dir(channel)}/{TIMESTAMP_NAME}"

    def cursor_key(self, channel: Channel, deploy_id: str) -> str:
        """A staged rollout's cursor, written by CI only (conditionally)."""
        return f"{self.channel_dir(channel)}/{ROLLOUTS}/{deploy_id}.json"

    def targets_records_prefix(self, channel: Channel) -> str:
        """The records of publishes of `channel` across targets (deployer.protocol.targets)."""
        return self.key(TARGETS, channel.stage, channel.role, channel.component) + "/"

    def targets_record_key(self, channel: Channel, record_id: str) -> str:
        return f"{self.targets_records_prefix(channel)}{record_id}.json"

    def trust_key(self, version: int) -> str:
        """A signed trust update; zero-padded so a listing is in version order."""
        return self.key(TRUST, f"{version:010d}.json")

    def fleet_page_key(self) -> str:
        """The rendered fleet page: beside status/, never under it, so no reader takes it for a report."""
        return self.key(FLEET, FLEET_PAGE_NAME)

    def status_prefix(self, stage: str | None = None, role: str | None = None) -> str:
        """Every report, one stage's, or one stage/role's (a role without a stage is ignored)."""
        parts = [stage, role] if stage and role else [stage] if stage else []
        return self.key(STATUS, *parts) + "/"

    def status_key(self, who: ReportKey) -> str:
        return self.key(STATUS, who.stage, who.role, f"{who.owner.userid}{REPORT_SUFFIX}")

    def events_prefix(self) -> str:
        """Every instance event; what the bucket's EventBridge rule matches."""
        return self.key(EVENTS) + "/"

    def event_key(self, slug: str, who: ReportKey, deploy_id: str) -> str:
        """One instance's event of one kind for one deploy. The owner comes last, so IAM's
        `${aws:userid}` confines each instance to its own events, and one LIST of
        `…/<deploy_id>/` counts how many distinct instances reported it."""
        return self.key(EVENTS, slug, who.stage, who.role, deploy_id, f"{who.owner.userid}{REPORT_SUFFIX}")

    def event_prefix(self, slug: str, stage: str, role: str, deploy_id: str) -> str:
        """Every instance's event of one kind for one deploy: one LIST counts who told it."""
        return self.key(EVENTS, slug, stage, role, deploy_id) + "/"

    def event_object(self, key: str) -> tuple[str, ReportKey, str] | None:
        """Parse an event key into (event slug, who, deploy id); None for anything else. Pure."""
        head = self.events_prefix()
        if not key.startswith(head) or not key.endswith(REPORT_SUFFIX):
            return None
        parts = key[len(head) : -len(REPORT_SUFFIX)].split("/")
        if len(parts) != 5:
            return None
        slug, stage, role, deploy_id, name = parts
        owner = Owner.parse(name)
        if owner is None or not (NAME_PATTERN.match(stage) and NAME_PATTERN.match(role)):
            return None
        if not NAME_PATTERN.match(slug) or not DEPLOY_ID_PATTERN.match(deploy_id):
            return None
        return slug, ReportKey(stage, role, owner.instance_id, owner.role_id), deploy_id

    def report_key(self, key: str) -> ReportKey | None:
        """Parse `<prefix>/status/<stage>/<role>/<owner>.json`; None for anything else. Pure.

        Readers take an instance's identity from here, so a report body cannot claim to be
        someone else, and a key that is not a well-formed report key is never acted on.
        """
        head = self.status_prefix()
        if not key.startswith(head) or not key.endswith(REPORT_SUFFIX):
            return None
        parts = key[len(head) : -len(REPORT_SUFFIX)].split("/")
        if len(parts) != 3:
            return None
        stage, role, name = parts
        owner = Owner.parse(name)
        if owner is None or not (NAME_PATTERN.match(stage) and NAME_PATTERN.match(role)):
            return None
        return ReportKey(stage, role, owner.instance_id, owner.role_id)
