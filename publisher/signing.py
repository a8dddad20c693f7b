"""Signing what CI publishes: one signer interface, two backends, one envelope (DSSE).

- `kms:<key id|alias|arn>`: an AWS KMS `ECC_NIST_P256` key (`deployer.aws.kms.KmsSigner`).
- `file:<path>`: an Ed25519 private key in a PEM file (`deployer keygen` writes one), for the
  demo, CI outside AWS and air-gapped setups.

Both produce the same envelope, and agents verify both offline against their trust document.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from deployer.protocol.envelope import Envelope, Signature
from deployer.protocol.errors import ConfigError
from deployer.protocol.trust import ED25519, PublicKey, keyid_of

#: The environment variable `--sign-key` falls back to.
SIGN_KEY_ENV = "DEPLOYER_SIGN_KEY"


class Signer(Protocol):
    @property
    def keyid(self) -> str: ...

    @property
    def scheme(self) -> str: ...

    @property
    def public_key_der(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


class FileSigner:
    """An Ed25519 private key read from a PEM file (PKCS#8, unencrypted)."""

    scheme = ED25519

    def __init__(self, path: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read signing key {path}: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"signing key {path} is not an Ed25519 private key (`deployer keygen` writes one)")
        self._key = key
        self.public_key_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.keyid = keyid_of(self.public_key_der)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def signer_from_spec(spec: str, region: str | None = None, endpoint_url: str | None = None) -> Signer:
    """`kms:<key>` or `file:<path>` as a Signer; ConfigError naming the problem otherwise."""
    kind, _, where = spec.partition(":")
    if kind == "file" and where:
        return FileSigner(Path(where))
    if kind == "kms" and where:
        from deployer.aws.clients import kms_client
        from deployer.aws.kms import KmsSigner

        return KmsSigner(kms_client(region, endpoint_url), where)
    raise ConfigError(f"--sign-key {spec!r} must be kms:<key id|alias|arn> or file:<path>")


def sign(payload: bytes, payload_type: str, signers: Iterable[Signer]) -> Envelope:
    """`payload` in an envelope signed by each signer (over DSSE's pre-authentication encoding)."""
    envelope = Envelope(payload, payload_type)
    for signer in signers:
        envelope = envelope.with_signature(Signature(signer.keyid, signer.sign(envelope.signed_bytes())))
    return envelope


def public_key(signer: Signer) -> PublicKey:
    return PublicKey(signer.keyid, signer.scheme, signer.public_key_der)


def keygen(out: Path) -> PublicKey:
    """Write a new Ed25519 private key to `out` (PEM, mode 0600, never overwriting) and return its public half."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{out} already exists; a signing key is never overwritten") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return PublicKey(keyid_of(der), ED25519, der)
