"""Backoff and deliberate waits: the arithmetic and the interruptible sleep every layer shares.

Standard library only (and the protocol's error tree), so pure decisions (`agent/decide.py`)
and the apply lock can use them without loading botocore or tenacity; an import contract in
pyproject.toml keeps it so. The retry *policy* that applies them to AWS calls is
`deployer.aws.retry`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from deployer.protocol.errors import Interrupted


def backoff_seconds(
    attempt: int, *, base: float, cap: float, jitter: float = 1.0, rng: Callable[[], float] = random.random
) -> float:
    """How long to wait before attempt `attempt + 1`: `base · 2^(attempt-1)`, capped, minus jitter. Pure.

    `jitter` is the share of that delay drawn at random: 1.0 is full jitter (anywhere in
    [0, delay], what AWS recommends for many clients hitting one service), 0.0 none (a fixed
    schedule such as the SQS redelivery backoff).
    """
    delay = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return delay * (1.0 - jitter * rng())


def pause(seconds: float, interrupt: threading.Event | None, what: str) -> None:
    """Every deliberate wait outside the retry policy (lock polling, health-check retries): sleep,
    or raise Interrupted as soon as `interrupt` is set, so a stop is never held up by a nap."""
    if interrupt is None:
        time.sleep(seconds)
    elif interrupt.wait(seconds):
        raise Interrupted(f"stopped while waiting for {what}")
