"""Signing with an AWS KMS asymmetric key: the private key never leaves KMS, every signature is in CloudTrail.

The key must be `ECC_NIST_P256` for `SIGN_VERIFY`; documents are signed with `ECDSA_SHA_256`
over the raw message (`MessageType=RAW`, at most 4096 bytes), and every signature is checked
locally against the key's public half before it is used: what agents will verify offline is
verified here first, never taken on KMS's word (an emulator may answer loosely).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import ConfigError, InvalidTrust, PublishError
from deployer.protocol.trust import ECDSA_P256_SHA256, PublicKey, keyid_of, load_public_key

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

#: KMS Sign takes at most 4096 bytes with MessageType=RAW. https://docs.aws.amazon.com/kms/latest/APIReference/API_Sign.html
MAX_KMS_RAW_MESSAGE_BYTES = 4096
KMS_KEY_SPEC = "ECC_NIST_P256"
KMS_SIGNING_ALGORITHM = "ECDSA_SHA_256"


class KmsSigner:
    """A `publisher.signing.Signer` over one KMS key (id, alias or ARN)."""

    scheme = ECDSA_P256_SHA256

    def __init__(self, kms: KMSClient, key: str, policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self.kms = kms
        self.policy = policy
        found = policy.call(kms.get_public_key, KeyId=key)
        try:
            # The public key itself says what the key is (an emulator may leave KeySpec out).
            load_public_key(found["PublicKey"], self.scheme)
        except InvalidTrust:
            raise ConfigError(f"KMS key {key} is not an {KMS_KEY_SPEC} key; signing needs one") from None
        if found.get("KeyUsage", "SIGN_VERIFY") != "SIGN_VERIFY":
            raise ConfigError(f"KMS key {key} has key usage {found.get('KeyUsage')}; signing needs SIGN_VERIFY")
        self.key_arn = found["KeyId"]
        self.public_key_der = found["PublicKey"]
        self.keyid = keyid_of(self.public_key_der)
        self._public = PublicKey(self.keyid, self.scheme, self.public_key_der)

    def sign(self, data: bytes) -> bytes:
        if len(data) > MAX_KMS_RAW_MESSAGE_BYTES:
            raise PublishError(
                f"the document to sign is {len(data)} bytes; KMS signs at most {MAX_KMS_RAW_MESSAGE_BYTES} "
                "raw bytes (shorten origin)"
            )
        signature = self.policy.call(
            self.kms.sign,
            KeyId=self.key_arn,
            Message=data,
            MessageType="RAW",
            SigningAlgorithm=KMS_SIGNING_ALGORITHM,
        )["Signature"]
        if not self._public.verifies(signature, data):
            raise PublishError(f"KMS key {self.key_arn} returned a signature its own public key does not verify")
        return signature
