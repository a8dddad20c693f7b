"""Freshness: the trust's rule, the timestamp document, what an agent keeps and refuses."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deployer.agent.vouched import Vouched
from deployer.protocol.envelope import DEPLOY_PAYLOAD_TYPE, TIMESTAMP_PAYLOAD_TYPE
from deployer.protocol.errors import InvalidMessage, InvalidTrust, Unauthentic
from deployer.protocol.freshness import Freshness, Timestamp, freshness_from_dict, parse_timestamp_document
from deployer.protocol.names import Channel
from deployer.protocol.trust import DEPLOY_ROLE, TRUST_ROLE, DeployVerifier, Role, Trust, parse_trust
from publisher.signing import FileSigner, keygen, public_key, sign
from tests.support import make_deploy

API = Channel("prod", "web", "api")
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
RULE = Freshness(expires_s=3600, refresh_s=900)


@pytest.fixture
def key(tmp_path: Path) -> FileSigner:
    keygen(tmp_path / "k.pem")
    return FileSigner(tmp_path / "k.pem")


def trust_with(key: FileSigner, freshness: Freshness | None = RULE) -> Trust:
    pub = public_key(key)
    role = Role(frozenset({pub.keyid}), 1)
    return Trust(1, {pub.keyid: pub}, {DEPLOY_ROLE: role, TRUST_ROLE: role}, freshness=freshness)


def stamp(seq: int, at: datetime = NOW, channel: Channel = API) -> Timestamp:
    return Timestamp(channel, seq, f"d-{seq}", at)


def test_a_timestamp_vouches_until_it_expires_and_a_higher_seq_or_later_signing_supersedes() -> None:
    assert not stamp(2).expired(RULE, NOW + timedelta(seconds=3599))
    assert stamp(2).expired(RULE, NOW + timedelta(seconds=3600))
    assert stamp(3, NOW - timedelta(hours=5)).newer_than(stamp(2))
    assert stamp(2, NOW + timedelta(seconds=1)).newer_than(stamp(2))
    assert not stamp(1, NOW + timedelta(days=1)).newer_than(stamp(2))


def test_a_timestamp_round_trips_and_one_for_another_channel_or_malformed_is_refused() -> None:
    assert parse_timestamp_document(stamp(7).to_json(), API) == stamp(7)
    with pytest.raises(InvalidMessage, match="not prod/web/api"):
        parse_timestamp_document(stamp(7, channel=Channel("prod", "web", "worker")).to_json(), API)
    doc = json.loads(stamp(7).to_json())
    for change, error in (
        ({"seq": 0}, "seq must be"),
        ({"signed_at": "yesterday"}, "signed_at"),
        ({"x": 1}, "exactly"),
    ):
        with pytest.raises(InvalidMessage, match=error):
            parse_timestamp_document(json.dumps({**doc, **change}), API)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"expires_s": 3600}, "expires_s and refresh_s"),
        ({"expires_s": 10, "refresh_s": 5}, "between 60"),
        ({"expires_s": 3600, "refresh_s": 3600}, "shorter than expires_s"),
        ({"expires_s": "1h", "refresh_s": 900}, "positive number of seconds"),
    ],
)
def test_a_trust_s_freshness_is_checked_naming_what_is_wrong(value: object, error: str, key: FileSigner) -> None:
    with pytest.raises(ValueError, match=error):
        freshness_from_dict(value)
    doc = json.loads(trust_with(key).to_json())
    doc["freshness"] = value
    with pytest.raises(InvalidTrust, match=error):
        parse_trust(json.dumps(doc))


def test_a_trust_without_freshness_is_written_as_before(key: FileSigner) -> None:
    assert "freshness" not in trust_with(key, None).to_json()
    assert parse_trust(trust_with(key).to_json()).freshness == RULE


def test_a_timestamp_opens_only_when_the_deploy_keys_signed_it_as_a_timestamp(key: FileSigner, tmp_path: Path) -> None:
    verifier = DeployVerifier(trust_with(key), required=True)
    payload = stamp(4).to_json().encode()
    assert verifier.open_timestamp(sign(payload, TIMESTAMP_PAYLOAD_TYPE, [key]).to_json(), API) == stamp(4)
    with pytest.raises(Unauthentic, match=r"is not 'application/vnd\.deployer\.timestamp"):
        verifier.open_timestamp(sign(payload, DEPLOY_PAYLOAD_TYPE, [key]).to_json(), API)
    keygen(tmp_path / "other.pem")
    with pytest.raises(Unauthentic, match="0 valid signature"):
        verifier.open_timestamp(
            sign(payload, TIMESTAMP_PAYLOAD_TYPE, [FileSigner(tmp_path / "other.pem")]).to_json(), API
        )


def test_a_pointer_older_than_a_vouched_seq_is_refused_as_put_back(key: FileSigner) -> None:
    verifier = DeployVerifier(trust_with(key), required=True, vouched={API: 5})
    old = make_deploy(seq=4)
    with pytest.raises(Unauthentic, match="older than seq 5, which a signed timestamp vouched for"):
        verifier.open(sign(old.to_json().encode(), DEPLOY_PAYLOAD_TYPE, [key]).to_json())
    current = make_deploy(seq=5)
    assert verifier.open(sign(current.to_json().encode(), DEPLOY_PAYLOAD_TYPE, [key]).to_json()) == current


def test_an_agent_keeps_the_newest_timestamp_across_restarts_and_says_since_when_it_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "timestamps.json"
    held = Vouched(path)
    assert held.stale_since(API, RULE, NOW, None) == "2026-12-07T12:00:00Z"  # never vouched for
    assert held.stale_since(API, RULE, NOW + timedelta(minutes=5), "2026-12-07T12:00:00Z") == "2026-12-07T12:00:00Z"
    assert held.record(stamp(3))
    assert not held.record(stamp(2, NOW + timedelta(hours=1)))  # an older seq, however recently signed
    again = Vouched(path)
    assert again.newest(API) == stamp(3)
    assert again.floors() == {API: 3}
    assert again.stale_since(API, RULE, NOW + timedelta(minutes=59), None) is None
    assert again.stale_since(API, RULE, NOW + timedelta(hours=2), None) == "2026-12-07T13:00:00Z"
    path.write_text("{not json")
    assert Vouched(path).floors() == {}
