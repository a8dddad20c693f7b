"""Out of the load balancer while the release changes, back in once it serves: per instance.

An agent behind an Application or Network Load Balancer (`target_group_arns` in its config, or
`auto`: its Auto Scaling group's) applies a release that restarts the app in this order:

    download + verify + stage (still serving) → deregister from every target group → drain →
    pre hooks, activate, post hooks, health check → register → wait until `healthy` in each

so the load balancer never sends a request to an app that is stopping or starting, and the
instance is out of service only for the switch itself, not for the download.

**Drain** ends at the first of: no established connection left on the app's port (read from
`/proc/net/tcp` and `tcp6`, as ELB itself completes a deregistration early when a target has no
in-flight request), every target `unused` (ELB is done), or the group's deregistration delay
(300 s by default, which an idle instance must not wait for). Before any of that counts, ELB
must show the target `draining` or `unused`: a deregistration that never takes effect within
`traffic_drain_timeout_seconds` is `traffic_drain_timeout`, and nothing of the release is touched.

**Crash safety.** `traffic.json` in the state directory names the targets this agent took out,
written (fsync'd) *before* the first DeregisterTargets and removed once they are registered and
healthy again. Whatever ends an apply — a failed hook, a rollback, an unhealthy release, a
crash, a kill -9 — the next `settle()` (after every apply, and at boot) registers what the
marker names. An instance is never left deregistered by this agent with a release live; if the
release it then runs is not healthy either, the report says so.

The decisions are pure functions over data (`established`, `drain_over`, `health_verdict`); the
calls are `deployer.aws.elb`'s adapters.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from deployer.agent.config import AgentConfig
from deployer.apply.fsutil import write_atomic
from deployer.aws.autoscaling import find_asg, load_balancing_of
from deployer.aws.clients import autoscaling_client, elbv2_client
from deployer.aws.elb import (
    OUT_OF_SERVICE,
    REGISTERED,
    GroupSettings,
    Health,
    Target,
    TargetState,
    deregister,
    group_settings,
    register,
    target_health,
)
from deployer.aws.retry import RetryPolicy
from deployer.protocol.errors import Interrupted, TargetUnhealthy, TrafficUnavailable
from deployer.protocol.limits import DEFAULT_DRAIN_TIMEOUT_SECONDS, DEFAULT_TRAFFIC_POLL_SECONDS
from deployer.protocol.names import AUTO_TARGET_GROUPS

if TYPE_CHECKING:
    from mypy_boto3_elbv2 import ElasticLoadBalancingv2Client

log = structlog.get_logger(__name__)

MARKER_NAME = "traffic.json"
#: /proc/net/tcp `st` column: TCP_ESTABLISHED (include/net/tcp_states.h).
TCP_ESTABLISHED = "01"
PROC_NET_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
#: How often the app's connections are counted while draining (a local file read, no API call).
CONNECTION_CHECK_SECONDS = 0.1
#: Waiting for `healthy` takes HealthyThresholdCount × interval plus up to one interval of phase;
#: this many times that is the bound before the release is called unhealthy (unless configured).
HEALTHY_WAIT_FACTOR = 2.0


class Verdict(enum.Enum):
    HEALTHY = "healthy"
    WAITING = "waiting"
    UNHEALTHY = "unhealthy"


# -- pure decisions --------------------------------------------------------------------------


def established(table: str, ports: Iterable[int]) -> int:
    """How many connections in a `/proc/net/tcp[6]` table are ESTABLISHED to one of `ports` locally. Pure.

    A line is `sl local_address rem_address st …`, addresses as `HEXIP:HEXPORT`; the header and
    any malformed line count as nothing.
    """
    wanted = set(ports)
    count = 0
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1]:
            continue
        try:
            port = int(fields[1].rsplit(":", 1)[1], 16)
        except ValueError:
            continue
        if port in wanted and fields[3] == TCP_ESTABLISHED:
            count += 1
    return count


def drain_over(*, elapsed: float, delay: float, connections: int, states: Sequence[str]) -> str | None:
    """Why draining is over, or None while it is not. Pure. `states`: ELB's word on each target
    taken out, already known to have left service."""
    if states and all(state == TargetState.UNUSED for state in states):
        return "deregistered"
    if connections == 0:
        return "no_connections"
    if elapsed >= delay:
        return "deregistration_delay"
    return None


def health_verdict(health: Sequence[Health]) -> Verdict:
    """Every target healthy → HEALTHY; one unhealthy (its threshold of failed checks reached) → UNHEALTHY. Pure."""
    states = [h.state for h in health]
    if states and all(state == TargetState.HEALTHY for state in states):
        return Verdict.HEALTHY
    if any(state == TargetState.UNHEALTHY for state in states):
        return Verdict.UNHEALTHY
    return Verdict.WAITING


def healthy_wait_seconds(settings: Iterable[GroupSettings]) -> float:
    """The default bound on waiting for `healthy`: HEALTHY_WAIT_FACTOR × (threshold + 1) intervals
    of the slowest group. Pure."""
    return max((HEALTHY_WAIT_FACTOR * (s.healthy_threshold + 1) * s.interval_s for s in settings), default=0.0)


def _marker_targets(raw: bytes) -> tuple[Target, ...]:
    doc = json.loads(raw)
    return tuple(Target(str(t["group_arn"]), str(t["instance_id"]), int(t["port"])) for t in doc["targets"])


def connections_on(ports: Iterable[int], tables: Sequence[Path] = PROC_NET_TCP) -> int:
    """ESTABLISHED connections to `ports`, from the kernel's tables (a table that is absent counts 0)."""
    total = 0
    wanted = tuple(ports)
    for path in tables:
        try:
            total += established(path.read_text(), wanted)
        except OSError:
            continue
    return total


# -- the gate --------------------------------------------------------------------------------


def gate_for(
    config: AgentConfig, instance_id: str, policy: RetryPolicy, interrupt: threading.Event
) -> TrafficGate | None:
    """The gate an agent config asks for (None when it names no target groups)."""
    if not config.behind_load_balancer:
        return None
    configured = config.target_group_arns
    found: list[tuple[str, ...]] = []

    def groups() -> tuple[str, ...]:
        if not isinstance(configured, str):
            return configured
        if not found:  # asked once, when first needed; a failure is asked again next time
            found.append(groups_of_asg(config, instance_id, policy))
        return found[0]

    settings = TrafficSettings(
        groups=groups,
        port=config.traffic_port,
        poll_seconds=config.traffic_poll_seconds,
        drain_timeout_seconds=config.traffic_drain_timeout_seconds,
        healthy_timeout_seconds=config.traffic_healthy_timeout_seconds,
    )
    elbv2 = elbv2_client(config.region, config.endpoint_url)
    return TrafficGate(
        elbv2, settings, instance_id=instance_id, state_dir=config.state_dir, policy=policy, interrupt=interrupt
    )


def groups_of_asg(config: AgentConfig, instance_id: str, policy: RetryPolicy) -> tuple[str, ...]:
    """`target_group_arns: auto`: the target groups of this instance's Auto Scaling group."""
    autoscaling = autoscaling_client(config.region, config.endpoint_url)
    group = config.lifecycle_asg_name or find_asg(autoscaling, instance_id, policy)
    if group is None:
        raise TrafficUnavailable(
            f"target_group_not_found: target_group_arns is {AUTO_TARGET_GROUPS!r} but {instance_id} is in no Auto Scaling group"
        )
    target_groups, classic = load_balancing_of(autoscaling, group, policy)
    if classic:
        log.warning(
            "traffic_classic_elb_unmanaged",
            asg=group,
            load_balancers=list(classic),
            next="only ELBv2 target groups are left and rejoined; move the group to a target group",
        )
    log.info("traffic_groups_found", asg=group, target_groups=list(target_groups))
    return target_groups


@dataclass(frozen=True)
class TrafficSettings:
    """The agent config's traffic keys, resolved."""

    #: The groups to leave and rejoin; resolved lazily (an `auto` config asks Auto Scaling once).
    groups: Callable[[], tuple[str, ...]]
    #: The app's port whose established connections are in-flight requests (None: the targets' ports).
    port: int | None = None
    poll_seconds: float = DEFAULT_TRAFFIC_POLL_SECONDS
    drain_timeout_seconds: float = DEFAULT_DRAIN_TIMEOUT_SECONDS
    #: None: computed from the groups' health-check settings (`healthy_wait_seconds`).
    healthy_timeout_seconds: float | None = None


class TrafficGate:
    """Leaves and rejoins this instance's target groups around an apply (the engine's `Cutover`)."""

    def __init__(
        self,
        elbv2: ElasticLoadBalancingv2Client,
        settings: TrafficSettings,
        *,
        instance_id: str,
        state_dir: Path,
        policy: RetryPolicy,
        interrupt: threading.Event,
        connections: Callable[[Iterable[int]], int] = connections_on,
    ) -> None:
        self.elbv2 = elbv2
        self.settings = settings
        self.instance_id = instance_id
        self.marker = state_dir / MARKER_NAME
        self.policy = policy
        self.interrupt = interrupt
        self.connections = connections
        self._settings: dict[str, GroupSettings] = {}

    # -- the engine's Cutover ----------------------------------------------------------------

    def leave(self) -> None:
        """Deregister from every group this instance serves in, then drain. Raises TrafficUnavailable
        (the caller's `settle` registers again) when ELB does not take the targets out in time."""
        targets = self._serving()
        if not targets:
            log.info("traffic_not_registered", next="nothing to drain; applying in place")
            return
        self._write_marker(targets)
        started = time.monotonic()
        for target in targets:
            deregister(self.elbv2, target, self.policy)
        log.info("traffic_deregistered", targets=len(targets), next="draining")
        states = self._await_out_of_service(targets)
        delay = max(self._group(t.group_arn).deregistration_delay_s for t in targets)
        ports = {self.settings.port} if self.settings.port else {t.port for t in targets}
        next_poll = time.monotonic() + self.settings.poll_seconds
        while True:
            elapsed = time.monotonic() - started
            why = drain_over(elapsed=elapsed, delay=delay, connections=self.connections(ports), states=states)
            if why is not None:
                log.info("traffic_drained", why=why, drain_s=round(elapsed, 3), next="applying the release")
                return
            if time.monotonic() >= next_poll:
                states = [h.state for h in self._health(targets)]
                next_poll = time.monotonic() + self.settings.poll_seconds
            self._wait(CONNECTION_CHECK_SECONDS)

    def rejoin(self) -> None:
        """Register what `leave` took out and wait until ELB says `healthy` in each group.

        Raises TargetUnhealthy when a target turns `unhealthy` or the wait runs out: the engine
        rolls the release back, and `settle` registers the previous one and waits for it.
        """
        targets = self._taken_out()
        if not targets:
            return
        self._register_and_wait(targets, release="new", fail_fast=True)
        self.marker.unlink(missing_ok=True)

    # -- after every apply, and at boot ----------------------------------------------------

    def settle(self) -> str | None:
        """Register whatever the marker says this agent took out, and wait for it: after a failed
        apply (its previous release is active again), a crash or a kill. What happened, for the
        report (None if nothing was out). Never raises for AWS trouble: the marker stays and the
        next settle tries again."""
        targets = self._taken_out()
        if not targets:
            return None
        try:
            # No fail-fast here: after a rollback the target is still `unhealthy` from the release
            # that failed, and turns healthy only after HealthyThresholdCount passing checks.
            self._register_and_wait(targets, release="running", fail_fast=False)
        except TargetUnhealthy as exc:
            self.marker.unlink(missing_ok=True)  # registered: nothing more an agent can do about it
            log.error("traffic_rejoined_unhealthy", error=str(exc), next="registered; ELB routes to it once healthy")
            return f"re-registered the running release, which is not healthy: {exc}"
        except Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - the marker stays; the next apply or boot registers again
            log.error(
                "traffic_rejoin_failed",
                error=f"{type(exc).__name__}: {exc}",
                next="registering again after the next apply or at the next start",
            )
            return f"could not register again yet ({exc}); retried after the next apply and at start"
        self.marker.unlink(missing_ok=True)
        return "re-registered the running release, healthy"

    # -- steps -------------------------------------------------------------------------------

    def _serving(self) -> tuple[Target, ...]:
        """The targets of this instance that get requests now, plus any a crash left taken out."""
        found: list[Target] = list(self._taken_out())
        for group in self.settings.groups():
            # Every registered target of the group: this instance may be registered on several ports.
            for health in target_health(self.elbv2, group, policy=self.policy):
                mine = health.target.instance_id == self.instance_id
                if mine and health.state in REGISTERED and health.target not in found:
                    found.append(health.target)
        return tuple(found)

    def _await_out_of_service(self, targets: Sequence[Target]) -> list[str]:
        deadline = time.monotonic() + self.settings.drain_timeout_seconds
        while True:
            health = self._health(targets)
            if all(h.state in OUT_OF_SERVICE for h in health):
                return [h.state for h in health]
            if time.monotonic() >= deadline:
                still = ", ".join(f"{h.target.group_arn}:{h.target.port} {h.state}" for h in health)
                raise TrafficUnavailable(
                    f"traffic_drain_timeout: ELB did not take the instance out of service within "
                    f"{self.settings.drain_timeout_seconds:g} s ({still}); the release was not touched"
                )
            self._wait(min(self.settings.poll_seconds, max(deadline - time.monotonic(), 0.0)))

    def _register_and_wait(self, targets: Sequence[Target], *, release: str, fail_fast: bool) -> None:
        """Register, then wait for `healthy`; `fail_fast`: a target `unhealthy` (its threshold of failed
        checks since it was registered afresh) ends the wait at once."""
        for target in targets:
            register(self.elbv2, target, self.policy)
        timeout = self.settings.healthy_timeout_seconds or healthy_wait_seconds(
            self._group(t.group_arn) for t in targets
        )
        log.info("traffic_registered", targets=len(targets), timeout_s=timeout, next="waiting until healthy")
        started = time.monotonic()
        while True:
            health = self._health(targets)
            verdict = health_verdict(health)
            waited = time.monotonic() - started
            if verdict is Verdict.HEALTHY:
                log.info("traffic_healthy", wait_s=round(waited, 3), release=release, next="serving")
                return
            if (fail_fast and verdict is Verdict.UNHEALTHY) or waited >= timeout:
                detail = ", ".join(f"{h.target.group_arn}:{h.target.port} {h.state} {h.reason}".strip() for h in health)
                raise TargetUnhealthy(
                    f"register_unhealthy: the {release} release is not healthy behind the load balancer "
                    f"after {waited:.0f} s ({detail})"
                )
            self._wait(min(self.settings.poll_seconds, max(timeout - waited, 0.0)))

    def _health(self, targets: Sequence[Target]) -> list[Health]:
        health: list[Health] = []
        for group in dict.fromkeys(t.group_arn for t in targets):
            ports = [t.port for t in targets if t.group_arn == group]
            health += target_health(self.elbv2, group, self.instance_id, ports, self.policy)
        return health

    def _group(self, arn: str) -> GroupSettings:
        if arn not in self._settings:
            self._settings[arn] = group_settings(self.elbv2, arn, self.policy)
        return self._settings[arn]

    def _taken_out(self) -> tuple[Target, ...]:
        try:
            return _marker_targets(self.marker.read_bytes())
        except FileNotFoundError:
            return ()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: the groups' own state says what is out; `leave` will find it registered or not.
            log.error("traffic_marker_unreadable", path=str(self.marker), error=str(exc), next="ignored")
            return ()

    def _write_marker(self, targets: Sequence[Target]) -> None:
        doc = {"targets": [{"group_arn": t.group_arn, "instance_id": t.instance_id, "port": t.port} for t in targets]}
        write_atomic(self.marker, json.dumps(doc, sort_keys=True).encode())

    def _wait(self, seconds: float) -> None:
        if self.interrupt.wait(seconds):
            raise Interrupted("shutting down while the load balancer drained or checked this instance")
