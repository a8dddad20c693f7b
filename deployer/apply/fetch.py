"""Open a manifest `src` (s3://, https://, http://, file://) as a byte stream, fetch small documents,
and fetch the manifest a deploy names, held to its digests."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlparse

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import open_object
from deployer.protocol.deploy import Deploy, inline_manifest_bytes
from deployer.protocol.errors import ArtifactError, FetchError, InvalidMessage, TransientFetchError
from deployer.protocol.limits import MAX_MANIFEST_BYTES
from deployer.protocol.manifest import Manifest, parse_manifest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Per-read socket timeout for HTTP downloads; a stalled server fails instead of hanging the agent.
HTTP_TIMEOUT_SECONDS = 30.0


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Whole:
    """A download that proves it is whole: reaching the end before the announced length is a
    transient error, never a short body.

    A connection closed cleanly (FIN) mid-body looks like a normal end of file to http.client,
    and to botocore's StreamingBody when read in pieces. Hashing such a body would turn a
    network fault into a "checksum mismatch" and reject a valid release for good. With this
    wrapper, bytes that reach a hash or a parser are complete, so a mismatch on them is tampering.
    """

    def __init__(self, raw: Readable, expected: int | None, url: str) -> None:
        self._raw = raw
        self._expected = expected
        self._url = url
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        self.count += len(data)
        if not data and size != 0 and self._expected is not None and self.count < self._expected:
            raise TransientFetchError(f"{self._url}: the connection ended after {self.count} of {self._expected} bytes")
        return data

    def close(self) -> None:
        close = getattr(self._raw, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def open_source(url: str, s3: S3Client) -> Iterator[Readable]:
    """Yield a stream of the object at `url`: one attempt, retried by the caller as a whole
    (opening and reading to the end), so there is one retry layer, never two."""
    stream = _open(url, s3)
    try:
        yield stream
    finally:
        stream.close()


def read_source(url: str, s3: S3Client, limit: int, policy: RetryPolicy = DEFAULT_POLICY) -> bytes:
    """Fetch a whole small document (a manifest), refusing anything over `limit` bytes.

    Small enough to read whole, so open and read form one attempt under the policy.
    """

    def attempt() -> bytes:
        stream = _open(url, s3)
        parts: list[bytes] = []
        size = 0
        try:
            # Read to the end (not just `limit` bytes): only the end proves the body whole.
            while chunk := stream.read(limit + 1 - size):
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise FetchError(f"{url} is larger than the {limit}-byte limit")
        finally:
            stream.close()
        return b"".join(parts)

    return policy.call(attempt)


def _open(url: str, s3: S3Client) -> Whole:
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        body, length = open_object(s3, parsed.netloc, unquote(parsed.path.lstrip("/")))
        return Whole(body, length, url)
    if parsed.scheme in ("http", "https"):
        response = _open_http(url)
        declared = response.headers.get("Content-Length")
        return Whole(response, int(declared) if declared and declared.isdigit() else None, url)
    if parsed.scheme == "file":
        try:
            return Whole(open(unquote(parsed.path), "rb"), None, url)
        except OSError as exc:
            raise FetchError(f"cannot open {url}: {exc.strerror}") from None
    raise FetchError(f"unsupported source scheme in {url!r}")


def _open_http(url: str) -> http.client.HTTPResponse:
    try:
        response = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        exc.close()  # the error carries the open response; we never read its body
        # stretcher treated any response as the artifact; a non-2xx body is never one.
        if exc.code == 429 or exc.code >= 500:
            raise TransientFetchError(f"GET {url} answered HTTP {exc.code}") from None
        raise FetchError(f"GET {url} answered HTTP {exc.code}") from None
    if not 200 <= response.status < 300:
        response.close()
        raise FetchError(f"GET {url} answered HTTP {response.status}")
    return response  # type: ignore[no-any-return]


def fetch_release_manifest(deploy: Deploy, bucket: str, s3: S3Client, policy: RetryPolicy = DEFAULT_POLICY) -> Manifest:
    """The manifest a deploy names, held to the deploy: its bytes must hash to `manifest_sha256`
    (checked before parsing), and a signed deploy's artifact digest replaces the manifest's.

    A deploy that carries its manifest inline costs no request: the same bytes, held to the same
    digest, whichever way they came (docs/design.md, "The deploy document").

    Raises InvalidMessage for a manifest that is not the deploy's, ArtifactError for a manifest
    whose own sha256 disagrees with the signed one.
    """
    if deploy.manifest is not None:
        data = inline_manifest_bytes(deploy.manifest)
    else:
        data = read_source(f"s3://{bucket}/{deploy.manifest_key}", s3, MAX_MANIFEST_BYTES, policy)
    digest = hashlib.sha256(data).hexdigest()
    if digest != deploy.manifest_sha256:
        raise InvalidMessage(f"manifest sha256 {digest} does not match the deploy's {deploy.manifest_sha256}")
    return pin_artifact(parse_manifest(data), deploy)


def pin_artifact(manifest: Manifest, deploy: Deploy) -> Manifest:
    """The manifest to apply, its artifact held to what a signed deploy pinned. Pure.

    A signed deploy carries the artifact's sha256 (and size, checked while streaming), so the
    signature covers the artifact whatever digest the manifest carries (stretcher manifests may
    carry md5 or sha1). A manifest whose own sha256 disagrees is refused.
    """
    if deploy.artifact_sha256 is None or manifest.src is None:
        return manifest
    if manifest.checksum_algorithm == "sha256" and manifest.checksum != deploy.artifact_sha256:
        raise ArtifactError(
            f"manifest checksum {manifest.checksum} is not the signed artifact_sha256 {deploy.artifact_sha256}"
        )
    return dataclasses.replace(manifest, checksum=deploy.artifact_sha256)
