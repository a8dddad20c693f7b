"""deployer-config-from-tags: the agent config from instance tags, read through a fake IMDSv2."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deployer.agent.config import load_config
from tests.provision.conftest import SCRIPTS, require_tool, run

TOKEN = "fake-token"
TAGS = {
    "deployer:stage": "prod",
    "deployer:role": "web",
    "deployer:components": "provision api",
    "deployer:bucket": "my-deploys",
    "deployer:topic-arn": "arn:aws:sns:eu-west-1:123456789012:deployer",
}


class _TagsImds(BaseHTTPRequestHandler):
    tags: dict[str, str] = {}

    def do_PUT(self) -> None:
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._reply(200 if ok else 400, TOKEN)

    def do_GET(self) -> None:
        prefix = "/latest/meta-data/tags/instance/"
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            self._reply(401, "")
        elif self.path == "/latest/meta-data/placement/region":
            self._reply(200, "eu-west-1")
        elif self.path.startswith(prefix) and self.path[len(prefix) :] in self.tags:
            self._reply(200, self.tags[self.path[len(prefix) :]])
        else:
            self._reply(404, "")

    def _reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def imds() -> Iterator[type[_TagsImds]]:
    handler = type("Handler", (_TagsImds,), {"tags": dict(TAGS)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def from_tags(imds: type[_TagsImds], out: Path) -> tuple[int, str]:
    require_tool("curl")
    env = {"PATH": "/usr/bin:/bin", "DEPLOYER_IMDS_ENDPOINT": imds.url}  # type: ignore[attr-defined]
    result = run(["bash", str(SCRIPTS / "deployer-config-from-tags"), str(out)], env=env)
    return result.returncode, result.stdout + result.stderr


def test_instance_tags_become_an_agent_config_the_agent_accepts(imds: type[_TagsImds], tmp_path: Path) -> None:
    out = tmp_path / "agent.yml"
    code, output = from_tags(imds, out)
    assert code == 0, output
    config = load_config(out)
    assert (config.stage, config.role, config.components) == ("prod", "web", ("provision", "api"))
    assert config.bucket == "my-deploys"
    assert config.topic_arn == TAGS["deployer:topic-arn"]
    assert config.region == "eu-west-1"
    assert config.metadata_endpoint == imds.url  # type: ignore[attr-defined]


def test_an_unchanged_config_is_left_alone_at_the_next_boot(imds: type[_TagsImds], tmp_path: Path) -> None:
    out = tmp_path / "agent.yml"
    assert from_tags(imds, out)[0] == 0
    written = out.stat().st_mtime_ns
    code, output = from_tags(imds, out)
    assert code == 0
    assert output == ""
    assert out.stat().st_mtime_ns == written


def test_a_missing_tag_stops_boot_with_the_reason_and_writes_nothing(imds: type[_TagsImds], tmp_path: Path) -> None:
    del imds.tags["deployer:role"]
    out = tmp_path / "agent.yml"
    code, output = from_tags(imds, out)
    assert code == 1
    assert "instance tag deployer:role is missing" in output
    assert list(tmp_path.iterdir()) == []


def test_a_tag_that_could_break_the_yaml_is_refused(imds: type[_TagsImds], tmp_path: Path) -> None:
    imds.tags["deployer:stage"] = 'prod"\nroot_dir: /'
    code, output = from_tags(imds, tmp_path / "agent.yml")
    assert code == 1
    assert "characters the config does not allow" in output
