"""A TCP proxy on 127.0.0.1 that injures chosen connections the way real networks, NATs and load
balancers do: a reset (RST) or a clean close (FIN) before the answer, in the middle of its
headers, in the middle of its body, or in the middle of a chunk; a stall; a hold.

Each connection carries one HTTP request (moto answers `Connection: close`), so a rule that
looks at the request head decides the fate of exactly one AWS call. Every cut after the
request reached the server is the nasty kind: the server did the work, the client does not
know it.
"""

from __future__ import annotations

import contextlib
import enum
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CHUNK = 65536


class Fault(enum.Enum):
    PASS = "pass"
    RESET = "reset"  # RST before the request reaches the server
    STALL = "stall"  # forward only after a delay
    HOLD = "hold"  # forward only once `release()` is called
    RST_BEFORE_HEADERS = "rst_before_headers"  # the server did the work; the client gets an RST, nothing else
    FIN_BEFORE_HEADERS = "fin_before_headers"  # … a clean close, nothing else
    RST_MID_HEADERS = "rst_mid_headers"  # half the status line and headers, then RST
    FIN_MID_HEADERS = "fin_mid_headers"  # half the status line and headers, then a clean close
    RST_MID_BODY = "rst_mid_body"  # headers and half the body (if any), then RST
    FIN_MID_BODY = "fin_mid_body"  # headers and half the body (if any), then a clean close
    FIN_MID_CHUNK = "fin_mid_chunk"  # re-sent chunked, closed cleanly inside the last chunk


#: Every way an answer can be cut after the server handled the request.
CUTS = (
    Fault.RST_BEFORE_HEADERS,
    Fault.FIN_BEFORE_HEADERS,
    Fault.RST_MID_HEADERS,
    Fault.FIN_MID_HEADERS,
    Fault.RST_MID_BODY,
    Fault.FIN_MID_BODY,
    Fault.FIN_MID_CHUNK,
)

Rule = Callable[[bytes], Fault]


def random_faults(rate: float, seed: int, kinds: Sequence[Fault] = (Fault.RESET, *CUTS)) -> Rule:
    """A rule that injures `rate` of all connections, each with one of `kinds`, reproducibly."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def rule(_head: bytes) -> Fault:
        with lock:
            return rng.choice(kinds) if rng.random() < rate else Fault.PASS

    return rule


@dataclass
class FaultProxy:
    upstream: tuple[str, int]
    rule: Rule = lambda _head: Fault.PASS
    stall_seconds: float = 1.0
    counts: dict[Fault, int] = field(default_factory=lambda: dict.fromkeys(Fault, 0))
    held: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._closing = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)

    @classmethod
    def to(cls, url: str, rule: Rule = lambda _head: Fault.PASS, stall_seconds: float = 1.0) -> FaultProxy:
        """A started proxy in front of `http://host:port`."""
        host, port = url.removeprefix("http://").split(":")
        return cls((host, int(port)), rule=rule, stall_seconds=stall_seconds).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    @property
    def injured(self) -> int:
        return sum(n for fault, n in self.counts.items() if fault is not Fault.PASS)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._closing.set()
        self._release.set()
        self._thread.join(5)
        self._server.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            head = _read_head(client)
            fault = self.rule(head)
            with self._lock:
                self.counts[fault] += 1
            if fault is Fault.RESET:
                _reset(client)
                return
            if fault is Fault.STALL:
                time.sleep(self.stall_seconds)
            if fault is Fault.HOLD:
                with self._lock:
                    self.held.append(head)
                self._release.wait()
            upstream = socket.create_connection(self.upstream, timeout=60)
            upstream.sendall(head)
            pump = threading.Thread(target=_pump, args=(client, upstream), daemon=True)
            pump.start()
            response = _read_response(upstream, head.startswith(b"HEAD "))
            if fault in CUTS:
                _cut(client, response, fault, pump)
                return
            client.sendall(response)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()


def _cut(client: socket.socket, response: bytes, fault: Fault, pump: threading.Thread) -> None:
    header_end = response.find(b"\r\n\r\n") + 4
    if fault in (Fault.RST_BEFORE_HEADERS, Fault.FIN_BEFORE_HEADERS):
        sent = b""
    elif fault in (Fault.RST_MID_HEADERS, Fault.FIN_MID_HEADERS):
        sent = response[: header_end // 2]
    elif fault is Fault.FIN_MID_CHUNK:
        sent = _chunked_cut(response, header_end)
    else:
        # Inside the body when there is one (an empty body is simply never sent).
        sent = response[: header_end + (len(response) - header_end) // 2]
    client.sendall(sent)
    if fault.name.startswith("RST"):
        _reset(client)
        return
    # A clean close: FIN, then wait for the client to hang up, so that unread request bytes in
    # our receive buffer do not turn the close into a reset after all.
    with contextlib.suppress(OSError):
        client.shutdown(socket.SHUT_WR)
    pump.join(10)


def _chunked_cut(response: bytes, header_end: int) -> bytes:
    """The response re-sent with `Transfer-Encoding: chunked`, cut inside its last chunk."""
    head = [
        line
        for line in response[: header_end - 4].split(b"\r\n")
        if not line.lower().startswith((b"content-length:", b"transfer-encoding:"))
    ]
    body = response[header_end:]
    first, second = body[: len(body) // 2], body[len(body) // 2 :]
    chunked = b"\r\n".join([*head, b"Transfer-Encoding: chunked"]) + b"\r\n\r\n"
    if first:
        chunked += b"%x\r\n%s\r\n" % (len(first), first)
    # Announce the whole second chunk, send half of it.
    return chunked + b"%x\r\n%s" % (max(len(second), 2), second[: len(second) // 2])


def _through_headers(sock: socket.socket) -> bytes:
    """What the peer sent up to the blank line after its headers (and any bytes after it); less
    if it closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(CHUNK)
        if not chunk:
            break
        data += chunk
    return data


def _fields(head: bytes) -> dict[bytes, bytes]:
    """A message head's header fields, names lowercased and values stripped."""
    lines = (line.partition(b":") for line in head.split(b"\r\n")[1:])
    return {name.strip().lower(): value.strip() for name, colon, value in lines if colon}


def _body(sock: socket.socket, already: bytes, length: int | None) -> bytes:
    """`already`, then what the peer sends until the body holds `length` bytes (None: until it closes)."""
    parts, have = [already], len(already)
    while length is None or have < length:
        chunk = sock.recv(CHUNK)
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _read_head(sock: socket.socket) -> bytes:
    """The request's headers and, when it announces its length, its whole body (rules see the Action)."""
    data = _through_headers(sock)
    if b"\r\n\r\n" not in data:
        return data
    headers, _, body = data.partition(b"\r\n\r\n")
    lines = headers.split(b"\r\n")
    if any(line.lower().replace(b" ", b"") == b"expect:100-continue" for line in lines):
        # Answer the interim response ourselves, as a server would: botocore sends an S3 PUT's
        # body only after "100 Continue" (or a 1 s timeout), and we need the body for the rule.
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = b"\r\n".join(line for line in lines if not line.lower().startswith(b"expect:"))
    return headers + b"\r\n\r\n" + _body(sock, body, int(_fields(headers).get(b"content-length", b"0")))


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(CHUNK):
            sink.sendall(chunk)
    except OSError:
        pass


def _read_response(sock: socket.socket, head_request: bool) -> bytes:
    """The whole answer: up to its Content-Length when it states one, else up to the server's
    close. Waiting for moto's close after an answer already whole cost ~9 ms per request."""
    data = _through_headers(sock)
    if b"\r\n\r\n" not in data:
        return data
    head, _, body = data.partition(b"\r\n\r\n")
    status = [*head.split(b" ", 2), b""][1]
    fields = _fields(head)
    length: int | None
    if head_request or status in (b"204", b"304"):
        length = 0
    elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        length = None
    else:
        stated = fields.get(b"content-length", b"")
        length = int(stated) if stated.isdigit() else None
    return head + b"\r\n\r\n" + _body(sock, body, length)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0 makes close() send RST: the client sees "connection reset by peer". shutdown()
    # first, because a pump thread blocked in recv() would otherwise keep the socket open.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # wakes the recv without sending FIN
    sock.close()


def aws_operation(head: bytes) -> str:
    """The SQS/SNS JSON-protocol target (X-Amz-Target), the query protocol's Action, or the HTTP
    method + path, for rules."""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-amz-target:"):
            return line.split(b":", 1)[1].strip().decode()
    body = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""
    for pair in body.split(b"&"):
        if pair.startswith(b"Action="):
            return pair.split(b"=", 1)[1].decode()
    return head.split(b"\r\n", 1)[0].decode(errors="replace")
