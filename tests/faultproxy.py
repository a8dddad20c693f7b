"""A TCP proxy on 127.0.0.1 that injures chosen connections: reset, stall, truncate or hold.

Each connection carries one HTTP request (moto answers `Connection: close`), so a rule that
looks at the request head decides the fate of exactly one AWS call.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 65536


class Fault(enum.Enum):
    PASS = "pass"
    RESET = "reset"  # RST before the request reaches the server
    STALL = "stall"  # forward only after a delay
    TRUNCATE = "truncate"  # the server handles the request, the client gets half the body (or nothing), then RST
    HOLD = "hold"  # forward only once `release()` is called


Rule = Callable[[bytes], Fault]


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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

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
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            response = _read_all(upstream)
            if fault is Fault.TRUNCATE:
                # Cut inside the body, so the client sees a short read against Content-Length (an
                # empty body is simply never sent). Either way the server already did the work.
                body_at = response.find(b"\r\n\r\n") + 4
                if len(response) > body_at:
                    client.sendall(response[: body_at + (len(response) - body_at) // 2])
                _reset(client)
                return
            client.sendall(response)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(CHUNK)
        if not chunk:
            break
        data += chunk
    return data


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(CHUNK):
            sink.sendall(chunk)
    except OSError:
        pass


def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0 makes close() send RST: the client sees "connection reset by peer". shutdown()
    # first, because a pump thread blocked in recv() would otherwise keep the socket open.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)  # wakes the recv without sending FIN
    sock.close()


def aws_operation(head: bytes) -> str:
    """The SQS/SNS JSON-protocol target (X-Amz-Target) or the HTTP method + path, for rules."""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-amz-target:"):
            return line.split(b":", 1)[1].strip().decode()
    return head.split(b"\r\n", 1)[0].decode(errors="replace")
