"""S3 adapters: documents, conditional writes, immutable objects, streams and channel pointers.

Thin: each function makes the calls under the injected retry policy and turns S3's answers
into ours (None for a missing object, `PreconditionFailed` for a lost conditional write,
`FetchError` for an object that cannot be downloaded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from deployer.aws.checksum import UPLOAD_CONCURRENCY, UPLOAD_PART_BYTES
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy, is_transient
from deployer.protocol.deploy import Deploy
from deployer.protocol.errors import AwsError, FetchError, PreconditionFailed
from deployer.protocol.layout import Layout
from deployer.protocol.names import Channel
from deployer.protocol.trust import UNVERIFIED, DeployVerifier

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Answers that mean "no such object" (GetObject says NoSuchKey, HeadObject only 404).
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
#: 412 Precondition Failed: the object changed (If-Match) or exists (If-None-Match); 409
#: ConditionalRequestConflict: a concurrent conditional write is in flight. Same meaning.
#: https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-requests.html
PRECONDITION_STATUSES = frozenset({409, 412})


@dataclass(frozen=True)
class Pointer:
    deploy: Deploy
    etag: str


def is_not_found(exc: AwsError) -> bool:
    return exc.code in NOT_FOUND_CODES or exc.status == 404


def get_document(s3: S3Client, bucket: str, key: str, policy: RetryPolicy = DEFAULT_POLICY) -> tuple[bytes, str] | None:
    """(body, etag) of an object, or None if it does not exist."""

    def attempt() -> tuple[bytes, str]:
        # GET and body read are one attempt: a body cut short is retried like a failed GET.
        response = s3.get_object(Bucket=bucket, Key=key)
        return response["Body"].read(), response["ETag"]

    try:
        return policy.call(attempt)
    except AwsError as exc:
        if is_not_found(exc):
            return None
        raise AwsError(
            f"cannot read s3://{bucket}/{key}: {exc.code or exc}", code=exc.code, status=exc.status
        ) from None


def head(
    s3: S3Client, bucket: str, key: str, policy: RetryPolicy = DEFAULT_POLICY, checksum: bool = False
) -> dict[str, object] | None:
    """HeadObject's answer (ETag, Metadata, LastModified, …, with `checksum` the checksums S3
    holds), or None if the object does not exist."""
    mode: dict[str, Any] = {"ChecksumMode": "ENABLED"} if checksum else {}
    try:
        return dict(policy.call(s3.head_object, Bucket=bucket, Key=key, **mode))
    except AwsError as exc:
        if is_not_found(exc):
            return None
        raise


def read_pointer(
    s3: S3Client,
    bucket: str,
    layout: Layout,
    channel: Channel,
    policy: RetryPolicy = DEFAULT_POLICY,
    verifier: DeployVerifier = UNVERIFIED,
) -> Pointer | None:
    """The channel's pointer, opened by `verifier` (an agent's checks signatures; the publisher reads its own)."""
    found = get_document(s3, bucket, layout.pointer_key(channel), policy)
    if found is None:
        return None
    body, etag = found
    return Pointer(verifier.open(body), etag)


def write_error(exc: AwsError, bucket: str, key: str) -> AwsError:
    """What a failed PUT means: a lost conditional write, or an error naming the object."""
    if exc.status in PRECONDITION_STATUSES or exc.code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return PreconditionFailed(f"s3://{bucket}/{key} was written by someone else first", code=exc.code)
    return AwsError(f"cannot write s3://{bucket}/{key}: {exc.code or exc}", code=exc.code, status=exc.status)


@dataclass(frozen=True)
class StoredObject:
    """One row of a LIST."""

    key: str
    size: int
    last_modified: datetime
    etag: str = ""


def list_objects(s3: S3Client, bucket: str, prefix: str, policy: RetryPolicy = DEFAULT_POLICY) -> list[StoredObject]:
    """Every object under `prefix` (one request per 1,000 keys; the whole listing is one attempt)."""
    paginator = s3.get_paginator("list_objects_v2")
    pages = policy.call(lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    return [
        StoredObject(obj["Key"], obj.get("Size", 0), obj["LastModified"], obj.get("ETag", ""))
        for page in pages
        for obj in page.get("Contents", [])
    ]


def delete_object(s3: S3Client, bucket: str, key: str, policy: RetryPolicy = DEFAULT_POLICY) -> None:
    """Delete `key`; deleting what is already gone succeeds (S3 answers 204 either way)."""
    try:
        policy.call(s3.delete_object, Bucket=bucket, Key=key)
    except AwsError as exc:
        if not is_not_found(exc):
            raise AwsError(
                f"cannot delete s3://{bucket}/{key}: {exc.code or exc}", code=exc.code, status=exc.status
            ) from None


def put_conditional(
    s3: S3Client,
    bucket: str,
    key: str,
    body: bytes,
    *,
    if_match: str | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    content_type: str = "application/json",
    metadata: dict[str, str] | None = None,
) -> str:
    """Write only if the object is unchanged (If-Match etag) or absent (If-None-Match: *).

    Returns the new etag; raises PreconditionFailed when another writer got there first.
    """
    condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
    try:
        response = policy.call(
            s3.put_object,
            Bucket=bucket,
            Key=key,
            Body=body,
            ContentType=content_type,
            Metadata=metadata or {},
            **condition,
        )
    except AwsError as exc:
        raise write_error(exc, bucket, key) from None
    return str(response["ETag"])


def stored_checksum(head_answer: Mapping[str, object]) -> str | None:
    """The SHA256 checksum S3 holds for an object (HeadObject with `ChecksumMode=ENABLED`)."""
    found = head_answer.get("ChecksumSHA256")
    return str(found) if found else None


def checksums_match(held: str | None, expected: str) -> bool:
    """Pure: does S3's checksum `held` vouch for `expected` (an `ObjectChecksum.value`)?

    A composite checksum is documented as the digest of the parts' digests followed by `-<parts>`;
    whether HeadObject repeats the suffix is not (moto leaves it off), so a held value without it
    is compared by its digest alone, which already covers every part.
    """
    return held is not None and (held == expected or held == expected.rpartition("-")[0])


class Upload:
    """An artifact upload in flight (s3transfer: parallel multipart, bounded memory), started at
    once so the caller can check the artifact meanwhile, and cancel the upload if the check fails."""

    def __init__(self, s3: S3Client, bucket: str, key: str, path: Path, sha256: str, content_type: str) -> None:
        self.s3, self.bucket, self.key, self.path = s3, bucket, key, path
        # S3 computes and keeps a SHA256 checksum of what it received (ObjectChecksum).
        self.extra = {"ContentType": content_type, "Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"}
        self._manager, self._future = self._start()

    def _start(self) -> tuple[Any, Any]:
        from s3transfer.manager import TransferConfig, TransferManager  # only publish uploads artifacts

        config = TransferConfig(
            multipart_threshold=UPLOAD_PART_BYTES,
            multipart_chunksize=UPLOAD_PART_BYTES,
            max_request_concurrency=UPLOAD_CONCURRENCY,
        )
        manager = TransferManager(self.s3, config)
        return manager, manager.upload(str(self.path), self.bucket, self.key, extra_args=self.extra)

    def result(self, policy: RetryPolicy = DEFAULT_POLICY) -> None:
        """Wait for the upload. A transient failure starts it again, under `policy`, like any call."""
        attempts = iter([(self._manager, self._future)])

        def attempt() -> None:
            manager, future = next(attempts, None) or self._start()
            try:
                future.result()
            finally:
                manager.shutdown()

        policy.call(attempt)

    def cancel(self) -> None:
        self._future.cancel()
        with contextlib.suppress(Exception):  # whatever a cancelled transfer raises is the cancellation
            self._manager.shutdown(cancel=True)


def put_file_conditional(
    s3: S3Client,
    bucket: str,
    key: str,
    path: Path,
    sha256: str,
    content_type: str,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> None:
    """Stream a file into `key` with `If-None-Match: *` in one PUT (≤ 5 GB); each attempt reads
    the file again from the start. PreconditionFailed if the key exists."""

    def attempt() -> None:
        with open(path, "rb") as body:
            s3.put_object(
                Bucket=bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                Metadata={"sha256": sha256},
                IfNoneMatch="*",
                ChecksumAlgorithm="SHA256",
            )

    try:
        policy.call(attempt)
    except AwsError as exc:
        raise write_error(exc, bucket, key) from None


#: A page people open in a browser: always revalidated, so nobody reads an old fleet from a cache.
PAGE_CACHE_CONTROL = "no-cache"
PAGE_CONTENT_TYPE = "text/html; charset=utf-8"


def put_page(s3: S3Client, bucket: str, key: str, body: bytes, policy: RetryPolicy = DEFAULT_POLICY) -> str:
    """Write an HTML page whole (last writer wins: it is a view, regenerated from S3); returns its etag."""
    try:
        response = policy.call(
            s3.put_object,
            Bucket=bucket,
            Key=key,
            Body=body,
            ContentType=PAGE_CONTENT_TYPE,
            CacheControl=PAGE_CACHE_CONTROL,
        )
    except AwsError as exc:
        raise write_error(exc, bucket, key) from None
    return str(response["ETag"])


def open_object(s3: S3Client, bucket: str, key: str) -> tuple[IO[bytes], int]:
    """GetObject's body as a stream, and the length S3 says the object has. Not retried here: the
    caller's policy retries the whole attempt.

    A transient failure propagates as botocore raised it (so the policy retries it); anything
    else is a FetchError naming the object.
    """
    try:
        response = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_transient(exc):
            raise
        code = exc.response.get("Error", {}).get("Code", "")
        raise FetchError(f"cannot get s3://{bucket}/{key}: {code}") from None
    return response["Body"], response["ContentLength"]  # type: ignore[return-value]


def bucket_exists(s3: S3Client, bucket: str, policy: RetryPolicy = DEFAULT_POLICY) -> bool:
    try:
        policy.call(s3.head_bucket, Bucket=bucket)
    except AwsError as exc:
        if exc.code in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise AwsError(f"cannot check bucket {bucket}: {exc.code or exc}", code=exc.code, status=exc.status) from None
    return True


def create_bucket(s3: S3Client, bucket: str, policy: RetryPolicy = DEFAULT_POLICY) -> None:
    region = s3.meta.region_name
    kwargs: dict[str, object] = {"Bucket": bucket}
    if region != "us-east-1":
        # us-east-1 is the one region that rejects an explicit LocationConstraint.
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        policy.call(s3.create_bucket, **kwargs)
    except AwsError as exc:
        raise AwsError(f"cannot create bucket {bucket}: {exc.code or exc}", code=exc.code, status=exc.status) from None
