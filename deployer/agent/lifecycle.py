"""Where Auto Scaling is taking this instance: in service, into a warm pool, out of the group.

IMDS answers `autoscaling/target-lifecycle-state` with the state the instance is moving to:
`InService`, `Warmed:Stopped` / `Warmed:Running` / `Warmed:Hibernated` (launched into, or kept
in, a warm pool) or `Terminated`. It is a loopback HTTP call, no AWS request, so the agent polls
it (`lifecycle_poll_seconds`) whenever a lifecycle hook is configured, and `step_for` (pure)
turns each change into what the agent does:

- into a warm pool: the agent converges as at any boot, reports `warmed` (not expected by
  `--wait`, never collected by `gc`, counted apart by `status`) and completes the launch hook;
  a stopped or hibernated pool then stops the instance;
- from a warm pool into service: it catches up (boot replay applies only what changed while it
  slept, reusing releases on disk), reports in service, and completes the launch hook again;
  Auto Scaling registers it with its target groups only after that;
- out of the group: the terminate hook (`deployer.agent.termination`).

https://docs.aws.amazon.com/autoscaling/ec2/userguide/retrieving-target-lifecycle-state-through-imds.html
https://docs.aws.amazon.com/autoscaling/ec2/userguide/warm-pool-instance-lifecycle.html
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

import structlog

from deployer.agent.identity import imds_get

log = structlog.get_logger(__name__)

#: IMDS path of the state Auto Scaling is moving the instance to.
TARGET_LIFECYCLE_STATE = "autoscaling/target-lifecycle-state"
IN_SERVICE = "InService"
TERMINATED = "Terminated"
#: Every warm-pool target state starts with this (Warmed:Stopped, Warmed:Running, Warmed:Hibernated).
WARMED_PREFIX = "Warmed:"


class Step(enum.Enum):
    NOTHING = "nothing"
    WARMED = "warmed"  # report warmed
    ENTERED_SERVICE = "entered_service"  # report in service, complete the launch hook
    TERMINATING = "terminating"  # leave through the terminate hook


def is_warmed(state: str | None) -> bool:
    return state is not None and state.startswith(WARMED_PREFIX)


def step_for(previous: str | None, current: str | None) -> Step:
    """What a change of target lifecycle state asks of the agent. Pure.

    `None` is "unknown" (IMDS had no answer): it changes nothing, and the next known state is
    judged against the last known one.
    """
    if current is None or current == previous:
        return Step.NOTHING
    if current == TERMINATED:
        return Step.TERMINATING
    if is_warmed(current):
        return Step.NOTHING if is_warmed(previous) else Step.WARMED
    if current == IN_SERVICE and is_warmed(previous):
        return Step.ENTERED_SERVICE
    return Step.NOTHING


def read_state(endpoint: str, read: Callable[[str, str], str | None] = imds_get) -> str | None:
    """The target lifecycle state, or None when IMDS has none (not in a group) or cannot be reached."""
    try:
        return read(endpoint, TARGET_LIFECYCLE_STATE)
    except OSError as exc:
        log.warning("lifecycle_state_unreadable", error=str(exc), next="asked again at the next poll")
        return None


class LifecycleWatch:
    """Polls the target lifecycle state on a thread; hands each `step_for` that is not NOTHING to `act`."""

    def __init__(
        self,
        endpoint: str,
        poll_seconds: float,
        act: Callable[[Step, str], None],
        stop: threading.Event,
        first: str | None = None,
        read: Callable[[str, str], str | None] = imds_get,
    ) -> None:
        self.endpoint = endpoint
        self.poll_seconds = poll_seconds
        self.act = act
        self.stop = stop
        self.last = first
        self.read = read
        self.thread = threading.Thread(target=self._run, name="lifecycle-watch", daemon=True)

    def start(self) -> LifecycleWatch:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.poll_seconds):
            current = read_state(self.endpoint, self.read)
            step = step_for(self.last, current)
            if current is not None:
                self.last = current
            if step is Step.NOTHING:
                continue
            log.info("lifecycle_state_changed", state=current, step=step.value, next="acting on it")
            try:
                self.act(step, current or "")
            except Exception as exc:  # noqa: BLE001 - the watch outlives a failed step; the hook times out
                log.error("lifecycle_step_failed", step=step.value, error=str(exc), next="watching on")
            if step is Step.TERMINATING:
                return
