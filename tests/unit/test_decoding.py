"""Every wire document's decoder against random and adversarial input: only the document's own
error, in bounded time, whatever the bytes (deep nesting, huge numbers, NaN, duplicate keys,
invalid UTF-8, BOMs, lone surrogates, megabyte strings, YAML anchors and tags)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployer.agent.config import config_from_dict
from deployer.protocol.decoding import MAX_DEPTH, MAX_KEYS, json_object, yaml_mapping
from deployer.protocol.deploy import parse_deploy, unwrap_body
from deployer.protocol.envelope import parse_envelope
from deployer.protocol.errors import (
    ConfigError,
    DeployerError,
    InvalidMessage,
    InvalidReport,
    InvalidTrust,
    ManifestError,
)
from deployer.protocol.layout import ReportKey
from deployer.protocol.manifest import parse_manifest
from deployer.protocol.report import parse_report
from deployer.protocol.rollout import parse_cursor
from deployer.protocol.trust import parse_trust

#: A hang guard, not a speed measurement: every document here decodes in milliseconds; one that
#: takes seconds on hostile input (a quadratic scan, an alias bomb expanding) is a denial of service.
SECONDS_PER_DOCUMENT = 10.0


def agent_config(raw: bytes) -> object:
    return config_from_dict(yaml_mapping(raw, what="config", error=ConfigError), source="fuzz")


#: decoder → the one error type it may raise.
DECODERS: dict[str, tuple[Callable[[bytes], object], type[DeployerError]]] = {
    "deploy document": (parse_deploy, InvalidMessage),
    "message body": (lambda raw: parse_deploy(unwrap_body(raw.decode("utf-8", "replace"))), InvalidMessage),
    "signed envelope": (parse_envelope, InvalidMessage),
    "status report": (lambda raw: parse_report(raw, ReportKey("prod", "web", "i-1")), InvalidReport),
    "trust document": (parse_trust, InvalidTrust),
    "rollout cursor": (lambda raw: parse_cursor(raw, "0b7c7c55-1d1e-4c39-9a55-5a1c1f2e0001"), InvalidMessage),
    "manifest": (parse_manifest, ManifestError),
    "agent config": (agent_config, ConfigError),
}

HOSTILE: dict[str, bytes] = {
    "deep arrays": b"[" * 100_000 + b"]" * 100_000,
    "deep objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "deep but short": b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
    "deep yaml flow": b"a: " + b"[" * 50_000 + b"]" * 50_000,
    "deep yaml block": b"".join(b"  " * i + b"a:\n" for i in range(3_000)),
    "a huge number": b'{"v": 1' + b"0" * 100_000 + b"}",
    "NaN": b'{"v": NaN}',
    "Infinity": b'{"v": -Infinity}',
    "duplicate keys": b'{"v": 1, "v": 2}',
    "too many keys": ("{" + ",".join(f'"k{i}": {i}' for i in range(MAX_KEYS + 1)) + "}").encode(),
    "invalid UTF-8": b'{"v": "\xff\xfe"}',
    "a BOM": b'\xef\xbb\xbf{"v": 1}',
    "a lone surrogate": b'{"v": "\\ud800"}',
    "a megabyte string": b'{"v": "' + b"x" * (1 << 20) + b'"}',
    "yaml billion laughs": b"a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: [*c, *c]\n",
    "yaml python tag": b"a: !!python/object/apply:os.system ['true']\n",
    "yaml binary tag": b"src: !!binary AAAA\n",
    "empty": b"",
    "null": b"null",
    "a list": b"[1, 2]",
}


def decode(name: str, raw: bytes) -> None:
    """Run a decoder; its own error is fine, anything else fails the test; time is bounded."""
    decoder, error = DECODERS[name]
    started = time.monotonic()
    with contextlib.suppress(error):
        decoder(raw)
    assert time.monotonic() - started < SECONDS_PER_DOCUMENT, f"{name} took {time.monotonic() - started:.1f}s"


@pytest.mark.parametrize("hostile", list(HOSTILE), ids=list(HOSTILE))
@pytest.mark.parametrize("decoder", list(DECODERS), ids=list(DECODERS))
def test_every_decoder_answers_hostile_input_with_its_own_error_and_in_bounded_time(decoder: str, hostile: str) -> None:
    decode(decoder, HOSTILE[hostile])


def nested(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40), nested, max_leaves=40
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(list(DECODERS)), raw=st.binary(max_size=2048))
def test_every_decoder_answers_random_bytes_with_its_own_error(name: str, raw: bytes) -> None:
    decode(name, raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(list(DECODERS)), value=JSON_VALUES)
def test_every_decoder_answers_random_json_with_its_own_error(name: str, value: Any) -> None:
    decode(name, json.dumps(value).encode())


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(min_value=MAX_DEPTH + 1, max_value=5_000), bracket=st.sampled_from(["[", '{"a":']))
def test_nesting_past_the_limit_is_refused_by_name_before_the_parser_recurses(depth: int, bracket: str) -> None:
    closing = "]" if bracket == "[" else "}"
    raw = bracket * depth + ("1" if bracket != "[" else "") + closing * depth
    with pytest.raises(InvalidReport, match=f"nests deeper than {MAX_DEPTH} levels"):
        json_object(raw, what="report", limit=1 << 20, error=InvalidReport)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    doc = json_object(json.dumps({"text": "[" * 1000 + '"\\'}), what="report", limit=1 << 20, error=InvalidReport)
    assert doc["text"].startswith("[[[")


def test_duplicate_keys_nan_and_aliases_are_named_in_the_error() -> None:
    with pytest.raises(InvalidMessage, match="has the key 'seq' twice"):
        json_object('{"seq": 1, "seq": 2}', what="deploy document", limit=4096, error=InvalidMessage)
    with pytest.raises(InvalidMessage, match="has NaN, which is not JSON"):
        json_object('{"seq": NaN}', what="deploy document", limit=4096, error=InvalidMessage)
    with pytest.raises(ManifestError, match=r"aliases \(\*a\) are not accepted"):
        parse_manifest(b"a: &a x\nb: *a\n")
