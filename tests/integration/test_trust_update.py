"""Storing trust versions (`deployer trust sign-update`, `publisher.trust_update`): signatures of
several key holders merge, a version never changes its document, and a race is bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployer.protocol.envelope import parse_envelope
from deployer.protocol.errors import ConfigError, PreconditionFailed, PublishError
from publisher import trust_update
from publisher.signing import FileSigner
from publisher.trust_update import store_trust_version
from tests.e2e.test_signing import make_key, trust_of
from tests.support import Fleet


def test_two_key_holders_signatures_merge_into_one_stored_version(fleet: Fleet, tmp_path: Path) -> None:
    first, second = make_key(tmp_path, "first"), make_key(tmp_path, "second")
    payload = trust_of(first, second, version=2).to_json().encode()
    store_trust_version(fleet.clients, fleet.bucket, fleet.layout, payload, [first])
    stored = store_trust_version(fleet.clients, fleet.bucket, fleet.layout, payload, [second])
    body = fleet.clients.s3.get_object(Bucket=fleet.bucket, Key=stored.key)["Body"].read()
    assert len(parse_envelope(body).signatures) == 2


def test_a_stored_version_never_takes_another_document(fleet: Fleet, tmp_path: Path) -> None:
    key = make_key(tmp_path, "k")
    store_trust_version(fleet.clients, fleet.bucket, fleet.layout, trust_of(key, version=2).to_json().encode(), [key])
    other = trust_of(key, make_key(tmp_path, "other"), version=2).to_json().encode()
    with pytest.raises(ConfigError, match="trust version 2 is already stored with another document"):
        store_trust_version(fleet.clients, fleet.bucket, fleet.layout, other, [key])


def test_a_race_that_never_ends_gives_up_after_its_bound(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key: FileSigner = make_key(tmp_path, "k")
    writes = []

    def always_lose(*_args: object, **_kwargs: object) -> str:
        writes.append(1)
        raise PreconditionFailed("another key holder wrote first")

    monkeypatch.setattr(trust_update, "put_conditional", always_lose)
    with pytest.raises(PublishError, match="could not store trust version 2 after 3 rounds of contention"):
        store_trust_version(
            fleet.clients, fleet.bucket, fleet.layout, trust_of(key, version=2).to_json().encode(), [key], rounds=3
        )
    assert len(writes) == 3
