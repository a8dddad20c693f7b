from __future__ import annotations

import base64
import json

import pytest

from deployer.apply.oneshot import manifest_url_from_stdin, oneshot_release_id
from deployer.protocol.errors import ConfigError

URL = "s3://bucket/deployer/releases/api/r1/manifest.yml"


def consul_events(*urls: str) -> str:
    return json.dumps(
        [{"ID": str(i), "Name": "deploy", "Payload": base64.b64encode(u.encode()).decode()} for i, u in enumerate(urls)]
    )


def test_a_plain_line_is_the_manifest_url() -> None:
    assert manifest_url_from_stdin(URL + "\n") == URL


def test_a_consul_event_array_uses_the_last_events_payload() -> None:
    assert manifest_url_from_stdin(consul_events("s3://old/manifest.yml", URL)) == URL


def test_an_empty_consul_event_array_means_nothing_to_do() -> None:
    assert manifest_url_from_stdin("[]") is None


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [
        ("", "no manifest URL on stdin"),
        ("[not json", "not JSON"),
        ('[{"ID": "1"}]', "no base64 Payload"),
        ('[{"Payload": "***"}]', "not base64 text"),
    ],
)
def test_bad_stdin_is_a_clear_error(stdin: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        manifest_url_from_stdin(stdin)


def test_a_one_shot_apply_names_its_release_after_the_artifact() -> None:
    assert oneshot_release_id("ab" * 32) == "sha-abababababababab"
    assert oneshot_release_id(None) == "commands-only"
