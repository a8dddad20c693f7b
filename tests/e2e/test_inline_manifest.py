"""A small manifest travels inside the deploy document: a real agent skips the manifest GET, holds
the inline text to `manifest_sha256` like the S3 object, and falls back to S3 for a big one.

Every request the agent makes goes through a counting proxy in front of the emulator."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deployer.protocol.limits import MAX_INLINE_MANIFEST_BYTES
from deployer.protocol.manifest import Manifest
from deployer.protocol.names import Channel
from publisher.publish import Publisher
from tests.awsproxy import AwsProxy, Call, aws_proxy
from tests.e2e.test_signing import make_key, trust_of, write_trust
from tests.support import AgentProcess, Fleet, artifact, publish_on, release_template, wait_until

API = Channel("prod", "web", "api")


class S3Reads:
    """A proxy rule that answers nothing and remembers every S3 GET path."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def before(self, call: Call) -> None:
        if call.service == "s3" and call.action == "GET":
            self.paths.append(call.path.split("?", 1)[0])

    def manifests(self) -> int:
        return sum(path.endswith("/manifest.yml") for path in self.paths)


@pytest.fixture
def reads() -> S3Reads:
    return S3Reads()


@pytest.fixture
def counted(fleet: Fleet, reads: S3Reads) -> Iterator[AwsProxy]:
    with aws_proxy(fleet.endpoint_url, reads) as proxy:
        yield proxy


def inline_publisher(fleet: Fleet, **kwargs: object) -> Publisher:
    return Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout, inline_manifests=True, **kwargs)  # type: ignore[arg-type]


def deploy_requests(proxy: AwsProxy) -> dict[str, int]:
    """What the agent asked for, long polls left out."""
    return {f"{s}:{a}": n for (s, a), n in sorted(proxy.calls.items()) if a != "ReceiveMessage"}


def converge(agent: AgentProcess, proxy: AwsProxy, publish: Callable[[], int]) -> dict[str, int]:
    """Publish, wait until the agent is on the seq and its report says so, and return its requests."""
    proxy.reset_counts()
    seq = publish()
    wait_until(lambda: agent.on_seq(seq), f"seq {seq}")
    wait_until(lambda: proxy.count("sqs", "DeleteMessage") >= 1, "the message to be acknowledged")
    return deploy_requests(proxy)


def test_an_inline_manifest_saves_the_manifest_get_so_a_deploy_costs_four_requests_not_five(
    fleet: Fleet, tmp_path: Path, counted: AwsProxy, reads: S3Reads, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(endpoint_url=counted.url)
    plain = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)
    before = converge(agent, counted, lambda: publish_on(plain, API, artifact(tmp_path, "v1", "v1"), "rel-1").seq)
    assert reads.manifests() == 1
    reads.paths.clear()
    inline = inline_publisher(fleet)
    after = converge(agent, counted, lambda: publish_on(inline, API, artifact(tmp_path, "v2", "v2"), "rel-2").seq)
    assert agent.served() == "v2"
    assert reads.manifests() == 0
    # history (authentication) ‖ artifact, then the acknowledgement, then the status report.
    assert before == {"s3:GET": 3, "s3:PUT": 1, "sqs:DeleteMessage": 1}
    assert after == {"s3:GET": 2, "s3:PUT": 1, "sqs:DeleteMessage": 1}
    s3 = fleet.clients.s3
    pointer = json.loads(s3.get_object(Bucket=fleet.bucket, Key=fleet.layout.pointer_key(API))["Body"].read())
    stored = s3.get_object(Bucket=fleet.bucket, Key=pointer["manifest_key"])["Body"].read()
    assert pointer["manifest"].encode() == stored  # the S3 object, byte for byte


def test_a_manifest_over_the_inline_limit_stays_in_s3_and_is_fetched_as_before(
    fleet: Fleet, tmp_path: Path, counted: AwsProxy, reads: S3Reads, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(endpoint_url=counted.url)
    big = Manifest(**{**release_template().__dict__, "env": {"PADDING": "x" * MAX_INLINE_MANIFEST_BYTES}})
    release = artifact(tmp_path, "big", "big")
    deploy = inline_publisher(fleet).publish(API, release, template=big, release_id="rel-big").deploy
    assert deploy.manifest is None
    wait_until(lambda: agent.on_seq(deploy.seq), "the big-manifest deploy")
    assert reads.manifests() == 1
    assert agent.served() == "big"


def test_a_tampered_inline_manifest_is_rejected_like_a_tampered_s3_manifest_and_changes_nothing(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent()
    first = publish_on(inline_publisher(fleet), API, artifact(tmp_path, "v1", "v1"), "rel-1")
    wait_until(lambda: agent.on_seq(first.seq), "v1")
    assert first.manifest is not None
    doc = json.loads(first.to_json())
    doc["seq"] = first.seq + 1
    doc["manifest"] = doc["manifest"] + "commands:\n  pre:\n  - touch /tmp/owned\n"
    fleet.clients.sqs.send_message(QueueUrl=agent.queue_url(), MessageBody=json.dumps(doc))

    def rejected() -> bool:
        report = agent.status()
        return report is not None and report.last_rejection is not None

    wait_until(rejected, "the rejection")
    report = agent.status()
    assert report is not None
    assert report.last_rejection is not None
    assert "inline manifest sha256" in report.last_rejection.reason
    assert agent.served() == "v1"
    assert agent.on_seq(first.seq)


def test_a_signed_deploy_with_its_manifest_inline_is_verified_and_applied_without_the_manifest_get(
    fleet: Fleet, tmp_path: Path, counted: AwsProxy, reads: S3Reads, start_agent: Callable[..., AgentProcess]
) -> None:
    key = make_key(tmp_path, "release")
    trust = write_trust(tmp_path / "trust.json", trust_of(key))
    agent = start_agent(endpoint_url=counted.url, trust_file=str(trust), require_signatures=True)
    deploy = publish_on(inline_publisher(fleet, signers=[key]), API, artifact(tmp_path, "v1", "v1"), "rel-1")
    assert deploy.manifest is not None
    assert deploy.artifact_sha256 is not None
    wait_until(lambda: agent.on_seq(deploy.seq), "the signed inline deploy")
    assert agent.served() == "v1"
    assert reads.manifests() == 0
