"""moto answers the Auto Scaling API but does not implement CompleteLifecycleAction (HTTP 500),
and puts every instance straight InService. This loopback proxy forwards everything to moto
and answers CompleteLifecycleAction itself, the way AWS does, using moto's state: the hook must
exist on the group, the instance must be in the group, and each instance's launch action can be
completed once (then AWS answers "No active Lifecycle Action found").
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3

XMLNS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"


@dataclass
class LifecycleFake:
    upstream: str
    completed: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    def handle(self, params: dict[str, str]) -> tuple[int, str]:
        moto = boto3.client("autoscaling", endpoint_url=self.upstream)
        group, hook, instance = params["AutoScalingGroupName"], params["LifecycleHookName"], params["InstanceId"]
        hooks = moto.describe_lifecycle_hooks(AutoScalingGroupName=group, LifecycleHookNames=[hook])["LifecycleHooks"]
        members = moto.describe_auto_scaling_instances(InstanceIds=[instance])["AutoScalingInstances"]
        pending = [m for m in members if m["AutoScalingGroupName"] == group]
        if not hooks or not pending or any(c["InstanceId"] == instance for c in self.completed):
            return 400, _error(f"No active Lifecycle Action found with instance ID {instance}")
        if params.get("LifecycleActionResult") not in ("CONTINUE", "ABANDON"):
            return 400, _error("LifecycleActionResult must be CONTINUE or ABANDON")
        self.completed.append(params)
        return 200, (
            f'<CompleteLifecycleActionResponse xmlns="{XMLNS}"><CompleteLifecycleActionResult/>'
            "<ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></CompleteLifecycleActionResponse>"
        )


def _error(message: str) -> str:
    return (
        f'<ErrorResponse xmlns="{XMLNS}"><Error><Type>Sender</Type><Code>ValidationError</Code>'
        f"<Message>{message}</Message></Error><RequestId>fake</RequestId></ErrorResponse>"
    )


class _Forwarder(BaseHTTPRequestHandler):
    """Answers CompleteLifecycleAction from `fake`; forwards every other request to moto unchanged."""

    fake: LifecycleFake

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        params = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
        if params.get("Action") == "CompleteLifecycleAction":
            status, text = self.fake.handle(params)
            self._reply(status, text.encode(), "text/xml")
            return
        self._forward(body)

    def do_GET(self) -> None:
        self._forward(None)

    def do_HEAD(self) -> None:
        self._forward(None)

    def do_PUT(self) -> None:
        self._forward(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def do_DELETE(self) -> None:
        self._forward(None)

    def _forward(self, body: bytes | None) -> None:
        """Everything else (S3, SQS, SNS, the rest of Auto Scaling) goes to moto unchanged."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        request = urllib.request.Request(
            self.fake.upstream + self.path, data=body, headers=headers, method=self.command
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                self._reply(response.status, response.read(), dict(response.headers.items()))
        except urllib.error.HTTPError as exc:
            self._reply(exc.code, exc.read(), dict(exc.headers.items()))

    def _reply(self, status: int, data: bytes, headers: dict[str, str] | str) -> None:
        if isinstance(headers, str):
            headers = {"Content-Type": headers}
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def lifecycle_proxy(upstream: str) -> Iterator[LifecycleFake]:
    fake = LifecycleFake(upstream)
    handler = type("Handler", (_Forwarder,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
