from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer.protocol.deploy import deploy_from_dict, parse_deploy
from deployer.protocol.errors import InvalidMessage
from deployer.protocol.layout import Layout
from deployer.protocol.limits import MAX_DEPLOY_MESSAGE_BYTES
from deployer.protocol.names import Channel
from tests.support import make_deploy


def test_a_deploy_survives_a_json_round_trip_unchanged() -> None:
    deploy = make_deploy(origin={"github_run_id": "42"})
    assert parse_deploy(deploy.to_json()) == deploy


def test_canonical_json_is_sorted_and_compact_so_equal_deploys_hash_equal() -> None:
    text = make_deploy().to_json()
    assert " " not in text
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert make_deploy().payload_hash() == make_deploy().payload_hash()
    assert make_deploy(seq=8).payload_hash() != make_deploy().payload_hash()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(v=2), "unsupported protocol version v=2"),
        (lambda d: d.update(v=True), "unsupported protocol version"),
        (lambda d: d.pop("v"), "unsupported protocol version v=None"),
        (lambda d: d.pop("seq"), "missing key(s): seq"),
        (lambda d: d.update(extra=1), "unknown key(s): extra"),
        (lambda d: d.update(seq=0), "seq must be a positive integer"),
        (lambda d: d.update(seq=-3), "seq must be a positive integer"),
        (lambda d: d.update(seq="5"), "seq must be a positive integer"),
        (lambda d: d.update(seq=True), "seq must be a positive integer"),
        (lambda d: d.update(stage="Prod"), "stage 'Prod' does not match"),
        (lambda d: d.update(component="../etc"), "component '../etc' does not match"),
        (lambda d: d.update(release_id="../../x"), "release_id '../../x' does not match"),
        (lambda d: d.update(release_id=".hidden"), "release_id '.hidden' does not match"),
        (lambda d: d.update(manifest_sha256="xyz"), "manifest_sha256 'xyz' does not match"),
        (lambda d: d.update(manifest_key=""), "manifest_key must be a non-empty S3 key"),
        (lambda d: d.update(published_at="2026-11-26T01:50:00"), "published_at must be an ISO 8601 UTC timestamp"),
        (lambda d: d.update(published_at="yesterday"), "published_at must be an ISO 8601 UTC timestamp"),
        (lambda d: d.update(origin={"k": 1}), "origin entry 'k' must be a string"),
        (lambda d: d.update(origin=[]), "origin must be an object"),
    ],
)
def test_an_invalid_document_is_rejected_with_an_error_naming_the_problem(
    mutate: Callable[[dict[str, Any]], object], expected: str
) -> None:
    doc = make_deploy().to_dict()
    mutate(doc)
    with pytest.raises(InvalidMessage) as info:
        parse_deploy(json.dumps(doc))
    assert expected in str(info.value)


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"a string"', "", "{"])
def test_a_body_that_is_not_a_json_object_is_rejected(raw: str) -> None:
    with pytest.raises(InvalidMessage):
        parse_deploy(raw)


def test_an_oversized_document_is_rejected_before_parsing() -> None:
    with pytest.raises(InvalidMessage, match="over the"):
        parse_deploy(" " * (MAX_DEPLOY_MESSAGE_BYTES + 1))


def test_the_channel_of_a_deploy_is_its_stage_role_and_component() -> None:
    assert make_deploy().channel == Channel("prod", "web", "api")
    assert str(make_deploy().channel) == "prod/web/api"


def test_layout_keys_follow_the_documented_s3_layout() -> None:
    layout = Layout("deployer")
    channel = Channel("prod", "web", "api")
    assert layout.artifact_key("api", "r1") == "deployer/releases/api/r1/artifact.tar.gz"
    assert layout.manifest_key("api", "r1") == "deployer/releases/api/r1/manifest.yml"
    assert layout.pointer_key(channel) == "deployer/channels/prod/web/api/latest.json"
    assert layout.history_key(channel, 12) == "deployer/channels/prod/web/api/history/0000000012.json"
    assert layout.status_key("prod", "web", "i-1") == "deployer/status/prod/web/i-1.json"
    assert Layout("").pointer_key(channel) == "channels/prod/web/api/latest.json"


names = st.from_regex(r"^[a-z0-9][a-z0-9_-]{0,31}$", fullmatch=True)


@given(stage=names, role=names, component=names, seq=st.integers(min_value=1, max_value=2**53))
def test_any_valid_deploy_round_trips(stage: str, role: str, component: str, seq: int) -> None:
    deploy = make_deploy(stage=stage, role=role, component=component, seq=seq)
    assert deploy_from_dict(json.loads(deploy.to_json())) == deploy
