"""Shared fixtures: the moto server (one per session, reset per test), AWS env, a fake IMDS.

Nothing here, nor anything it starts, talks to any address but loopback: an audit hook
fails any in-process connect elsewhere, agents get an explicit endpoint and instance id (or
the fake IMDS below), and AWS_EC2_METADATA_DISABLED keeps botocore off 169.254.169.254.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deployer.aws import Clients, make_clients
from deployer.emulator import Emulator
from deployer.layout import Layout
from deployer.retry import RetryPolicy
from publisher.infra import init_resources

REGION = "us-east-1"
BUCKET = "deployer-test"
TOPIC = "deployer-test"
#: Fast backoff so tests that exercise retries do not sleep for seconds.
FAST_POLICY = RetryPolicy(max_attempts=5, base_seconds=0.01, cap_seconds=0.05, deadline_seconds=10)


def _loopback_only(event: str, args: tuple[object, ...]) -> None:
    if event != "socket.connect":
        return
    address = args[1]
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        host = address[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = host == "localhost"
        if not ok:
            raise ConnectionRefusedError(f"tests may only connect to loopback, not {host}")


sys.addaudithook(_loopback_only)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with Emulator(log_path=log_path) as server:
        yield server


@pytest.fixture
def aws_env(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """A clean emulator and an environment pointing every boto3 client (and subprocess) at it."""
    emulator.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", emulator.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "DEPLOYER_BUCKET", "DEPLOYER_TOPIC_ARN", "DEPLOYER_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    return emulator


@dataclass(frozen=True)
class Fleet:
    """An initialised bucket + topic on the emulator."""

    clients: Clients
    bucket: str
    topic_arn: str
    endpoint_url: str
    layout: Layout = Layout("deployer")  # noqa: RUF009 - frozen, so sharing the default is safe


@pytest.fixture
def fleet(aws_env: Emulator) -> Fleet:
    clients = make_clients(REGION, aws_env.url)
    result = init_resources(clients, BUCKET, TOPIC)
    return Fleet(clients=clients, bucket=BUCKET, topic_arn=result.topic_arn, endpoint_url=aws_env.url)


class _ImdsHandler(BaseHTTPRequestHandler):
    instance_id = "i-0fakeimds000001"
    token = "fake-token"

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._reply(200, self.token)
        else:
            self._reply(400, "bad token request")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self._reply(401, "IMDSv2 token required")
        elif self.path == "/latest/meta-data/instance-id":
            self._reply(200, self.instance_id)
        else:
            self._reply(404, "not found")

    def _reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_imds() -> Iterator[str]:
    """An IMDSv2 lookalike on 127.0.0.1 (token PUT, then instance-id GET with the token)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImdsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root
