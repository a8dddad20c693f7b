from __future__ import annotations

import urllib.error
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from deployer.aws.retry import RetryPolicy, is_transient
from deployer.backoff import backoff_seconds, pause
from deployer.protocol.errors import AwsError, Interrupted

FAST = RetryPolicy(max_attempts=4, base_seconds=0.001, cap_seconds=0.002, deadline_seconds=5)


def client_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (client_error("SlowDown", 503), True),
        (client_error("ThrottlingException", 400), True),
        (client_error("InternalError", 500), True),
        (client_error("Whatever", 502), True),
        (client_error("TooMany", 429), True),
        (client_error("AccessDenied", 403), False),
        (client_error("NoSuchKey", 404), False),
        (client_error("PreconditionFailed", 412), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (urllib.error.HTTPError("u", 503, "busy", None, None), True),  # type: ignore[arg-type]
        (urllib.error.HTTPError("u", 404, "nope", None, None), False),  # type: ignore[arg-type]
        (ValueError("bug"), False),
    ],
)
def test_only_transient_errors_are_retried(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_a_transient_failure_is_retried_until_it_succeeds() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise client_error("SlowDown", 503)
        return "ok"

    assert FAST.call(flaky) == "ok"
    assert len(calls) == 3


def test_a_permanent_failure_is_raised_at_once_as_our_aws_error_with_code_and_status() -> None:
    calls = []

    def denied() -> None:
        calls.append(1)
        raise client_error("AccessDenied", 403)

    with pytest.raises(AwsError, match="PutObject failed: AccessDenied") as info:
        FAST.call(denied)
    assert (info.value.code, info.value.status) == ("AccessDenied", 403)
    assert len(calls) == 1


def test_retries_stop_after_max_attempts_and_raise_the_last_error() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise ConnectionResetError("reset")

    with pytest.raises(ConnectionResetError):
        FAST.call(down)
    assert len(calls) == 4


def test_an_interrupted_policy_stops_retrying_and_sleeping_at_once() -> None:
    import threading
    import time

    stop = threading.Event()
    slow = RetryPolicy(max_attempts=50, base_seconds=1, cap_seconds=1, deadline_seconds=300).interruptible(stop)
    calls = []

    def down() -> None:
        calls.append(1)
        if len(calls) == 2:
            stop.set()  # SIGTERM arrives while the network is down
        raise ConnectionResetError("reset")

    began = time.monotonic()
    with pytest.raises(Interrupted, match="shutdown"):  # not a verdict: the network failing while we stop
        slow.call(down)
    assert len(calls) == 2
    assert time.monotonic() - began < 3  # one backoff sleep at most, not 49


@pytest.mark.parametrize(
    ("attempt", "jitter", "draw", "expected"),
    [
        (1, 0.0, 0.9, 30.0),  # no jitter: the fixed SQS redelivery schedule 30, 60, 120 …
        (2, 0.0, 0.9, 60.0),
        (3, 0.0, 0.9, 120.0),
        (7, 0.0, 0.9, 900.0),  # capped
        (3, 1.0, 0.25, 90.0),  # full jitter: anywhere in [0, delay]
        (3, 1.0, 0.0, 120.0),
        (3, 0.5, 1.0, 60.0),  # half jitter: [delay/2, delay]
    ],
)
def test_backoff_doubles_from_the_base_up_to_the_cap_minus_its_jitter(
    attempt: int, jitter: float, draw: float, expected: float
) -> None:
    assert backoff_seconds(attempt, base=30, cap=900, jitter=jitter, rng=lambda: draw) == expected


def test_a_pause_ends_with_interrupted_as_soon_as_the_stop_is_set() -> None:
    import threading
    import time

    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    began = time.monotonic()
    with pytest.raises(Interrupted, match="the next health check"):
        pause(30, stop, "the next health check")
    assert time.monotonic() - began < 5
