"""A loopback HTTP proxy in front of moto that answers like AWS where moto does not.

moto enforces no quotas and no rates, and a few calls behave more leniently than AWS. This
proxy forwards every request to moto unchanged unless one of its rules answers it first, with
the error AWS would give, in AWS's wire shape (the query protocol's XML for SNS and Auto
Scaling, the JSON protocol for SQS), so botocore parses exactly what it would in production.

Rules are small objects with `before(call)` (answer instead of moto, or None) and, optionally,
`after(call, answer)` (learn from what moto answered). The limits themselves live in
`tests/limits.py`; `tests/asg_fake.py` is one more rule (CompleteLifecycleAction).

Every call is also counted by service and action, which is how tests and `scripts/bench`
count the requests a command makes.

It also serves as the environment's HTTP proxy (`HTTP_PROXY`) for requests addressed to its
upstream in absolute form (`GET http://127.0.0.1:PORT/key`), counted apart (`as_proxy`), so a
test can read through the code paths a proxy selects; any other origin is refused with 403, so
nothing reaches past this machine.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

#: SigV4's credential scope names the service: `Credential=AKID/20261126/us-east-1/sqs/aws4_request`.
SCOPE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([^/]+)/aws4_request")
#: Responses that must not be relayed as-is (the proxy sets its own length and connection).
HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "server", "date"})
#: Never read an HTTP proxy from the environment: everything here stays on loopback.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Call:
    """One request, decoded enough for rules to judge it."""

    service: str  # from the SigV4 scope: "s3", "sqs", "sns", "sts", "autoscaling"
    action: str  # query Action, SQS X-Amz-Target's operation, or for S3 "GET", "PUT", "LIST", ...
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    #: Query-protocol form fields, or the SQS JSON document (top level).
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


class Rule(Protocol):
    def before(self, call: Call) -> Answer | None: ...


def decode(method: str, path: str, headers: Mapping[str, str], body: bytes) -> Call:
    found = SCOPE.search(headers.get("Authorization", ""))
    service = found.group(1) if found else "s3"
    target = headers.get("X-Amz-Target", "")
    params: Mapping[str, Any] = {}
    # botocore gzips large request bodies (PutMetricData from ~10 KiB); rules read them plain,
    # and the request is still forwarded as sent.
    plain = gzip.decompress(body) if headers.get("Content-Encoding", "").lower() == "gzip" and body else body
    if target:
        action = target.rsplit(".", 1)[-1]
        params = json.loads(plain or b"{}")
    elif service in ("sns", "sts", "autoscaling", "iam", "elasticloadbalancing", "monitoring") and method == "POST":
        params = {k: v[0] for k, v in urllib.parse.parse_qs(plain.decode(), keep_blank_values=True).items()}
        action = str(params.get("Action", ""))
    else:
        query = urllib.parse.urlsplit(path).query
        action = "LIST" if method == "GET" and "list-type=2" in query else method
    return Call(service, action, method, path, headers, body, params)


# -- AWS's error shapes ------------------------------------------------------------------------


def query_error(status: int, code: str, message: str, namespace: str) -> Answer:
    """An error of the query protocol (SNS, Auto Scaling, STS)."""
    xml = (
        f'<ErrorResponse xmlns="{namespace}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>limits-proxy</RequestId></ErrorResponse>"
    )
    return Answer(status, xml.encode(), {"Content-Type": "text/xml"})


def sns_error(status: int, code: str, message: str) -> Answer:
    return query_error(status, code, message, "http://sns.amazonaws.com/doc/2010-03-31/")


def sqs_error(shape: str, message: str, query_code: str | None = None, status: int = 400) -> Answer:
    """An error of SQS's JSON protocol; SQS is query-compatible, so it also names the old code."""
    headers = {
        "Content-Type": "application/x-amz-json-1.0",
        "x-amzn-query-error": f"{query_code or shape};Sender",
    }
    body = json.dumps({"__type": f"com.amazonaws.sqs#{shape}", "message": message}).encode()
    return Answer(status, body, headers)


def s3_error(status: int, code: str, message: str) -> Answer:
    xml = f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>limits-proxy</RequestId></Error>"
    return Answer(status, xml.encode(), {"Content-Type": "application/xml"})


# -- the proxy -----------------------------------------------------------------------------------


@dataclass
class AwsProxy:
    """Forwards to `upstream` (moto) unless a rule answers; counts every call by (service, action)."""

    upstream: str
    rules: Sequence[Rule] = ()
    url: str = ""
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Answers given by rules instead of moto, by (service, action, status).
    refused: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    #: Requests that came addressed to the upstream in absolute form: as the environment's proxy.
    as_proxy: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, call: Call) -> Answer:
        with self._lock:
            self.calls[(call.service, call.action)] += 1
        for rule in self.rules:
            answer = rule.before(call)
            if answer is not None:
                with self._lock:
                    self.refused[(call.service, call.action, answer.status)] += 1
                return answer
        answer = self.forward(call)
        for rule in self.rules:
            after = getattr(rule, "after", None)
            if after is not None:
                after(call, answer)
        return answer

    def forward(self, call: Call) -> Answer:
        headers = {
            k: v
            for k, v in call.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding", "proxy-connection")
        }
        data = call.body if call.method in ("POST", "PUT") else None
        request = urllib.request.Request(self.upstream + call.path, data=data, headers=headers, method=call.method)
        try:
            with DIRECT.open(request, timeout=60) as response:
                return Answer(response.status, response.read(), dict(response.headers.items()))
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, exc.read(), dict(exc.headers.items()))

    def count(self, service: str, *actions: str) -> int:
        with self._lock:
            return sum(n for (s, a), n in self.calls.items() if s == service and (not actions or a in actions))

    def reset_counts(self) -> None:
        with self._lock:
            self.calls.clear()
            self.refused.clear()
            self.as_proxy = 0

    def origin_form(self, target: str) -> str | None:
        """A request target as the upstream expects it (`/key?query`); None for an absolute one
        that names another origin, which a loopback proxy must never forward."""
        if "://" not in target:
            return target
        parts = urllib.parse.urlsplit(target)
        if f"{parts.scheme}://{parts.netloc}" != self.upstream:
            return None
        with self._lock:
            self.as_proxy += 1
        return urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))


class _Handler(BaseHTTPRequestHandler):
    proxy: AwsProxy
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # An answer leaves in two writes, headers then body. With Nagle's algorithm on, the body
        # waits for the headers' ACK, which a keep-alive client delays by up to 40 ms: every GET
        # through this proxy took ~48 ms against moto's ~5.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            length = int(self.headers.get("Content-Length", "0") or 0)
            body = self.rfile.read(length) if length else b""
        path = self.proxy.origin_form(self.path)
        if path is None:
            answer = Answer(403, b"this proxy forwards to its upstream only", {"Content-Type": "text/plain"})
        else:
            answer = self.proxy.handle(decode(self.command, path, dict(self.headers.items()), body))
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            if name.lower() not in HOP_HEADERS:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    def _read_chunked(self) -> bytes:
        parts = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers, up to the blank line
            pass
        return b"".join(parts)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Listening(ThreadingHTTPServer):
    """The proxy's server, with a listen backlog for a fleet read's burst of connects: a large read
    opens hundreds at once (`deployer.aws.reports.LARGE_READ_CONCURRENCY`), and the default
    backlog of 5 left some of them waiting out a 30 s read timeout."""

    request_queue_size = 1024


@contextmanager
def aws_proxy(upstream: str, *rules: Rule) -> Iterator[AwsProxy]:
    """An AwsProxy on 127.0.0.1 for the duration of the block; `.url` is its endpoint."""
    proxy = AwsProxy(upstream, rules)
    handler = type("Handler", (_Handler,), {"proxy": proxy})
    server = _Listening(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="aws-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
