from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployer.apply.fetch import read_source
from deployer.protocol.errors import FetchError
from tests.support import FAST_POLICY


class Flaky(BaseHTTPRequestHandler):
    """/flaky fails with 503 twice, then serves; /missing is 404; /big is over the limit."""

    hits: dict[str, int] = {}

    def do_GET(self) -> None:
        Flaky.hits[self.path] = Flaky.hits.get(self.path, 0) + 1
        if self.path == "/flaky" and Flaky.hits[self.path] <= 2:
            self._reply(503, b"busy")
        elif self.path in ("/flaky", "/ok"):
            self._reply(200, b"src: file:///x\n")
        elif self.path == "/big":
            self._reply(200, b"x" * 2048)
        else:
            self._reply(404, b"<html>not found</html>")

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Flaky.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_5xx_manifest_fetch_is_retried_until_it_succeeds(server: str) -> None:
    assert read_source(f"{server}/flaky", None, 1024, FAST_POLICY) == b"src: file:///x\n"  # type: ignore[arg-type]
    assert Flaky.hits["/flaky"] == 3


def test_a_404_is_an_error_at_once_not_an_artifact(server: str) -> None:
    with pytest.raises(FetchError, match="answered HTTP 404"):
        read_source(f"{server}/missing", None, 1024, FAST_POLICY)  # type: ignore[arg-type]
    assert Flaky.hits["/missing"] == 1


def test_a_document_over_the_limit_is_refused(server: str) -> None:
    with pytest.raises(FetchError, match="larger than the 1024-byte limit"):
        read_source(f"{server}/big", None, 1024, FAST_POLICY)  # type: ignore[arg-type]


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(FetchError, match="unsupported source scheme"):
        read_source("gopher://x/y", None, 1024, FAST_POLICY)  # type: ignore[arg-type]
