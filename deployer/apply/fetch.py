"""Open a manifest `src` (s3://, https://, http://, file://) as a byte stream, and fetch small documents."""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlparse

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import open_object
from deployer.protocol.errors import FetchError, TransientFetchError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Per-read socket timeout for HTTP downloads; a stalled server fails instead of hanging the agent.
HTTP_TIMEOUT_SECONDS = 30.0


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@contextlib.contextmanager
def open_source(url: str, s3: S3Client, policy: RetryPolicy = DEFAULT_POLICY) -> Iterator[Readable]:
    """Yield a stream of the object at `url`. Opening is retried; a failure mid-stream is the caller's."""
    stream = policy.call(_open, url, s3)
    try:
        yield stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def read_source(url: str, s3: S3Client, limit: int, policy: RetryPolicy = DEFAULT_POLICY) -> bytes:
    """Fetch a whole small document (a manifest), refusing anything over `limit` bytes.

    Small enough to read whole, so open and read form one attempt under the policy.
    """

    def attempt() -> bytes:
        stream = _open(url, s3)
        try:
            data = stream.read(limit + 1)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if len(data) > limit:
            raise FetchError(f"{url} is larger than the {limit}-byte limit")
        return data

    return policy.call(attempt)


def _open(url: str, s3: S3Client) -> Readable:
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return open_object(s3, parsed.netloc, unquote(parsed.path.lstrip("/")))
    if parsed.scheme in ("http", "https"):
        return _open_http(url)
    if parsed.scheme == "file":
        try:
            return open(unquote(parsed.path), "rb")  # the caller closes it
        except OSError as exc:
            raise FetchError(f"cannot open {url}: {exc.strerror}") from None
    raise FetchError(f"unsupported source scheme in {url!r}")


def _open_http(url: str) -> IO[bytes]:
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
