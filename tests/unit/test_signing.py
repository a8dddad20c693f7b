"""Signed documents, the pure parts: DSSE's encoding, the envelope and trust parsers, who counts as
a signer, the order of the deploy checks, trust rotation, and pinning the artifact."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest

from deployer.apply.fetch import pin_artifact
from deployer.protocol.envelope import DEPLOY_PAYLOAD_TYPE, TRUST_PAYLOAD_TYPE, Envelope, pae, parse_envelope
from deployer.protocol.errors import ArtifactError, ConfigError, InvalidMessage, InvalidTrust, Unauthentic
from deployer.protocol.manifest import Manifest
from deployer.protocol.names import Channel
from deployer.protocol.trust import DEPLOY_ROLE, TRUST_ROLE, DeployVerifier, Role, Trust, parse_trust
from publisher.signing import FileSigner, keygen, public_key, sign
from tests.support import make_deploy

API = Channel("prod", "web", "api")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[FileSigner]:
    home = tmp_path_factory.mktemp("keys")
    signers = []
    for name in ("a", "b", "c"):
        keygen(home / f"{name}.pem")
        signers.append(FileSigner(home / f"{name}.pem"))
    return signers


def trust_of(
    deployers: list[FileSigner], threshold: int = 1, version: int = 1, trusters: list[FileSigner] | None = None
) -> Trust:
    everyone = [*deployers, *(trusters or [])]
    role = Role(frozenset(s.keyid for s in deployers), threshold)
    trust_role = Role(frozenset(s.keyid for s in (trusters or deployers)), 1)
    return Trust(
        version, {s.keyid: public_key(s) for s in everyone}, {DEPLOY_ROLE: role, TRUST_ROLE: trust_role}, {API: 3}
    )


def test_the_pre_authentication_encoding_is_dsses() -> None:
    # The DSSE specification's own example.
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_an_envelope_round_trips() -> None:
    envelope = Envelope(b'{"x":1}', DEPLOY_PAYLOAD_TYPE)
    assert parse_envelope(envelope.to_json()) == envelope


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"payload": "e30=", "payloadType": "t", "signatures": [], "extra": 1}, "unknown key(s): extra"),
        ({"payload": "not base64!", "payloadType": "t", "signatures": []}, "payload is not valid base64"),
        ({"payload": "e30=", "payloadType": "", "signatures": []}, "payloadType must be a non-empty string"),
        ({"payload": "e30=", "payloadType": "t", "signatures": [{"keyid": "ab", "sig": ""}]}, "is not a sha256 key id"),
        (
            {"payload": "e30=", "payloadType": "t", "signatures": [{"keyid": "a" * 64}]},
            "must be an object with keyid and sig",
        ),
        ({"payload": "e30=", "payloadType": "t", "signatures": [{}] * 17}, "at most 16"),
    ],
)
def test_a_malformed_envelope_is_refused_naming_the_key(doc: dict[str, object], error: str) -> None:
    with pytest.raises(InvalidMessage, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_envelope(json.dumps(doc))


def test_a_trust_document_round_trips_and_names_what_is_wrong(keys: list[FileSigner]) -> None:
    trust = trust_of(keys[:2])
    assert parse_trust(trust.to_json()) == trust
    doc = json.loads(trust.to_json())
    stolen = dict(doc, keys={keys[2].keyid: doc["keys"][keys[0].keyid]})
    with pytest.raises(InvalidTrust, match="the key id is not the sha256 of its public key"):
        parse_trust(json.dumps(stolen))
    with pytest.raises(InvalidTrust, match=r"roles\.deploy\.threshold must be between 1 and the number of its keys"):
        parse_trust(
            json.dumps(dict(doc, roles={**doc["roles"], "deploy": {"keyids": [keys[0].keyid], "threshold": 2}}))
        )
    with pytest.raises(InvalidTrust, match=r"roles\.trust is missing"):
        parse_trust(json.dumps(dict(doc, roles={"deploy": doc["roles"]["deploy"]})))
    with pytest.raises(InvalidTrust, match="floors: 'prod/web' is not stage/role/component"):
        parse_trust(json.dumps(dict(doc, floors={"prod/web": 1})))
    with pytest.raises(InvalidTrust, match="is not a ecdsa-p256-sha256 key"):
        parse_trust(
            json.dumps(dict(doc, keys={k: dict(v, scheme="ecdsa-p256-sha256") for k, v in doc["keys"].items()}))
        )


def test_a_threshold_counts_each_trusted_key_once(keys: list[FileSigner]) -> None:
    trust = trust_of(keys[:2], threshold=2)
    payload = make_deploy(seq=5).to_json().encode()
    both = sign(payload, DEPLOY_PAYLOAD_TYPE, keys[:2])
    assert trust.verified_payload(both, DEPLOY_ROLE, DEPLOY_PAYLOAD_TYPE) == payload
    one = sign(payload, DEPLOY_PAYLOAD_TYPE, keys[:1])
    twice = Envelope(payload, DEPLOY_PAYLOAD_TYPE, (*one.signatures, *one.signatures))
    with_stranger = sign(payload, DEPLOY_PAYLOAD_TYPE, [keys[0], keys[2]])
    for short in (one, twice, with_stranger):
        with pytest.raises(Unauthentic, match="1 valid signature"):
            trust.verified_payload(short, DEPLOY_ROLE, DEPLOY_PAYLOAD_TYPE)


def test_a_deploy_is_checked_in_order_shape_type_signature_payload_floor(keys: list[FileSigner]) -> None:
    verifier = DeployVerifier(trust_of(keys[:1]), required=True)
    good = make_deploy(seq=5)
    assert verifier.open(sign(good.to_json().encode(), DEPLOY_PAYLOAD_TYPE, keys[:1]).to_json()) == good
    cases = {
        "not JSON": (b"{", InvalidMessage, "not JSON"),
        "unsigned": (good.to_json().encode(), Unauthentic, "unsigned deploy document"),
        "type": (
            sign(good.to_json().encode(), TRUST_PAYLOAD_TYPE, keys[:1]).to_json().encode(),
            Unauthentic,
            "payload type",
        ),
        "key": (
            sign(good.to_json().encode(), DEPLOY_PAYLOAD_TYPE, keys[1:2]).to_json().encode(),
            Unauthentic,
            "not trusted",
        ),
        "payload": (sign(b'{"v":1}', DEPLOY_PAYLOAD_TYPE, keys[:1]).to_json().encode(), InvalidMessage, "missing key"),
        "floor": (
            sign(replace(good, seq=2).to_json().encode(), DEPLOY_PAYLOAD_TYPE, keys[:1]).to_json().encode(),
            Unauthentic,
            "below the floor 3",
        ),
    }
    for case, (raw, error, text) in cases.items():
        with pytest.raises(error, match=text):
            verifier.open(raw)
        assert case


def test_while_not_required_an_unsigned_deploy_passes_but_a_bad_signature_never_does(keys: list[FileSigner]) -> None:
    migrating = DeployVerifier(trust_of(keys[:1]), required=False)
    good = make_deploy(seq=5)
    assert migrating.open(good.to_json()) == good
    with pytest.raises(Unauthentic):
        migrating.open(sign(good.to_json().encode(), DEPLOY_PAYLOAD_TYPE, keys[1:2]).to_json())
    # Without a trust file there is nothing to verify against: the payload is as trusted as a bare document.
    assert DeployVerifier().open(sign(good.to_json().encode(), DEPLOY_PAYLOAD_TYPE, keys[1:2]).to_json()) == good


def test_trust_moves_only_to_the_next_version_signed_by_the_held_trust_keys(keys: list[FileSigner]) -> None:
    held = trust_of(keys[:1])
    successor = trust_of(keys[1:2], version=2)
    payload = successor.to_json().encode()
    assert held.next_version(sign(payload, TRUST_PAYLOAD_TYPE, keys[:1])) == successor
    with pytest.raises(InvalidTrust, match="trust update refused: 0 valid signature"):
        held.next_version(sign(payload, TRUST_PAYLOAD_TYPE, keys[1:2]))
    with pytest.raises(InvalidTrust, match="version 3, expected 2"):
        held.next_version(sign(trust_of(keys[1:2], version=3).to_json().encode(), TRUST_PAYLOAD_TYPE, keys[:1]))
    with pytest.raises(InvalidTrust, match="payload type"):
        held.next_version(sign(payload, DEPLOY_PAYLOAD_TYPE, keys[:1]))


def test_a_signed_artifact_digest_replaces_the_manifests_and_a_disagreeing_sha256_is_refused() -> None:
    signed = make_deploy(artifact_sha256="b" * 64, artifact_size=10)
    md5 = Manifest(src="s3://b/k", checksum="c" * 32)
    assert pin_artifact(md5, signed).checksum == "b" * 64
    assert pin_artifact(md5, make_deploy()).checksum == "c" * 32
    with pytest.raises(ArtifactError, match="is not the signed artifact_sha256"):
        pin_artifact(Manifest(src="s3://b/k", checksum="d" * 64), signed)


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    key = keygen(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    assert FileSigner(tmp_path / "k.pem").keyid == key.keyid
    with pytest.raises(ConfigError, match="never overwritten"):
        keygen(tmp_path / "k.pem")
    assert base64.b64encode(key.der)
