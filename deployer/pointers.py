"""Reading and conditionally writing channel pointers (`latest.json`) and history in S3."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from deployer.errors import AwsError
from deployer.layout import Layout
from deployer.protocol import Channel, Deploy, parse_deploy
from deployer.retry import DEFAULT_POLICY, RetryPolicy, is_transient

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass(frozen=True)
class Pointer:
    deploy: Deploy
    etag: str


class PreconditionFailed(Exception):
    """Raised when a conditional S3 write lost a race (HTTP 412); the caller re-reads and retries."""


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def get_document(s3: S3Client, bucket: str, key: str, policy: RetryPolicy = DEFAULT_POLICY) -> tuple[bytes, str] | None:
    """(body, etag) of an object, or None if it does not exist."""
    try:
        response = policy.call(s3.get_object, Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in ("NoSuchKey", "404") or http_status(exc) == 404:
            return None
        raise AwsError(f"cannot read s3://{bucket}/{key}: {error_code(exc) or exc}") from None
    return response["Body"].read(), response["ETag"]


def read_pointer(
    s3: S3Client, bucket: str, layout: Layout, channel: Channel, policy: RetryPolicy = DEFAULT_POLICY
) -> Pointer | None:
    found = get_document(s3, bucket, layout.pointer_key(channel), policy)
    if found is None:
        return None
    body, etag = found
    return Pointer(parse_deploy(body), etag)


def put_conditional(
    s3: S3Client,
    bucket: str,
    key: str,
    body: bytes,
    *,
    if_match: str | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    content_type: str = "application/json",
) -> str:
    """Write only if the object is unchanged (If-Match etag) or absent (If-None-Match: *).

    Returns the new etag; raises PreconditionFailed when another writer got there first.
    """
    condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
    try:
        response = policy.call(s3.put_object, Bucket=bucket, Key=key, Body=body, ContentType=content_type, **condition)
    except ClientError as exc:
        # 409 ConditionalRequestConflict: a concurrent conditional write is in flight; same meaning.
        if http_status(exc) in (409, 412) or error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise PreconditionFailed(key) from None
        if is_transient(exc):
            raise
        raise AwsError(f"cannot write s3://{bucket}/{key}: {error_code(exc) or exc}") from None
    return response["ETag"]
