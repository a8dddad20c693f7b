"""The one retry policy for AWS, S3 and network calls, and the one backoff function.

Exponential backoff with full jitter, capped, retrying only what is transient: throttling,
5xx, connection errors and timeouts. botocore's own retries are switched off in `clients.py`
so that this is the only layer that retries (two layers would multiply attempts).

Whatever botocore raises once the policy gives up leaves as an `AwsError` (with AWS's error
code and HTTP status), so no module above this package needs to know botocore's exceptions.
A retry that was cut short by a shutdown leaves as `Interrupted`: the network failing while
the agent stops is not a verdict on anything.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import structlog
import tenacity
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.parsers import ResponseParserError

from deployer.backoff import backoff_seconds
from deployer.protocol.errors import AwsError, IncompleteAnswer, Interrupted, TransientFetchError

T = TypeVar("T")

log = structlog.get_logger(__name__)

#: AWS error codes that mean "slow down" or "try again", whatever the HTTP status.
TRANSIENT_ERROR_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "KMSThrottlingException",
    }
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call may succeed. Pure: decides from the exception alone."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code", "") in TRANSIENT_ERROR_CODES or status == 429 or status >= 500
    if isinstance(exc, BotoConnectionError | HTTPClientError | ReadTimeoutError | IncompleteReadError):
        return True
    # A body cut short: botocore's parsers choke on it, http.client reports it for chunked bodies.
    if isinstance(exc, ResponseParserError | http.client.IncompleteRead | IncompleteAnswer | TransientFetchError):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    return isinstance(exc, urllib.error.URLError | ConnectionError | TimeoutError | socket.timeout)


def aws_error(exc: BotoCoreError | ClientError) -> AwsError:
    """botocore's exception as ours: AWS's error code, the HTTP status and a one-line message."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return AwsError(
            f"AWS {exc.operation_name} failed: {code}: {error.get('Message', '')}", code=code, status=status
        )
    if isinstance(exc, NoCredentialsError):
        return AwsError("no AWS credentials found (environment, profile or instance role)")
    return AwsError(f"AWS call failed: {exc}")


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff parameters; `call` runs a function under them."""

    max_attempts: int = 8
    base_seconds: float = 0.2
    cap_seconds: float = 10.0
    deadline_seconds: float = 120.0
    #: Set on shutdown: backoff sleeps end at once and no further attempt is made, so SIGTERM
    #: is honoured promptly even while the network is down.
    interrupt: threading.Event | None = field(default=None, compare=False)

    def interruptible(self, event: threading.Event) -> RetryPolicy:
        return replace(self, interrupt=event)

    def call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        stop = tenacity.stop_after_attempt(self.max_attempts) | tenacity.stop_after_delay(self.deadline_seconds)
        sleep: Callable[[float], None] = time.sleep
        event = self.interrupt
        if event is not None:
            stop = stop | tenacity.stop_when_event_set(event)

            def sleep(seconds: float) -> None:
                event.wait(seconds)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=lambda state: backoff_seconds(state.attempt_number, base=self.base_seconds, cap=self.cap_seconds),
            stop=stop,
            sleep=sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except Exception as exc:
            if event is not None and event.is_set() and is_transient(exc):
                raise Interrupted(f"stopped retrying after a shutdown request: {exc}") from exc
            if isinstance(exc, ClientError | BotoCoreError):
                raise aws_error(exc) from exc
            raise


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "transient_error_retrying",
        call=getattr(state.fn, "__qualname__", repr(state.fn)),
        attempt=state.attempt_number,
        sleep_s=round(state.upcoming_sleep, 3),
        error=f"{type(exc).__name__}: {exc}",
        next="the call will be retried after the sleep",
    )


#: The policy every adapter uses unless a caller injects another (tests use a fast one).
DEFAULT_POLICY = RetryPolicy()
