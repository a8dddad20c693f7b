"""Signed GETs of small objects without botocore's per-call machinery, and the worker processes
that spread a large fleet read over the machine's cores (`deployer.aws.reports`).

A GET through botocore costs ~0.8 ms of CPU per object, presigned or not (endpoint rules,
parameter validation and serialization, event hooks, response parsing): 8 s for 10,000 status
reports, more than S3's own latency. Here it is ~0.3 ms on one thread (0.6× the same GET signed
by botocore's `S3SigV4Auth` and sent through urllib3, measured side by side); http.client's
header parsing (~50 µs) is the largest part left in Python, the rest the socket's own work:

- where the bucket is comes from the client itself, once (`BucketAddress.of`: one presign, no
  request), so the endpoint (`AWS_ENDPOINT_URL`, the emulator), the addressing style and the
  region are the client's;
- each GET carries the SigV4 signature a GetObject call carries (`GetSigner`, held equal to
  botocore's `S3SigV4Auth` by a test) with the client's credentials, frozen for one read: the
  same s3:GetObject by the same principal, so IAM sees nothing new;
- it goes over a bounded pool of keep-alive http.client connections (TLS verified against the
  S3 client's own CA bundle; through urllib3 when the environment names a proxy), and only what a
  small-object read needs is checked: the status, the ETag and a body as long as announced.
  Errors are S3's: 404 is "no such object", 429 and 5xx (503 SlowDown) are transient and left
  to the caller's retry policy, anything else is an `AwsError` naming the object.

A worker (`serve`) is a spawned interpreter that imports only this module's needs (no boto3):
it receives batches of keys, GETs them `concurrency` at a time at most `rate` per second, parses
each with `parse_report`, and sends back what it found; the parent logs and merges.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import logging
import os
import pickle
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import urllib3
from botocore.credentials import ReadOnlyCredentials
from botocore.httpsession import get_cert_path
from botocore.utils import get_environ_proxies, percent_encode

from deployer.aws.retry import RetryPolicy
from deployer.protocol.errors import AwsError, IncompleteAnswer, InvalidReport, TransientFetchError
from deployer.protocol.layout import ReportKey
from deployer.protocol.report import MAX_REPORT_BYTES, StatusReport, parse_report

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: A presigned GET is used at once; a short life limits what a leaked URL could read.
PROBE_TTL_SECONDS = 60
#: S3 keys travel percent-encoded in the path, as botocore encodes them.
KEY_SAFE = "/~"


@dataclass(frozen=True)
class BucketAddress:
    """Where a bucket's objects are and how a GET of one is signed: picklable, for a worker."""

    bucket: str
    origin: str  # scheme://host[:port]
    path: str  # "/" (virtual-hosted) or "/<bucket>/" (path-style), before the encoded key
    region: str
    credentials: ReadOnlyCredentials
    #: What the client verifies TLS against: its CA bundle's path (`AWS_CA_BUNDLE`, a profile's
    #: `ca_bundle`, `REQUESTS_CA_BUNDLE`), True for botocore's own bundle, False if it does not.
    verify: bool | str = True

    @classmethod
    def of(cls, s3: S3Client, bucket: str, key: str) -> BucketAddress:
        """The client's own answer, learned from one presigned URL of `key` (no request is made).

        The presign goes through the client's hooks like any GetObject, so whatever watches the
        client's calls (the test suite's IAM recorder) sees one s3:GetObject per read.
        """
        url = s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PROBE_TTL_SECONDS
        )
        parts = urllib.parse.urlsplit(url)
        encoded = percent_encode(key, safe=KEY_SAFE)
        if not parts.path.endswith(encoded):
            raise AwsError(f"cannot address s3://{bucket}/{key}: the client's URL {parts.path!r} does not end with it")
        signer: Any = s3._request_signer  # type: ignore[attr-defined]  # the client's credentials live only here
        credentials = signer._credentials
        endpoint: Any = s3._endpoint  # type: ignore[attr-defined]  # and its CA bundle only here
        if credentials is None:
            raise AwsError("no AWS credentials found (environment, profile or instance role)")
        return cls(
            bucket=bucket,
            origin=f"{parts.scheme}://{parts.netloc}",
            path=parts.path[: -len(encoded)],
            region=s3.meta.region_name,
            # Frozen once per read: a refreshable credential is at least 10 minutes from expiry
            # when botocore hands it out, and a read lasts seconds.
            credentials=credentials.get_frozen_credentials(),
            # An operator behind a TLS-inspecting proxy names its CA for botocore; these GETs
            # trust what botocore's do, or every one of them fails verification.
            verify=endpoint.http_session._verify,
        )


class Pacer:
    """At most `rate` starts per second, spread evenly (thread-safe): S3 answers 503 SlowDown past
    its per-prefix rate, and every SlowDown costs a backoff."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


#: SigV4's names: https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html
SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
#: The body of a GET is empty, and S3 wants its SHA-256 in x-amz-content-sha256.
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()
DEFAULT_PORTS = {"http": 80, "https": 443}


class GetSigner:
    """SigV4 headers for a GET of one bucket's object, as botocore's `S3SigV4Auth` signs a
    GetObject: the same canonical request (the path as sent, S3 does not normalise it; host,
    range, x-amz-content-sha256, x-amz-date and x-amz-security-token signed), so the same
    signature for the same instant (`tests/unit/test_rawget.py` holds them equal).

    What it saves is botocore's general machinery per request (an `AWSRequest`, header maps, URL
    splitting, the four HMACs of the signing key): ~0.3 ms of a report's ~1 ms of CPU. The
    signing key depends only on the day, the region and the secret, so it is derived once a UTC
    day (thread-safe: the pair is replaced whole).
    """

    def __init__(self, where: BucketAddress) -> None:
        parts = urllib.parse.urlsplit(where.origin)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        if parts.port is not None and parts.port != DEFAULT_PORTS.get(parts.scheme):
            host = f"{host}:{parts.port}"
        self.host = host
        self.credentials = where.credentials
        self.scope = f"{where.region}/s3/aws4_request"
        self._key: tuple[str, bytes] = ("", b"")

    def _signing_key(self, day: str) -> bytes:
        cached_day, key = self._key
        if cached_day != day:
            key = f"AWS4{self.credentials.secret_key}".encode()
            for part in (day, *self.scope.split("/")):
                key = hmac.digest(key, part.encode(), "sha256")
            self._key = (day, key)
        return key

    def headers(self, path: str, byte_range: str | None = None, now: datetime | None = None) -> dict[str, str]:
        """The headers of a signed GET of `path` (percent-encoded, as sent), at `now` (UTC)."""
        stamp = (now or datetime.now(UTC)).strftime(SIGV4_TIMESTAMP)
        headers = {"host": self.host}
        if byte_range is not None:
            headers["range"] = byte_range
        headers["x-amz-content-sha256"] = EMPTY_BODY_SHA256
        headers["x-amz-date"] = stamp
        if self.credentials.token:
            headers["x-amz-security-token"] = self.credentials.token
        names = ";".join(headers)  # already in canonical (sorted) order
        canonical = "\n".join(
            ("GET", path, "", *(f"{name}:{value}" for name, value in headers.items()), "", names, EMPTY_BODY_SHA256)
        )
        day = stamp[:8]
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        to_sign = f"{SIGV4_ALGORITHM}\n{stamp}\n{day}/{self.scope}\n{digest}"
        signature = hmac.new(self._signing_key(day), to_sign.encode(), "sha256").hexdigest()
        headers["authorization"] = (
            f"{SIGV4_ALGORITHM} Credential={self.credentials.access_key}/{day}/{self.scope}, "
            f"SignedHeaders={names}, Signature={signature}"
        )
        del headers["host"]  # the connection sends its own, the same
        return headers


class _Direct:
    """Keep-alive connections to one origin over http.client, at most `size` at once.

    urllib3's pool, request and response layers were ~30 % of a report GET's CPU (~0.83 → ~0.59
    ms per GET measured side by side); what they did for a small-object GET is here: a bounded
    pool (S3 sees exactly the concurrency asked for), separate connect and read timeouts, TLS
    verified against the S3 client's CA bundle, and a pooled connection the server closed meanwhile
    dropped before it is reused. A proxy from the environment goes through urllib3 (`_Proxied`).
    """

    def __init__(self, origin: str, size: int, timeout: tuple[float, float], verify: bool | str) -> None:
        parts = urllib.parse.urlsplit(origin)
        self.host, self.port = parts.hostname or "", parts.port
        self.context = _tls_context(verify) if parts.scheme == "https" else None
        self.timeout = timeout
        self.slots = threading.BoundedSemaphore(size)
        self.idle: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()
        # Idle connections are closed with the pool: a reader dropped without a word leaks no socket.
        weakref.finalize(self, _close_all, self.idle)

    def _connection(self) -> http.client.HTTPConnection:
        while True:
            with self.lock:
                if not self.idle:
                    break
                connection = self.idle.pop()
            if connection.sock is not None and not _readable(connection.sock):
                return connection
            connection.close()  # the server closed it (or sent something unasked): never reuse it
        connect, read = self.timeout
        if self.context is not None:
            connection = http.client.HTTPSConnection(self.host, self.port, timeout=connect, context=self.context)
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=connect)
        connection.connect()
        assert connection.sock is not None
        connection.sock.settimeout(read)
        return connection

    def get(self, path: str, headers: dict[str, str]) -> tuple[int, Callable[[str], str | None], bytes]:
        """(status, header getter, body); OSError or HTTPException if the network failed it."""
        with self.slots:
            connection = self._connection()
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                body = response.read()  # IncompleteRead if cut short of its Content-Length or last chunk
            except BaseException:
                connection.close()
                raise
            if response.will_close:
                connection.close()
            else:
                with self.lock:
                    self.idle.append(connection)
        return response.status, response.getheader, body


def _close_all(connections: list[http.client.HTTPConnection]) -> None:
    for connection in connections:
        connection.close()


def _readable(sock: socket.socket) -> bool:
    """Whether an idle connection has something to read: an EOF or a reset, since nothing was asked."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """TLS as the S3 client has it: verified against its CA bundle (a file or a directory, as
    botocore takes either; botocore's own when it names none), or not if the client does not verify."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    bundle = verify if isinstance(verify, str) else get_cert_path(True)
    if bundle is not None and os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


class _Proxied:
    """The same through the environment's proxy (urllib3's proxy support, CONNECT for https)."""

    def __init__(self, origin: str, proxy: str, size: int, timeout: tuple[float, float], verify: bool | str) -> None:
        options: dict[str, Any] = {
            "maxsize": size,
            # Never more connections than reads in flight: S3 sees exactly the concurrency asked for.
            "block": True,
            "retries": False,  # the caller's RetryPolicy is the only retry layer
            "timeout": urllib3.Timeout(connect=timeout[0], read=timeout[1]),
        }
        if origin.startswith("https:"):
            options["ssl_context"] = _tls_context(verify)
        self.origin = origin
        self.manager = urllib3.proxy_from_url(proxy, **options)

    def get(self, path: str, headers: dict[str, str]) -> tuple[int, Callable[[str], str | None], bytes]:
        """As `_Direct.get`; urllib3's errors are HTTPException's kin for the caller.

        The manager, not one of its pools, is asked, with the absolute URL: it sends a plain-http
        request to the proxy in absolute form (what a forward proxy needs), and tunnels https
        through CONNECT. A pool asked directly sent `GET /bucket/key` to the proxy itself."""
        try:
            response = self.manager.urlopen("GET", self.origin + path, headers=headers, retries=False, redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            raise http.client.HTTPException(f"{type(exc).__name__}: {exc}") from exc
        return response.status, response.headers.get, response.data


class SignedGetter:
    """GETs of one bucket's small objects, signed here and sent over at most `connections`
    keep-alive connections."""

    def __init__(self, where: BucketAddress, connections: int, timeout: tuple[float, float]) -> None:
        self.where = where
        self.signer = GetSigner(where)
        proxy = get_environ_proxies(where.origin).get(where.origin.partition(":")[0])
        self.transport: _Direct | _Proxied = (
            _Proxied(where.origin, proxy, connections, timeout, where.verify)
            if proxy
            else _Direct(where.origin, connections, timeout, where.verify)
        )

    def get(self, key: str, limit: int | None = None) -> tuple[bytes, str, int] | None:
        """One attempt: (body, etag, whole size) of `key`, or None if it does not exist.

        With `limit`, at most `limit` + 1 bytes are asked for (a `Range`), so an object the
        reader would refuse anyway costs no memory; the size comes from `Content-Range`.
        """
        where = self.where
        path = where.path + percent_encode(key, safe=KEY_SAFE)
        signed = self.signer.headers(path, f"bytes=0-{limit}" if limit is not None else None)
        try:
            status, header, body = self.transport.get(path, signed)
        except (OSError, http.client.HTTPException) as exc:
            # A reset, a refused or timed-out connect, an answer cut short (a body short of its
            # Content-Length, a chunk cut): the network's doing, retried like botocore's ConnectionError.
            raise TransientFetchError(f"GET s3://{where.bucket}/{key}: {type(exc).__name__}: {exc}") from exc
        if status == 404:
            return None
        if status == 429 or status >= 500:
            raise TransientFetchError(f"S3 answered HTTP {status} for s3://{where.bucket}/{key}")
        if status == 416:  # a Range on an empty object
            return b"", header("etag") or "", 0
        if status not in (200, 206):
            raise AwsError(
                f"cannot read s3://{where.bucket}/{key}: HTTP {status}",
                code=_error_code(body) or str(status),
                status=status,
            )
        declared = header("content-length") or ""
        if declared.isdigit() and int(declared) != len(body):
            raise IncompleteAnswer(
                f"s3://{where.bucket}/{key}: {len(body)} of {declared} bytes: the connection was cut"
            )
        etag = header("etag")
        if not etag:
            raise IncompleteAnswer(f"s3://{where.bucket}/{key}: an answer without an ETag: the connection was cut")
        total = (header("content-range") or "").rpartition("/")[2]
        return body, etag, int(total) if total.isdigit() else len(body)


def _error_code(body: bytes) -> str:
    """S3's error code from its XML error body (`<Code>AccessDenied</Code>`), "" if none."""
    start = body.find(b"<Code>")
    end = body.find(b"</Code>", start)
    return body[start + 6 : end].decode(errors="replace") if 0 <= start < end else ""


#: What a read of one report found: (s3 key, etag, report, why the report is None).
Found = tuple[str, str, StatusReport | None, str | None]


def read_report(getter: SignedGetter, policy: RetryPolicy, who: ReportKey, s3_key: str, size: int) -> Found | None:
    """One report, never more than its limit downloaded: the listing's size is checked before the
    GET, and the GET asks for one byte past the limit in case the object grew since. None if it was
    deleted between LIST and GET (gc, or an agent deregistering). Transient failures are retried
    under `policy`; anything else raises."""
    if size > MAX_REPORT_BYTES:
        return s3_key, "", None, f"report is {size} bytes, over the {MAX_REPORT_BYTES}-byte limit"
    found = policy.call(getter.get, s3_key, MAX_REPORT_BYTES)
    if found is None:
        return None
    body, etag, whole = found
    try:
        if whole > MAX_REPORT_BYTES:
            raise InvalidReport(f"report is {whole} bytes, over the {MAX_REPORT_BYTES}-byte limit")
        return s3_key, etag, parse_report(body, who), None
    except InvalidReport as exc:
        return s3_key, etag, None, str(exc)


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs: where to read, how hard, and the retry policy (without its
    interrupt: an Event does not cross processes, and a worker stops when its parent does)."""

    where: BucketAddress
    concurrency: int
    rate: float
    timeout: tuple[float, float]
    policy: RetryPolicy
    log_level: str

    @classmethod
    def of(
        cls, where: BucketAddress, concurrency: int, rate: float, timeout: tuple[float, float], policy: RetryPolicy
    ) -> WorkerJob:
        return cls(where, concurrency, rate, timeout, replace(policy, interrupt=None), _log_level())


#: One item a worker is asked to read: (who, s3 key, size listed).
Item = tuple[ReportKey, str, int]
#: Results go back in batches of up to this many (one pickle per batch, not per report).
SEND_BATCH = 100
#: ... and a partial batch after this long without a new result, so the parent is never kept waiting.
SEND_IDLE_SECONDS = 0.02


def serve(tasks: BinaryIO, results: BinaryIO) -> None:
    """A worker process (`python -m deployer.aws.rawget`): its job, then batches of items, then
    None, pickled on `tasks` (stdin) by the parent, which alone reads its `results` (stdout).

    Answers: ("found", [Found | None, ...]) as reads finish, then ("done", CPU seconds used); a
    read that failed beyond retrying is ("error", message, code, status), and the worker stops.
    SIGINT is the parent's to handle (Ctrl-C reaches the whole process group); a worker whose
    parent went away finds its stdin closed and ends.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from deployer import logs

    # Pickles cross only between this process and the parent that started it, over its pipes.
    job: WorkerJob = pickle.load(tasks)  # noqa: S301
    logs.configure(level=job.log_level)  # a retry's warning goes to stderr, like the parent's
    getter = SignedGetter(job.where, job.concurrency, job.timeout)
    pacer = Pacer(job.rate)
    done: SimpleQueue[Found | BaseException | None] = SimpleQueue()

    def one(item: Item) -> None:
        pacer.wait()
        try:
            done.put(read_report(getter, job.policy, *item))
        except Exception as exc:  # noqa: BLE001 - whatever ends a read is the parent's to raise
            done.put(exc)

    sender = threading.Thread(target=_send, args=(done, results), name="report-send", daemon=True)
    sender.start()
    with ThreadPoolExecutor(job.concurrency, thread_name_prefix="report-read") as pool:
        try:
            while (batch := pickle.load(tasks)) is not None:  # noqa: S301 - from the parent
                for item in batch:
                    pool.submit(one, item)
        except EOFError:  # the parent went away: nobody wants the answers
            os._exit(0)
    done.put(_END)
    sender.join()
    _put(results, ("done", time.process_time()))


class _End(Exception):
    """The end of a worker's results: every read of its pool finished."""


_END = _End()


def _put(stream: BinaryIO, message: object) -> None:
    pickle.dump(message, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


def _send(done: SimpleQueue[Found | BaseException | None], results: BinaryIO) -> None:
    batch: list[Found | None] = []
    while True:
        try:
            item = done.get(timeout=SEND_IDLE_SECONDS) if batch else done.get()
        except Empty:
            _put(results, ("found", batch))
            batch = []
            continue
        if isinstance(item, _End):
            break
        if isinstance(item, BaseException):
            _put(results, ("found", batch))
            code, status = (item.code, item.status) if isinstance(item, AwsError) else ("", 0)
            message = str(item) if isinstance(item, AwsError) else f"{type(item).__name__}: {item}"
            _put(results, ("error", message, code, status))
            os._exit(1)  # the read failed: the parent raises it and wants nothing more
        batch.append(item)
        if len(batch) >= SEND_BATCH:
            _put(results, ("found", batch))
            batch = []
    if batch:
        _put(results, ("found", batch))


class Worker:
    """The parent's end of one worker process: hand it items, receive what it found (`answers`,
    fed by a thread that unpickles its stdout)."""

    def __init__(self, job: WorkerJob, answers: SimpleQueue[tuple[Any, ...]]) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.tasks = cast("BinaryIO", self.process.stdin)
        self.results = cast("BinaryIO", self.process.stdout)
        self.answers = answers
        self.receiver = threading.Thread(target=self._receive, name="report-receive", daemon=True)
        self.receiver.start()
        _put(self.tasks, job)

    def send(self, items: list[Item] | None) -> None:
        _put(self.tasks, items)

    def _receive(self) -> None:
        try:
            while True:
                message = pickle.load(self.results)  # noqa: S301 - from the worker this process started
                self.answers.put(message)
                if message[0] != "found":
                    return
        except (EOFError, pickle.UnpicklingError, OSError) as exc:
            self.answers.put(("error", f"a report reader process ended early: {type(exc).__name__}", "", 0))

    def close(self) -> None:
        """End the worker: it exits by itself once done (or at EOF on its stdin); one that does not
        within a second (a read that failed mid-way) is killed."""
        with contextlib.suppress(OSError):  # a worker that died has closed its end already
            self.tasks.close()
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.results.close()


def _log_level() -> str:
    """The parent's log level, for its workers."""
    import structlog

    try:
        level = structlog.get_logger().bind().get_effective_level()
    except AttributeError:  # structlog's default logger, not configured by `deployer.logs`
        level = logging.INFO
    return str(logging.getLevelName(level)).lower()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
