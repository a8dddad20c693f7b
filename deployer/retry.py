"""The one retry policy for AWS, S3 and network calls.

Exponential backoff with full jitter, capped, retrying only what is transient: throttling,
5xx, connection errors and timeouts. botocore's own retries are switched off in `aws.py` so
that this is the only layer that retries (two layers would multiply attempts).
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import structlog
import tenacity
from botocore.exceptions import ClientError, HTTPClientError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError

from deployer.errors import FetchError

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


class TransientFetchError(FetchError):
    """Raised when a download failed in a way that may succeed on retry (5xx, reset, timeout)."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call may succeed. Pure: decides from the exception alone."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code", "") in TRANSIENT_ERROR_CODES or status == 429 or status >= 500
    if isinstance(exc, BotoConnectionError | HTTPClientError | ReadTimeoutError):
        return True
    if isinstance(exc, TransientFetchError):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    return isinstance(exc, urllib.error.URLError | ConnectionError | TimeoutError | socket.timeout)


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
        if self.interrupt is not None:
            event = self.interrupt
            stop = stop | tenacity.stop_when_event_set(event)

            def sleep(seconds: float) -> None:
                event.wait(seconds)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_random_exponential(multiplier=self.base_seconds, max=self.cap_seconds),
            stop=stop,
            sleep=sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(fn, *args, **kwargs)


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
