"""Storing a signed trust version (`deployer trust sign-update`): merge signatures, write conditionally.

A version's document never changes once stored; signing it again only adds signatures, so key
holders of a threshold above one each run this with their own key. Two holders signing at the
same moment race on one object: each write is conditional on the version it read
(`If-Match`, `If-None-Match: *` for the first), and the loser re-reads and merges, a bounded
number of times, like a publish claiming a seq.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from deployer.aws.clients import Clients
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import get_document, put_conditional
from deployer.protocol.envelope import TRUST_PAYLOAD_TYPE, Envelope, parse_envelope
from deployer.protocol.errors import ConfigError, PreconditionFailed, PublishError
from deployer.protocol.layout import Layout
from deployer.protocol.trust import parse_trust
from publisher.publish import MAX_CLAIM_ROUNDS
from publisher.signing import Signer, sign

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StoredTrust:
    version: int
    key: str
    envelope: Envelope


def store_trust_version(
    clients: Clients,
    bucket: str,
    layout: Layout,
    payload: bytes,
    signers: Sequence[Signer],
    policy: RetryPolicy = DEFAULT_POLICY,
    rounds: int = MAX_CLAIM_ROUNDS,
) -> StoredTrust:
    """Sign `payload` (a trust document) and store it as `trust/<version>.json`, merged with the
    signatures already stored for that version. ConfigError if another document holds the version."""
    if not signers:
        raise ConfigError("--sign-key is required: a trust update is only taken when signed")
    document = parse_trust(payload)
    key = layout.trust_key(document.version)
    for _ in range(rounds):
        found = get_document(clients.s3, bucket, key, policy)
        envelope = sign(payload, TRUST_PAYLOAD_TYPE, signers)
        if found is not None:
            stored = parse_envelope(found[0])
            if stored.payload != payload:
                raise ConfigError(
                    f"trust version {document.version} is already stored with another document (s3://{bucket}/{key})"
                )
            for signature in envelope.signatures:
                stored = stored.with_signature(signature)
            envelope = stored
        try:
            put_conditional(
                clients.s3,
                bucket,
                key,
                envelope.to_json().encode(),
                if_match=found[1] if found else None,
                policy=policy,
            )
            return StoredTrust(document.version, key, envelope)
        except PreconditionFailed:
            log.info(
                "trust_version_raced", key=key, next="another key holder signed at the same moment: merging with theirs"
            )
    raise PublishError(f"could not store trust version {document.version} after {rounds} rounds of contention")
