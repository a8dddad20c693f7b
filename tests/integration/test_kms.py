"""Signing with a KMS key against the emulator: the signature verifies offline, limits are refused by name."""

from __future__ import annotations

from typing import Literal

import boto3
import pytest

from deployer.aws.clients import kms_client
from deployer.aws.kms import MAX_KMS_RAW_MESSAGE_BYTES, KmsSigner
from deployer.protocol.envelope import DEPLOY_PAYLOAD_TYPE
from deployer.protocol.errors import ConfigError, PublishError
from deployer.protocol.trust import ECDSA_P256_SHA256, DeployVerifier, Role, Trust
from publisher.signing import public_key, sign
from tests.support import FAST_POLICY, REGION, Fleet, make_deploy


def create_key(fleet: Fleet, spec: Literal["ECC_NIST_P256", "RSA_2048"] = "ECC_NIST_P256") -> str:
    kms = boto3.client("kms", region_name=REGION, endpoint_url=fleet.endpoint_url)
    return str(kms.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"])


def test_a_kms_signature_verifies_offline_with_the_keys_public_half(fleet: Fleet) -> None:
    signer = KmsSigner(kms_client(REGION, fleet.endpoint_url), create_key(fleet), FAST_POLICY)
    assert signer.scheme == ECDSA_P256_SHA256
    key = public_key(signer)
    trust = Trust(
        1, {key.keyid: key}, {"deploy": Role(frozenset({key.keyid}), 1), "trust": Role(frozenset({key.keyid}), 1)}
    )
    deploy = make_deploy()
    envelope = sign(deploy.to_json().encode(), DEPLOY_PAYLOAD_TYPE, [signer])
    assert DeployVerifier(trust, required=True).open(envelope.to_json()) == deploy


def test_kms_limits_and_key_kinds_are_refused_by_name(fleet: Fleet) -> None:
    signer = KmsSigner(kms_client(REGION, fleet.endpoint_url), create_key(fleet), FAST_POLICY)
    with pytest.raises(PublishError, match=f"KMS signs at most {MAX_KMS_RAW_MESSAGE_BYTES} raw bytes"):
        signer.sign(b"x" * (MAX_KMS_RAW_MESSAGE_BYTES + 1))
    with pytest.raises(ConfigError, match="is not an ECC_NIST_P256 key"):
        KmsSigner(kms_client(REGION, fleet.endpoint_url), create_key(fleet, "RSA_2048"), FAST_POLICY)
