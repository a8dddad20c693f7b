from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from deployer.protocol.deploy import deploy_from_dict, inlinable, parse_deploy
from deployer.protocol.errors import InvalidMessage
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.limits import MAX_DEPLOY_MESSAGE_BYTES, MAX_INLINE_MANIFEST_BYTES
from deployer.protocol.names import (
    INSTANCE_ID_PATTERN,
    NAME_PATTERN,
    Channel,
    Owner,
    queue_name,
    queue_name_pattern,
)
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


MANIFEST_TEXT = (
    "src: s3://b/deployer/releases/api/r1/artifact.tar.gz\nchecksum: " + "a" * 64 + "\ndest: /opt/api/current\n"
)


def with_inline(text: str = MANIFEST_TEXT) -> dict[str, Any]:
    """A deploy document carrying `text` inline, pinned by its sha256 as a publisher writes it."""
    return make_deploy(manifest_sha256=hashlib.sha256(text.encode()).hexdigest(), manifest=text).to_dict()


def test_a_deploy_carrying_its_manifest_inline_survives_a_json_round_trip_byte_for_byte() -> None:
    text = MANIFEST_TEXT + 'env: {GREETING: "héllo"}\n'  # non-ASCII: escaped in JSON, the same bytes after
    deploy = deploy_from_dict(with_inline(text))
    parsed = parse_deploy(deploy.to_json())
    assert parsed == deploy
    assert parsed.manifest is not None
    assert hashlib.sha256(parsed.manifest.encode()).hexdigest() == deploy.manifest_sha256


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(manifest=d["manifest"] + "# tampered\n"), "inline manifest sha256"),
        (lambda d: d.update(manifest_sha256="0" * 64), "inline manifest sha256"),
        (lambda d: d.update(manifest=7), "manifest must be the manifest's text"),
        (lambda d: d.update(manifest="\ud800"), "not valid Unicode"),
        (lambda d: d.update(manifest="#" * (MAX_INLINE_MANIFEST_BYTES + 1)), "over the 4096-byte limit"),
    ],
    ids=["text tampered", "digest tampered", "not text", "lone surrogate", "too big"],
)
def test_an_inline_manifest_that_is_not_the_pinned_one_rejects_the_whole_document(
    mutate: Callable[[dict[str, Any]], object], expected: str
) -> None:
    doc = with_inline()
    mutate(doc)
    with pytest.raises(InvalidMessage, match=expected):
        parse_deploy(json.dumps(doc))


def test_only_a_small_utf8_manifest_is_inlinable() -> None:
    assert inlinable(MANIFEST_TEXT.encode()) == MANIFEST_TEXT
    assert inlinable(b"#" * MAX_INLINE_MANIFEST_BYTES) is not None
    assert inlinable(b"#" * (MAX_INLINE_MANIFEST_BYTES + 1)) is None
    assert inlinable(b"dest: \xff\n") is None  # not UTF-8: a JSON string could not give these bytes back


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
    assert layout.status_key(ReportKey("prod", "web", "i-1")) == "deployer/status/prod/web/i-1.json"
    confined = ReportKey("prod", "web", "i-1", "AROAEXAMPLEROLEID01")
    assert layout.status_key(confined) == "deployer/status/prod/web/AROAEXAMPLEROLEID01:i-1.json"
    assert layout.report_key(layout.status_key(confined)) == confined
    assert Layout("").pointer_key(channel) == "channels/prod/web/api/latest.json"


def test_only_a_content_addressed_key_in_the_fleets_bucket_names_a_shared_artifact() -> None:
    layout, digest = Layout("deployer"), "ab" * 32
    assert layout.blob_named_by("b", f"s3://b/{layout.blob_key(digest)}") == digest
    assert layout.blob_named_by("b", f"s3://other/{layout.blob_key(digest)}") is None
    assert layout.blob_named_by("b", f"s3://b/{layout.blob_mark_key(digest)}") is None
    assert layout.blob_named_by("b", f"s3://b/{layout.artifact_key('api', 'r1')}") is None
    assert layout.blob_named_by("b", f"https://b/{layout.blob_key(digest)}") is None


#: Valid names, generated as words joined by single separators (the lookahead in NAME_PATTERN that
#: caps the length makes hypothesis's regex generation slow); every draw is checked against it.
names = st.from_regex(r"[a-z0-9]{1,8}(?:[-_][a-z0-9]{1,7}){0,2}", fullmatch=True).filter(
    lambda name: NAME_PATTERN.match(name) is not None
)


@given(stage=names, role=names, component=names, seq=st.integers(min_value=1, max_value=2**53))
def test_any_valid_deploy_round_trips(stage: str, role: str, component: str, seq: int) -> None:
    deploy = make_deploy(stage=stage, role=role, component=component, seq=seq)
    assert deploy_from_dict(json.loads(deploy.to_json())) == deploy


@pytest.mark.parametrize(
    ("pattern_of", "name", "ok"),
    [
        ("role", "web", True),
        ("role", "web-admin", True),
        ("role", "web_admin", True),
        ("role", "web--admin", False),  # `--` separates queue name parts
        ("role", "web-", False),
        ("role", "-web", False),
        ("role", "Web", False),
        ("instance", "i-0123456789abcdef0", True),
        ("instance", "i--0123", False),
        ("instance", "i-0123-", False),
    ],
)
def test_names_are_words_joined_by_single_separators(pattern_of: str, name: str, ok: bool) -> None:
    pattern = NAME_PATTERN if pattern_of == "role" else INSTANCE_ID_PATTERN
    assert bool(pattern.match(name)) is ok


@given(a=names, b=names)
def test_a_roles_queue_pattern_never_matches_another_roles_queue(a: str, b: str) -> None:
    assume(a != b)
    assert NAME_PATTERN.match(a)
    assert NAME_PATTERN.match(b)
    pattern = queue_name_pattern("deployer", "prod", a)
    assert fnmatch.fnmatchcase(queue_name("deployer", "prod", a, "i-0123456789abcdef0"), pattern)
    assert not fnmatch.fnmatchcase(queue_name("deployer", "prod", b, "i-0123456789abcdef0"), pattern)
    assert not fnmatch.fnmatchcase(queue_name("deployer", "prod", b, "i-0123456789abcdef0") + "--dlq", pattern)


def test_an_owner_is_the_role_session_of_this_instance_or_the_instance_alone() -> None:
    confined = Owner.from_userid("AROAEXAMPLEROLEID01:i-0abc", "i-0abc")
    assert (confined.role_id, confined.userid, confined.confined) == (
        "AROAEXAMPLEROLEID01",
        "AROAEXAMPLEROLEID01:i-0abc",
        True,
    )
    assert Owner.from_userid("AROAEXAMPLEROLEID01:i-other", "i-0abc") == Owner("i-0abc")  # not this instance's session
    assert Owner.from_userid("AKIAIOSFODNN7EXAMPLE", "i-0abc") == Owner("i-0abc")  # static credentials: unconfined
    assert Owner.parse("AROAEXAMPLEROLEID01:i-0abc") == confined
    assert Owner.parse("i-0abc") == Owner("i-0abc")
    assert Owner.parse("nobody:i-0abc") is None
    assert Owner.parse("../i-0abc") is None
