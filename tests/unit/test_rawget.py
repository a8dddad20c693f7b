"""The reader's own SigV4 for report GETs, held equal to botocore's `S3SigV4Auth`."""

from __future__ import annotations

from datetime import UTC, datetime
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.utils import percent_encode

from deployer.aws.rawget import KEY_SAFE, BucketAddress, GetSigner

KEYS = [
    "status/prod/web/i-0123456789abcdef0.json",
    "status/prod/web/a key with spaces+plus.json",
    "status/prod/web/ünïcode~tilde/%percent.json",
    "releases/api/2026-12-07T23:59:59Z/manifest.yml",
]
ORIGINS = [
    ("http://127.0.0.1:4566", "/fleet-bucket/"),  # an emulator, path-style
    ("https://fleet-bucket.s3.eu-west-1.amazonaws.com", "/"),  # virtual-hosted, default port
    ("https://s3.eu-west-1.amazonaws.com:443", "/fleet-bucket/"),  # a default port written out
    ("http://[::1]:9000", "/fleet-bucket/"),  # an IPv6 literal
]


def botocore_headers(where: BucketAddress, path: str, byte_range: str | None, now: datetime) -> dict[str, str]:
    request = AWSRequest(method="GET", url=where.origin + path)
    if byte_range is not None:
        request.headers["Range"] = byte_range
    with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
        S3SigV4Auth(where.credentials, "s3", where.region).add_auth(request)
    return {name.lower(): value for name, value in request.headers.items()}


@pytest.mark.parametrize(("origin", "prefix"), ORIGINS)
@pytest.mark.parametrize("token", [None, "session-token/with+odd=chars"])
@pytest.mark.parametrize("byte_range", [None, "bytes=0-65536"])
def test_a_report_get_carries_the_signature_botocore_would_give_it(
    origin: str, prefix: str, token: str | None, byte_range: str | None
) -> None:
    where = BucketAddress(
        "fleet-bucket", origin, prefix, "eu-west-1", ReadOnlyCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token)
    )
    signer = GetSigner(where)
    for key in KEYS:
        for now in (datetime(2026, 12, 7, 23, 59, 59, tzinfo=UTC), datetime(2026, 12, 8, 0, 0, 1, tzinfo=UTC)):
            path = prefix + percent_encode(key, safe=KEY_SAFE)
            ours = signer.headers(path, byte_range, now)
            assert ours == botocore_headers(where, path, byte_range, now), key
