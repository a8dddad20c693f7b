"""Signed deploys against the emulator with real agent subprocesses: an instance applies only what
the trusted keys signed, and every forged, tampered or replayed document changes nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from deployer.protocol.deploy import Deploy
from deployer.protocol.envelope import DEPLOY_PAYLOAD_TYPE, TRUST_PAYLOAD_TYPE, Envelope, parse_envelope
from deployer.protocol.freshness import Freshness, Timestamp
from deployer.protocol.names import Channel
from deployer.protocol.trust import DEPLOY_ROLE, TRUST_ROLE, UNVERIFIED, Role, Trust
from publisher.freshness import vouch
from publisher.publish import Publisher
from publisher.signing import FileSigner, keygen, public_key, sign
from tests.awsproxy import aws_proxy
from tests.support import (
    REGION,
    AgentProcess,
    Fleet,
    artifact,
    artifact_key_of,
    cli,
    publish_args,
    publish_on,
    wait_until,
)

API = Channel("prod", "web", "api")


def make_key(tmp_path: Path, name: str) -> FileSigner:
    path = tmp_path / f"{name}.pem"
    keygen(path)
    return FileSigner(path)


def trust_of(*signers: FileSigner, version: int = 1, floors: dict[Channel, int] | None = None) -> Trust:
    keys = {public_key(s).keyid: public_key(s) for s in signers}
    role = Role(frozenset(keys), 1)
    return Trust(version, keys, {DEPLOY_ROLE: role, TRUST_ROLE: role}, floors or {})


def write_trust(path: Path, trust: Trust) -> Path:
    path.write_text(trust.to_json())
    return path


def signed_publisher(fleet: Fleet, *signers: FileSigner) -> Publisher:
    return Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout, signers=signers)


def envelope_at(fleet: Fleet, key: str) -> Envelope:
    body = fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=key)["Body"].read()
    return parse_envelope(body)


def send(fleet: Fleet, agent: AgentProcess, body: str) -> None:
    fleet.clients.sqs.send_message(QueueUrl=agent.queue_url(), MessageBody=body)


def applied_state(agent: AgentProcess) -> tuple[str, str]:
    current = agent.root / "opt" / "api" / "current"
    return str(current.resolve()), (agent.home / "state" / "state.json").read_text()


@pytest.fixture
def release_key(tmp_path: Path) -> FileSigner:
    return make_key(tmp_path, "release")


def test_a_signed_deploy_is_verified_and_applied_where_signatures_are_required(
    fleet: Fleet, tmp_path: Path, release_key: FileSigner, start_agent: Callable[..., AgentProcess]
) -> None:
    trust = write_trust(tmp_path / "trust.json", trust_of(release_key))
    agent = start_agent(trust_file=str(trust), require_signatures=True)
    deploy = publish_on(signed_publisher(fleet, release_key), API, artifact(tmp_path, "v1", "v1"), "rel-1")
    wait_until(lambda: agent.on_seq(deploy.seq), "the signed deploy to be applied")
    assert agent.served() == "v1"
    pointer = envelope_at(fleet, fleet.layout.pointer_key(API))
    assert pointer.payload_type == DEPLOY_PAYLOAD_TYPE
    assert [s.keyid for s in pointer.signatures] == [release_key.keyid]
    signed = json.loads(pointer.payload)
    assert signed["artifact_sha256"] == deploy.artifact_sha256
    assert signed["artifact_size"] == (tmp_path / "v1.tar.zst").stat().st_size
    shown = cli("trust", "show", "--config", str(agent.config_path))
    assert "trust version 1" in shown.stdout, shown.stdout
    assert "signatures required" in shown.stdout
    assert release_key.keyid in shown.stdout


def last_rejection(agent: AgentProcess) -> str:
    report = agent.status()
    return report.last_rejection.reason if report and report.last_rejection else ""


def tampered(envelope: Envelope, **changes: Any) -> Envelope:
    """The envelope with its payload edited, its signatures kept (what an attacker without the key can do)."""
    doc = json.loads(envelope.payload)
    doc.update(changes)
    return Envelope(json.dumps(doc).encode(), envelope.payload_type, envelope.signatures)


def test_every_forged_tampered_or_replayed_document_changes_nothing_but_last_rejection(
    fleet: Fleet, tmp_path: Path, release_key: FileSigner, start_agent: Callable[..., AgentProcess]
) -> None:
    intruder = make_key(tmp_path, "intruder")
    trust = write_trust(tmp_path / "trust.json", trust_of(release_key, floors={API: 2}))
    agent = start_agent(trust_file=str(trust), require_signatures=True)
    publisher = signed_publisher(fleet, release_key)
    below_floor = publish_on(publisher, API, artifact(tmp_path, "v1", "v1"), "rel-1")
    wait_until(lambda: bool(agent.events("message_rejected")), "seq 1 (below the floor) to be rejected")
    assert "below the floor 2" in agent.events("message_rejected")[0]["reason"]
    good = publish_on(publisher, API, artifact(tmp_path, "v2", "v2"), "rel-2")
    wait_until(lambda: agent.on_seq(good.seq), "seq 2 to be applied")
    assert below_floor.seq == 1
    before = applied_state(agent)
    signed = envelope_at(fleet, fleet.layout.history_key(API, good.seq))
    other = replace(good, component="worker", seq=9, deploy_id="other-channel")
    payload = good.to_json().encode()
    rejected = {
        "tampered payload": (tampered(signed, release_id="evil"), "0 valid signature(s)"),
        "tampered signature": (
            Envelope(
                signed.payload, signed.payload_type, tuple(replace(s, sig=s.sig[::-1]) for s in signed.signatures)
            ),
            "0 valid signature(s)",
        ),
        "wrong payload type": (
            sign(payload, TRUST_PAYLOAD_TYPE, [release_key]),
            "is not 'application/vnd.deployer.deploy+json'",
        ),
        "unknown key": (
            sign(payload, DEPLOY_PAYLOAD_TYPE, [intruder]),
            f"not trusted to sign this: {intruder.keyid[:12]}",
        ),
        "unsigned": (None, "unsigned deploy document"),
        "new seq not in history": (
            sign(replace(good, seq=3, deploy_id="made-up").to_json().encode(), DEPLOY_PAYLOAD_TYPE, [release_key]),
            "no deploy was published as seq 3",
        ),
    }
    for case, (envelope, reason) in rejected.items():
        send(fleet, agent, envelope.to_json() if envelope else good.to_json())
        wait_until(lambda why=reason: why in last_rejection(agent), case)  # type: ignore[misc]
        assert applied_state(agent) == before, case
        assert agent.component().seq == good.seq
    # Not rejections: a valid document for another channel is not this instance's; a replay is old news.
    for body, event in (
        (sign(other.to_json().encode(), DEPLOY_PAYLOAD_TYPE, [release_key]).to_json(), "message_not_mine"),
        (signed.to_json(), "message_duplicate"),
    ):
        count = len(agent.events(event))
        send(fleet, agent, body)
        wait_until(lambda e=event, c=count: len(agent.events(e)) > c, event)  # type: ignore[misc]
        assert applied_state(agent) == before
    assert agent.alive()


def test_a_manifest_or_artifact_swapped_under_a_valid_signature_is_rejected(
    fleet: Fleet, tmp_path: Path, release_key: FileSigner, start_agent: Callable[..., AgentProcess]
) -> None:
    trust = write_trust(tmp_path / "trust.json", trust_of(release_key))
    agent = start_agent(trust_file=str(trust), require_signatures=True)
    publisher = signed_publisher(fleet, release_key)
    first = publish_on(publisher, API, artifact(tmp_path, "v1", "v1"), "rel-1")
    wait_until(lambda: agent.on_seq(first.seq), "the first release")
    agent.stop()
    s3 = fleet.clients.s3
    manifest = publish_on(publisher, API, artifact(tmp_path, "v2", "v2"), "rel-2")
    # Someone who can write releases/ but does not hold the key swaps what the deploy points at.
    s3.put_object(Bucket=fleet.bucket, Key=manifest.manifest_key, Body=b"dest: /opt/api/current\n")
    agent.start()
    wait_until(lambda: agent.component().state.value == "rejected", "the swapped manifest to be rejected")
    assert "manifest sha256" in (agent.component().error or "")
    assert agent.served() == "v1"
    agent.stop()  # the swap must land before the agent sees the deploy
    swapped = publish_on(publisher, API, artifact(tmp_path, "v3", "v3"), "rel-3")
    artifact_key = artifact_key_of(fleet, swapped)
    s3.put_object(Bucket=fleet.bucket, Key=artifact_key, Body=(tmp_path / "v1.tar.zst").read_bytes())
    agent.start()
    wait_until(
        lambda: agent.component().seq == swapped.seq and agent.component().state.value == "rejected",
        "the swapped artifact",
    )
    assert "mismatch" in (agent.component().error or "")  # its size or its sha256, whichever the swap broke
    assert agent.served() == "v1"


def test_a_kms_signed_deploy_is_verified_offline_by_an_agent_that_never_calls_kms(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    kms = boto3.client("kms", region_name=REGION, endpoint_url=fleet.endpoint_url)
    key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    made = cli("trust", "new", "--deploy-key", f"kms:{key}")
    assert made.returncode == 0, made.stderr
    trust = tmp_path / "trust.json"
    trust.write_text(made.stdout)
    with aws_proxy(fleet.endpoint_url) as proxy:
        agent = start_agent(trust_file=str(trust), require_signatures=True, endpoint_url=proxy.url)
        published = cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--sign-key", f"kms:{key}"))
        assert published.returncode == 0, published.stderr
        wait_until(lambda: agent.on_seq(1), "the KMS-signed deploy to be applied")
        assert proxy.count("kms") == 0
    pointer = envelope_at(fleet, fleet.layout.pointer_key(API))
    assert [s.keyid for s in pointer.signatures] == [json.loads(made.stdout)["roles"]["deploy"]["keyids"][0]]


def test_trust_rotates_only_through_versions_the_held_trust_keys_signed(
    fleet: Fleet, tmp_path: Path, release_key: FileSigner, start_agent: Callable[..., AgentProcess]
) -> None:
    new_key = make_key(tmp_path, "new")
    baked = write_trust(tmp_path / "trust-v1.json", trust_of(release_key))
    agent = start_agent(trust_file=str(baked), require_signatures=True, reconcile_interval_seconds=1)
    v2 = write_trust(tmp_path / "trust-v2.json", trust_of(new_key, version=2))

    def sign_update(key: Path) -> None:
        stored = cli(
            "trust", "sign-update", "--bucket", fleet.bucket, "--trust-doc", str(v2), "--sign-key", f"file:{key}"
        )
        assert stored.returncode == 0, stored.stderr

    sign_update(tmp_path / "new.pem")  # signed only by the key it introduces: refused
    wait_until(lambda: bool(agent.events("trust_update_refused")), "the self-signed update to be refused")
    assert "not trusted to sign this" in agent.events("trust_update_refused")[0]["error"]
    early = publish_on(signed_publisher(fleet, new_key), API, artifact(tmp_path, "v1", "v1"), "rel-1")
    wait_until(lambda: "0 valid signature(s)" in last_rejection(agent), "the new key's deploy to be refused")
    sign_update(tmp_path / "release.pem")  # the held trust key co-signs: taken at the next reconcile
    wait_until(lambda: bool(agent.events("trust_updated")), "trust version 2 to be taken")
    later = publish_on(signed_publisher(fleet, new_key), API, artifact(tmp_path, "v2", "v2"), "rel-2")
    wait_until(lambda: agent.on_seq(later.seq), "the new key's deploy to be applied")
    shown = cli("trust", "show", "--config", str(agent.config_path), "--json")
    assert json.loads(shown.stdout)["version"] == 2
    refusals = len(agent.events("message_rejected"))
    publish_on(signed_publisher(fleet, release_key), API, artifact(tmp_path, "v3", "v3"), "rel-3")
    wait_until(lambda: len(agent.events("message_rejected")) > refusals, "the retired key's deploy to be refused")
    assert "deploy key(s) of trust version 2" in agent.events("message_rejected")[-1]["reason"]
    assert agent.served() == "v2"
    assert early.seq == 1


def test_deployer_apply_with_a_trust_applies_only_a_signed_document_like_an_agent(
    fleet: Fleet, tmp_path: Path, release_key: FileSigner
) -> None:
    trust = write_trust(tmp_path / "trust.json", trust_of(release_key))
    intruder = make_key(tmp_path, "intruder")
    deploy = publish_on(signed_publisher(fleet, release_key), API, artifact(tmp_path, "v1", "v1"), "rel-1")
    pointer = f"s3://{fleet.bucket}/{fleet.layout.pointer_key(API)}"
    root = tmp_path / "root"
    paths = ("--root-dir", str(root), "--state-dir", str(tmp_path / "state"))
    applied = cli("apply", "--trust", str(trust), "--document", pointer, *paths)
    assert applied.returncode == 0, applied.stderr
    assert (root / "opt/api/current/index.html").read_text() == "v1"
    forged = sign(replace(deploy, release_id="rel-1").to_json().encode(), DEPLOY_PAYLOAD_TYPE, [intruder])
    fleet.clients.s3.put_object(Bucket=fleet.bucket, Key=fleet.layout.pointer_key(API), Body=forged.to_json().encode())
    refused = cli("apply", "--trust", str(trust), "--document", pointer, *paths)
    assert refused.returncode == 1
    assert "not trusted to sign this" in refused.stderr
    bare = cli("apply", "--trust", str(trust), "--manifest", f"s3://{fleet.bucket}/{deploy.manifest_key}", *paths)
    assert "apply a signed --document instead" in bare.stderr


def test_a_forged_rollout_cursor_admits_nobody_and_only_a_signed_one_moves_the_fleet(
    fleet: Fleet, tmp_path: Path, release_key: FileSigner, start_agent: Callable[..., AgentProcess]
) -> None:
    trust = write_trust(tmp_path / "trust.json", trust_of(release_key))
    agents = [
        start_agent(trust_file=str(trust), require_signatures=True, heartbeat_interval_seconds=1) for _ in range(3)
    ]
    key = ("--sign-key", f"file:{tmp_path / 'release.pem'}")
    fast = ("--heartbeat-ttl", "8", "--poll-interval", "0.3")
    assert cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), *key, "--wait", *fast)).returncode == 0
    staged = cli(*publish_args(fleet, artifact(tmp_path, "v2", "v2"), *key, "--waves", "1,100%"))
    assert staged.returncode == 0, staged.stderr
    deploy = UNVERIFIED.open(
        fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=fleet.layout.pointer_key(API))["Body"].read()
    )
    assert deploy.rollout is not None
    waiting = [a for a in agents if a.instance_id not in deploy.rollout.first]
    wait_until(lambda: all(a.component().state.value == "waiting" for a in waiting), "the unadmitted to wait")
    # Someone who can write the bucket, without the key, moves the cursor to the last wave and announces it.
    cursor_key = fleet.layout.cursor_key(API, deploy.deploy_id)
    signed_cursor = parse_envelope(fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=cursor_key)["Body"].read())
    forged = json.loads(signed_cursor.payload) | {"wave": 1}
    fleet.clients.s3.put_object(Bucket=fleet.bucket, Key=cursor_key, Body=json.dumps(forged).encode())
    signed_publisher(fleet, release_key).announce(API)
    wait_until(lambda: all(a.events("rollout_cursor_rejected") for a in agents), "the forged cursor to be refused")
    assert all(a.served() == "v1" for a in waiting)  # not advanced by it
    assert all(a.served() == "v2" for a in agents if a not in waiting)  # nor reverted
    fleet.clients.s3.put_object(Bucket=fleet.bucket, Key=cursor_key, Body=signed_cursor.to_json().encode())
    resumed = cli("rollout", "resume", "--bucket", fleet.bucket, "--topic-arn", fleet.topic_arn, "--stage", "prod",
                  "--role", "web", "--component", "api", "--force", *key, *fast)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert all(a.served() == "v2" for a in agents)


class PastPublisher(Publisher):
    """Publishes like any, but vouches for its pointers `age_s` ago: a timestamp about to expire."""

    age_s = 55.0

    def vouch(self, deploy: Deploy) -> Timestamp | None:
        then = datetime.now(UTC) - timedelta(seconds=self.age_s)
        return vouch(self.clients.s3, self.bucket, self.layout, self.signers, deploy, self.policy, now=then)


def test_an_expired_timestamp_makes_every_agent_report_stale_and_a_replayed_older_pointer_is_refused(
    fleet: Fleet, tmp_path: Path, release_key: FileSigner, start_agent: Callable[..., AgentProcess]
) -> None:
    fresh = replace(trust_of(release_key), freshness=Freshness(expires_s=60, refresh_s=30))
    trust = write_trust(tmp_path / "trust.json", fresh)
    agents = [
        start_agent(trust_file=str(trust), require_signatures=True, reconcile_interval_seconds=1) for _ in range(2)
    ]

    def stale(agent: AgentProcess) -> str | None:
        return agent.component().stale_since

    first = publish_on(signed_publisher(fleet, release_key), API, artifact(tmp_path, "v1", "v1"), "rel-1")
    wait_until(lambda: all(a.on_seq(first.seq) and stale(a) is None for a in agents), "v1, vouched for")
    # CI vouches for seq 2 one last time, 55 s before the 60 s expiry, and then stops.
    second = publish_on(
        PastPublisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout, signers=[release_key]),
        API,
        artifact(tmp_path, "v2", "v2"),
        "rel-2",
    )
    wait_until(lambda: all(a.on_seq(second.seq) for a in agents), "v2 applied")
    wait_until(lambda: all(stale(a) is not None for a in agents), "every agent to report its pointer stale", 20)
    status = cli("status", "--bucket", fleet.bucket)
    assert "2 with a stale pointer (timestamp expired)" in status.stdout, status.stdout
    assert "ok (stale pointer)" in status.stdout
    told = fleet.clients.s3.list_objects_v2(
        Bucket=fleet.bucket, Prefix=fleet.layout.key("events", "instance-pointer-stale")
    )
    assert len(told.get("Contents", [])) == 2  # each told once

    # Someone with write access to the bucket puts the validly signed seq-1 pointer back.
    old = fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=fleet.layout.history_key(API, first.seq))["Body"].read()
    current = fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=fleet.layout.pointer_key(API))["Body"].read()
    fleet.clients.s3.put_object(Bucket=fleet.bucket, Key=fleet.layout.pointer_key(API), Body=old)
    wait_until(
        lambda: all(
            any("older than seq 2" in e.get("error", "") for e in a.events("pointer_rejected")) for a in agents
        ),
        "the replayed pointer to be refused",
    )
    assert all(a.served() == "v2" and a.on_seq(second.seq) for a in agents)
    # A refresh vouches for what the pointer says: seq 1 now, which cannot lower what agents hold.
    assert (
        cli("trust", "refresh", "--bucket", fleet.bucket, "--sign-key", f"file:{tmp_path / 'release.pem'}").returncode
        == 0
    )
    time.sleep(2.5)
    assert all(a.served() == "v2" and stale(a) is not None for a in agents)
    # The real pointer restored and vouched for again: fresh everywhere.
    fleet.clients.s3.put_object(Bucket=fleet.bucket, Key=fleet.layout.pointer_key(API), Body=current)
    refreshed = cli("trust", "refresh", "--bucket", fleet.bucket, "--sign-key", f"file:{tmp_path / 'release.pem'}")
    assert refreshed.returncode == 0, refreshed.stderr
    assert "prod/web/api: seq 2 vouched for at" in refreshed.stdout
    wait_until(lambda: all(stale(a) is None for a in agents), "every agent fresh again")
