"""Target health as ELBv2 keeps it, on loopback: registration, health checks, draining, a balancer.

What AWS does. A target registered with a target group is `initial` until it passes
HealthyThresholdCount consecutive health checks (an HTTP GET of HealthCheckPath every
HealthCheckIntervalSeconds, passing when the status matches the group's Matcher), then
`healthy`; UnhealthyThresholdCount consecutive failures make it `unhealthy`. The load balancer
sends new requests to healthy targets only. DeregisterTargets makes a target `draining`: it gets
no new request, the ones in flight may finish, and once none is in flight (or the group's
deregistration delay has elapsed, whichever comes first) the deregistration is complete. The
state shown stays `draining` until the delay has elapsed all the same, then the target is
`unused` (`Target.NotRegistered`): a deployer that waits for `unused` waits out the whole delay
(300 s by default), one that counts the app's connections does not. A request still in flight
when the delay elapses is cut (a 502 to its client).

What moto lacks. moto's ELBv2 has none of that time: a registered target is `healthy` the
instant it is registered and `unused` the instant it is deregistered, no health check is made
and there is no load balancer to send a request. A deploy that restarts an app before ELB has
taken it out of service, or registers it again before it answers, loses requests on AWS and
none on moto.

What this emulates. `TargetHealthFake` is a `tests.awsproxy` rule that answers RegisterTargets,
DeregisterTargets and DescribeTargetHealth itself, with the state machine above run by real
HTTP health checks against the loopback port each instance's app listens on (`bind`), every
duration multiplied by `time_scale`. The group and its settings are moto's (asked on every
call, so a group changed or deleted through moto counts); everything else goes to moto
unchanged. `balancer()` is the load balancer: it sends each request to one healthy target of a
group, on a new connection, counts it in flight for the drain rule, and cuts it when the
deregistration delay ends first. `load()` is a client that keeps asking it and counts what
failed. `unused_when_drained=True` shows `unused` as soon as a deregistration is complete, for
a test that must not wait out the delay; it is kinder than AWS.

Deliberately not emulated: targets of a group no load balancer uses are not `unused`
(`Target.NotInUse`) here, since `balancer()` plays the load balancer for any group; the
balancer never fails open (AWS sends requests to every target when all are unhealthy), so a
deploy that takes every target out shows as failed requests, not as requests to a stopping
app; an instance id is not checked against EC2 (`InvalidTarget`); HTTPS, `unhealthy.draining`
and disabled health checks (`unavailable`) are not modelled.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.error
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, runtime_checkable
from xml.sax.saxutils import escape

import boto3
from botocore.exceptions import ClientError

from tests.awsproxy import DIRECT, Answer, AwsProxy, Call, Rule, aws_proxy, query_error

#: The SigV4 signing name of both ELB APIs (classic and v2); the API version tells them apart.
SERVICE = "elasticloadbalancing"
#: ELBv2's query API version and XML namespace, as botocore's `elbv2` model names them.
API_VERSION = "2015-12-01"
XMLNS = "http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/"
REGION = "us-east-1"

#: States, thresholds, intervals and reason codes of health checks.
#: https://docs.aws.amazon.com/elasticloadbalancing/latest/application/target-group-health-checks.html
HEALTH_CHECKS_DOC = (
    "https://docs.aws.amazon.com/elasticloadbalancing/latest/application/target-group-health-checks.html"
)
#: "If a deregistering target has no in-flight requests and no active connections, Elastic Load
#: Balancing immediately completes the deregistration process, without waiting for the
#: deregistration delay to elapse. However, even though target deregistration is complete, the
#: status of the target is displayed as draining until the deregistration delay timeout expires."
#: https://docs.aws.amazon.com/elasticloadbalancing/latest/application/edit-target-group-attributes.html#deregistration-delay
DEREGISTRATION_DOC = (
    "https://docs.aws.amazon.com/elasticloadbalancing/latest/application/edit-target-group-attributes.html"
    "#deregistration-delay"
)
#: The attribute, and AWS's default when a group does not set it (0–3600 s). DEREGISTRATION_DOC.
DEREGISTRATION_DELAY = "deregistration_delay.timeout_seconds"
DEFAULT_DEREGISTRATION_DELAY_SECONDS = 300.0
#: AWS's defaults for an HTTP target group of an Application Load Balancer (HEALTH_CHECKS_DOC):
#: interval 30 s, timeout 5 s, healthy after 5 passes, unhealthy after 2 failures, GET /, 200.
DEFAULT_INTERVAL_SECONDS = 30.0
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_HEALTHY_THRESHOLD = 5
DEFAULT_UNHEALTHY_THRESHOLD = 2
TRAFFIC_PORT = "traffic-port"
#: AWS's shortest HealthCheckIntervalSeconds is 5 s (HEALTH_CHECKS_DOC); at 0.1× one interval is
#: 0.5 s, so a target with HealthyThresholdCount 2 is healthy a second after it registers.
DEFAULT_TIME_SCALE = 0.1
#: ALB's idle timeout (60 s by default, scaled): a target that does not answer within it is a 504.
#: https://docs.aws.amazon.com/elasticloadbalancing/latest/application/edit-load-balancer-attributes.html#connection-idle-timeout
IDLE_TIMEOUT_SECONDS = 60.0
#: A deregistration completes no sooner than this (real time, not scaled), even with nothing in
#: flight, and a target shows `draining` at least this long, even with a delay of 0: AWS takes
#: a moment to propagate a deregistration to its load balancer nodes. Without it a deployer that
#: asks right after DeregisterTargets would see a target already gone, and its handling of
#: `draining` would go untested.
MIN_DRAIN_SECONDS = 0.2
#: The agent settings of the e2e tests behind this fake: heartbeat every second, ask ELB every
#: 0.2 s (5 s on AWS, for its API rate) so the emulated timing dominates, and give a registered
#: release 6 s (12 intervals at 0.1×) to turn healthy.
AGENT_BEHIND_FAKE = {"heartbeat_interval_seconds": 1, "traffic_poll_seconds": 0.2, "traffic_healthy_timeout_seconds": 6}
#: How often the background thread starts due checks and ends drains (real time). Drains end on
#: this tick, never inside DeregisterTargets, for the reason of MIN_DRAIN_SECONDS.
TICK_SECONDS = 0.025
#: Health checks run at once: a check that times out must not hold up every other target's.
CHECK_WORKERS = 8
#: How often the balancer's server looks for its shutdown (real time).
POLL_SECONDS = 0.05
#: What AWS's health checker sends as its User-Agent.
HEALTH_CHECKER = "ELB-HealthChecker/2.0"


class State:
    """`TargetHealth.State`. https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/API_TargetHealth.html"""

    INITIAL = "initial"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    UNUSED = "unused"


class Reason:
    """`TargetHealth.Reason` and the descriptions AWS gives with them (HEALTH_CHECKS_DOC)."""

    REGISTRATION = ("Elb.RegistrationInProgress", "Target registration is in progress")
    INITIAL_CHECKING = ("Elb.InitialHealthChecking", "Initial health checking in progress")
    TIMEOUT = ("Target.Timeout", "Request timed out")
    FAILED = ("Target.FailedHealthChecks", "Health checks failed")
    MISMATCH = "Target.ResponseCodeMismatch"
    DEREGISTERING = ("Target.DeregistrationInProgress", "Target deregistration is in progress")
    NOT_REGISTERED = ("Target.NotRegistered", "Target is not registered to the target group")


#: (group ARN, instance id, port): one registration, as ELB keys it.
TargetKey = tuple[str, str, int]


@dataclass(frozen=True)
class GroupSettings:
    """A target group's health-check settings and deregistration delay, in AWS's (unscaled) seconds."""

    port: int
    interval: float = DEFAULT_INTERVAL_SECONDS
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    healthy_threshold: int = DEFAULT_HEALTHY_THRESHOLD
    unhealthy_threshold: int = DEFAULT_UNHEALTHY_THRESHOLD
    path: str = "/"
    health_port: str = TRAFFIC_PORT
    matcher: str = "200"
    deregistration_delay: float = DEFAULT_DEREGISTRATION_DELAY_SECONDS

    @classmethod
    def from_moto(cls, group: Mapping[str, Any], attributes: Sequence[Mapping[str, str]]) -> GroupSettings:
        found = {a.get("Key"): a.get("Value") for a in attributes}
        return cls(
            port=int(group.get("Port") or 0),
            interval=float(group.get("HealthCheckIntervalSeconds") or DEFAULT_INTERVAL_SECONDS),
            timeout=float(group.get("HealthCheckTimeoutSeconds") or DEFAULT_TIMEOUT_SECONDS),
            healthy_threshold=int(group.get("HealthyThresholdCount") or DEFAULT_HEALTHY_THRESHOLD),
            unhealthy_threshold=int(group.get("UnhealthyThresholdCount") or DEFAULT_UNHEALTHY_THRESHOLD),
            path=str(group.get("HealthCheckPath") or "/"),
            health_port=str(group.get("HealthCheckPort") or TRAFFIC_PORT),
            matcher=str((group.get("Matcher") or {}).get("HttpCode") or "200"),
            deregistration_delay=float(found.get(DEREGISTRATION_DELAY) or DEFAULT_DEREGISTRATION_DELAY_SECONDS),
        )

    def check_port(self, target_port: int) -> int:
        """The port health checks go to: the target's own (`traffic-port`) or the group's number."""
        return target_port if self.health_port == TRAFFIC_PORT else int(self.health_port)


def matches(matcher: str, status: int) -> bool:
    """Whether `status` passes a Matcher's HttpCode: "200", "200,202" or "200-299"."""
    for part in matcher.split(","):
        low, _, high = part.strip().partition("-")
        if int(low) <= status <= int(high or low):
            return True
    return False


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str = ""
    description: str = ""


def probe(port: int | None, path: str, timeout: float, matcher: str) -> CheckResult:
    """One health check: GET `path` on 127.0.0.1:`port` (a new connection, closed after), as ELB does."""
    if port is None:  # an instance nothing listens for: the check cannot connect
        return CheckResult(False, *Reason.FAILED)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": HEALTH_CHECKER, "Connection": "close"})
        response = connection.getresponse()
        response.read()
    except TimeoutError:
        return CheckResult(False, *Reason.TIMEOUT)
    except (OSError, http.client.HTTPException):
        return CheckResult(False, *Reason.FAILED)
    finally:
        connection.close()
    if matches(matcher, response.status):
        return CheckResult(True)
    return CheckResult(False, Reason.MISMATCH, f"Health checks failed with these codes: [{response.status}]")


@dataclass
class _Target:
    key: TargetKey
    state: str
    reason: str
    description: str
    next_check: float
    passes: int = 0
    failures: int = 0
    checking: bool = False
    drain_started: float = 0.0
    drain_deadline: float = 0.0


@dataclass(eq=False)
class Route:
    """One request the balancer sends to a target: in flight from its pick until the balancer is done."""

    key: TargetKey
    #: The loopback port the instance's app listens on (None: nothing bound, the request fails).
    port: int | None
    #: When it was picked (monotonic), taken under the fake's lock like every state change.
    picked_at: float
    cut: bool = False
    _socket: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, sock: socket.socket | None) -> bool:
        """Remember the connection to the target, so the end of the deregistration delay can cut it;
        False if it already has."""
        with self._lock:
            self._socket = sock
            return not self.cut

    def sever(self) -> None:
        """The deregistration delay elapsed with this request in flight: the balancer drops it."""
        with self._lock:
            self.cut = True
            if self._socket is not None:
                with contextlib.suppress(OSError):  # already closed: it finished as the delay ended
                    self._socket.shutdown(socket.SHUT_RDWR)


def _answer(action: str, result: str = "") -> Answer:
    xml = (
        f'<{action}Response xmlns="{XMLNS}"><{action}Result>{result}</{action}Result>'
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></{action}Response>"
    )
    return Answer(200, xml.encode(), {"Content-Type": "text/xml"})


def requested_targets(params: Mapping[str, Any], default_port: int) -> list[tuple[str, int]]:
    """`Targets.member.N.Id` / `.Port` of a query-protocol request, in order; the port defaults to the group's."""
    found = []
    n = 1
    while f"Targets.member.{n}.Id" in params:
        port = params.get(f"Targets.member.{n}.Port")
        found.append((str(params[f"Targets.member.{n}.Id"]), int(port) if port else default_port))
        n += 1
    return found


@dataclass
class TargetHealthFake:
    """An AwsProxy rule: ELBv2's target registration and health, on top of moto's target groups.

    Durations are AWS's (the group's settings) × `time_scale`. With `unused_when_drained`, a
    target is `unused` as soon as its deregistration is complete (nothing in flight) instead of
    when the delay has elapsed as AWS shows it: for a test that must not wait out the delay.
    """

    upstream: str
    time_scale: float = DEFAULT_TIME_SCALE
    unused_when_drained: bool = False
    url: str = ""
    proxy: AwsProxy | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _targets: dict[TargetKey, _Target] = field(default_factory=dict, repr=False)
    _groups: dict[str, GroupSettings] = field(default_factory=dict, repr=False)
    #: (instance id, its target port or None for any) → the loopback port its app listens on.
    _ports: dict[tuple[str, int | None], int] = field(default_factory=dict, repr=False)
    _history: list[tuple[float, str, str, str]] = field(default_factory=list, repr=False)
    _drained: dict[TargetKey, float] = field(default_factory=dict, repr=False)
    _in_flight: dict[TargetKey, set[Route]] = field(default_factory=dict, repr=False)
    _cursor: Counter[str] = field(default_factory=Counter, repr=False)
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError(f"time_scale must be positive, not {self.time_scale}")

    # -- what a test tells it and asks it ---------------------------------------------------

    def bind(self, instance_id: str, port: int, *, target_port: int | None = None) -> None:
        """Say that `instance_id`'s app listens on 127.0.0.1:`port` (for every target port, or only `target_port`)."""
        with self._lock:
            self._ports[(instance_id, target_port)] = port

    def unbind(self, instance_id: str) -> None:
        """The instance is gone: its checks and requests fail from now on."""
        with self._lock:
            for key in [k for k in self._ports if k[0] == instance_id]:
                del self._ports[key]

    def state(self, group_arn: str, instance_id: str, port: int | None = None) -> str:
        """The target's state as DescribeTargetHealth shows it (`unused` when not registered)."""
        with self._lock:
            found = [t for k, t in self._targets.items() if k[:2] == (group_arn, instance_id) and port in (None, k[2])]
        if len(found) > 1:
            raise ValueError(f"{instance_id} is registered on ports {[t.key[2] for t in found]}: name one")
        return found[0].state if found else State.UNUSED

    def history(self, instance_id: str) -> list[tuple[float, str, str]]:
        """Every state the instance's targets went through: (monotonic time, group ARN, state)."""
        with self._lock:
            return [(at, group, state) for at, group, instance, state in self._history if instance == instance_id]

    def drained(self, group_arn: str, instance_id: str) -> float | None:
        """When the instance's last deregistration from the group completed (monotonic; nothing left in
        flight, or the delay elapsed), None while it has not or if it is registered."""
        with self._lock:
            times = [at for k, at in self._drained.items() if k[:2] == (group_arn, instance_id)]
        return max(times, default=None)

    def in_flight(self, group_arn: str, instance_id: str) -> int:
        with self._lock:
            return sum(len(r) for k, r in self._in_flight.items() if k[:2] == (group_arn, instance_id))

    def reset(self) -> None:
        """Forget every target, binding and transition (tests sharing one fake); checks under way are void."""
        with self._lock:
            for store in (self._targets, self._groups, self._ports, self._drained, self._in_flight, self._cursor):
                store.clear()
            self._history.clear()

    # -- the background checks and drains ----------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._pool = ThreadPoolExecutor(CHECK_WORKERS, thread_name_prefix="elb-health-check")
        self._thread = threading.Thread(target=self._run, name="elb-fake", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None or self._pool is None:
            return
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)  # a check in progress ends within its timeout
        self._thread = self._pool = None

    def _run(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            self._tick(time.monotonic())

    def _tick(self, now: float) -> None:
        due: list[tuple[_Target, int | None, GroupSettings]] = []
        cut: list[Route] = []
        with self._lock:
            for target in list(self._targets.values()):
                if target.state == State.DRAINING:
                    cut += self._drain(target, now)
                elif not target.checking and now >= target.next_check:
                    target.checking = True
                    settings = self._groups[target.key[0]]
                    port = self._port(target.key[1], settings.check_port(target.key[2]))
                    due.append((target, port, settings))
        for route in cut:
            route.sever()
        for target, port, settings in due:
            if self._pool is not None and not self._stop.is_set():
                self._pool.submit(self._check, target, port, settings)

    def _check(self, target: _Target, port: int | None, settings: GroupSettings) -> None:
        result = probe(port, settings.path, settings.timeout * self.time_scale, settings.matcher)
        now = time.monotonic()
        with self._lock:
            target.checking = False
            # Deregistered (or deregistered and registered again) while the check ran: it is void.
            if self._targets.get(target.key) is not target or target.state == State.DRAINING:
                return
            settings = self._groups[target.key[0]]
            target.next_check = max(target.next_check + settings.interval * self.time_scale, now)
            self._judge(target, result, settings, now)

    def _judge(self, target: _Target, result: CheckResult, settings: GroupSettings, now: float) -> None:
        if result.passed:
            target.passes, target.failures = target.passes + 1, 0
            if target.state != State.HEALTHY and target.passes >= settings.healthy_threshold:
                self._set(target, State.HEALTHY, ("", ""), now)
            elif target.state == State.INITIAL:
                target.reason, target.description = Reason.INITIAL_CHECKING
            return
        target.passes, target.failures = 0, target.failures + 1
        if target.state == State.UNHEALTHY or target.failures >= settings.unhealthy_threshold:
            self._set(target, State.UNHEALTHY, (result.reason, result.description), now)
        elif target.state == State.INITIAL:
            target.reason, target.description = Reason.INITIAL_CHECKING

    def _drain(self, target: _Target, now: float) -> list[Route]:
        """End a drain that is over; the requests to cut if the delay elapsed with them in flight."""
        in_flight = self._in_flight.get(target.key, set())
        if target.key not in self._drained and not in_flight and now - target.drain_started >= MIN_DRAIN_SECONDS:
            self._drained[target.key] = now  # complete: AWS's load balancer is done with it
        expired = now >= target.drain_deadline
        if not expired and not (self.unused_when_drained and target.key in self._drained):
            return []
        self._drained.setdefault(target.key, now)
        self._set(target, State.UNUSED, Reason.NOT_REGISTERED, now)
        del self._targets[target.key]
        # Past the delay, requests still in flight are dropped: ELB is done with the target (the ALB
        # troubleshooting guide lists an elapsed deregistration delay among the causes of a 502).
        return list(in_flight) if expired else []

    def _set(self, target: _Target, state: str, reason: tuple[str, str], now: float) -> None:
        if state != target.state:
            self._history.append((now, target.key[0], target.key[1], state))
        target.state = state
        target.reason, target.description = reason

    def _port(self, instance_id: str, target_port: int) -> int | None:
        return self._ports.get((instance_id, target_port), self._ports.get((instance_id, None)))

    # -- the balancer's side -----------------------------------------------------------------

    @contextmanager
    def request_to(self, group_arn: str) -> Iterator[Route | None]:
        """Pick a healthy target of the group, round robin, and hold it in flight; None if there is none."""
        route = None
        with self._lock:
            healthy = sorted(k for k, t in self._targets.items() if k[0] == group_arn and t.state == State.HEALTHY)
            if healthy:
                key = healthy[self._cursor[group_arn] % len(healthy)]
                self._cursor[group_arn] += 1
                route = Route(key, self._port(key[1], key[2]), time.monotonic())
                self._in_flight.setdefault(key, set()).add(route)
        try:
            yield route
        finally:
            if route is not None:
                with self._lock:
                    self._in_flight.get(route.key, set()).discard(route)

    # -- the rule ----------------------------------------------------------------------------

    def before(self, call: Call) -> Answer | None:
        if call.service != SERVICE or call.params.get("Version") != API_VERSION:
            return None
        if call.action not in ("RegisterTargets", "DeregisterTargets", "DescribeTargetHealth"):
            return None
        group_arn = str(call.params.get("TargetGroupArn", ""))
        settings = self._settings(group_arn)
        if isinstance(settings, Answer):
            return settings
        targets = [(group_arn, instance, port) for instance, port in requested_targets(call.params, settings.port)]
        now = time.monotonic()
        with self._lock:
            self._groups[group_arn] = settings
            if call.action == "RegisterTargets":
                self._register(targets, settings, now)
                return _answer(call.action)
            if call.action == "DeregisterTargets":
                self._deregister(targets, settings, now)
                return _answer(call.action)
            return _answer(call.action, self._describe(group_arn, targets, settings))

    def _settings(self, group_arn: str) -> GroupSettings | Answer:
        """The group's settings from moto, or the error AWS gives when it does not exist."""
        moto = self._moto(group_arn)
        try:
            [group] = moto.describe_target_groups(TargetGroupArns=[group_arn])["TargetGroups"]
            attributes = moto.describe_target_group_attributes(TargetGroupArn=group_arn)["Attributes"]
        except ClientError as exc:
            error, status = exc.response["Error"], exc.response["ResponseMetadata"]["HTTPStatusCode"]
            if error.get("Code") == "TargetGroupNotFound":
                return query_error(400, "TargetGroupNotFound", escape(f"Target groups '{group_arn}' not found"), XMLNS)
            return query_error(status, str(error.get("Code")), escape(str(error.get("Message"))), XMLNS)
        return GroupSettings.from_moto(group, attributes)

    def _moto(self, group_arn: str) -> Any:
        """A client straight to moto in the group's region (boto3 makes clients unsafely across threads)."""
        parts = group_arn.split(":")
        region = parts[3] if len(parts) > 3 and parts[3] else REGION
        with self._lock:
            if region not in self._clients:
                session = boto3.session.Session(region_name=region, aws_access_key_id="x", aws_secret_access_key="x")
                self._clients[region] = session.client("elbv2", endpoint_url=self.upstream)
            return self._clients[region]

    def _register(self, targets: list[TargetKey], settings: GroupSettings, now: float) -> None:
        for key in targets:
            known = self._targets.get(key)
            if known is not None and known.state != State.DRAINING:
                continue  # registering a registered target changes nothing, as on AWS
            self._drained.pop(key, None)
            target = _Target(key, "", "", "", next_check=now + settings.interval * self.time_scale)
            self._set(target, State.INITIAL, Reason.REGISTRATION, now)
            self._targets[key] = target

    def _deregister(self, targets: list[TargetKey], settings: GroupSettings, now: float) -> None:
        for key in targets:
            target = self._targets.get(key)
            if target is None or target.state == State.DRAINING:
                continue  # AWS: "If the specified target does not exist, the action returns successfully."
            target.drain_started = now
            target.drain_deadline = now + max(settings.deregistration_delay * self.time_scale, MIN_DRAIN_SECONDS)
            self._set(target, State.DRAINING, Reason.DEREGISTERING, now)

    def _describe(self, group_arn: str, named: list[TargetKey], settings: GroupSettings) -> str:
        keys = named or sorted(k for k in self._targets if k[0] == group_arn)
        members = []
        for key in keys:
            target = self._targets.get(key)
            state, reason, description = (
                (target.state, target.reason, target.description) if target else (State.UNUSED, *Reason.NOT_REGISTERED)
            )
            health = f"<State>{state}</State>"
            if reason:
                health += f"<Reason>{reason}</Reason><Description>{escape(description)}</Description>"
            members.append(
                f"<member><Target><Id>{escape(key[1])}</Id><Port>{key[2]}</Port></Target>"
                f"<HealthCheckPort>{settings.check_port(key[2])}</HealthCheckPort>"
                f"<TargetHealth>{health}</TargetHealth></member>"
            )
        return f"<TargetHealthDescriptions>{''.join(members)}</TargetHealthDescriptions>"


@runtime_checkable
class _Pointed(Protocol):
    """A rule that calls back through the proxy (LifecycleFake): it is told the proxy's URL."""

    url: str


@contextmanager
def elb_proxy(
    upstream: str, *rules: Rule, time_scale: float = DEFAULT_TIME_SCALE, unused_when_drained: bool = False
) -> Iterator[TargetHealthFake]:
    """A TargetHealthFake in an AwsProxy in front of `upstream` (first, then `rules`), its checks
    running for the block; `.url` (and each rule's `url`, if it has one) is the proxy's endpoint."""
    fake = TargetHealthFake(upstream, time_scale=time_scale, unused_when_drained=unused_when_drained)
    with aws_proxy(upstream, fake, *rules) as proxy:
        fake.url, fake.proxy = proxy.url, proxy
        for rule in rules:
            if isinstance(rule, _Pointed):
                rule.url = proxy.url
        fake.start()
        try:
            yield fake
        finally:
            fake.stop()


# -- the load balancer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Routed:
    """One request the balancer sent to a target, and the status its client got."""

    picked_at: float
    instance_id: str
    port: int
    status: int


@dataclass
class LoopbackBalancer:
    """Sends each GET to one healthy target of `group_arn` (round robin), on a new connection to the
    port its instance is bound to; 503 with no healthy target, 502 when the target cannot be reached
    or is cut at the end of the deregistration delay, 504 past the idle timeout."""

    fake: TargetHealthFake
    group_arn: str
    url: str = ""
    #: Requests each instance answered (whatever the status).
    served: Counter[str] = field(default_factory=Counter)
    routed: list[Routed] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def forward(self, path: str) -> tuple[int, bytes, str]:
        with self.fake.request_to(self.group_arn) as route:
            if route is None:
                return 503, b"no healthy target", "text/plain"
            status, body, content_type, answered = self._relay(route, path)
        with self._lock:
            self.served[route.key[1]] += answered
            self.routed.append(Routed(route.picked_at, route.key[1], route.key[2], status))
        return status, body, content_type

    def _relay(self, route: Route, path: str) -> tuple[int, bytes, str, bool]:
        if route.port is None:
            return 502, b"target not reachable: nothing bound", "text/plain", False
        # A new connection per request, closed after it: no idle keep-alive connection to a target
        # that would count as in flight for a deployer reading the app's connections.
        connection = http.client.HTTPConnection(
            "127.0.0.1", route.port, timeout=IDLE_TIMEOUT_SECONDS * self.fake.time_scale
        )
        try:
            connection.connect()
            if not route.attach(connection.sock):
                return 502, b"deregistration delay elapsed", "text/plain", False
            connection.request("GET", path, headers={"Connection": "close", "X-Forwarded-For": "127.0.0.1"})
            response = connection.getresponse()
            body = response.read()
        except TimeoutError:
            return 504, b"target timed out", "text/plain", False
        except (OSError, http.client.HTTPException) as exc:
            what = "deregistration delay elapsed" if route.cut else f"target failed: {exc!r}"
            return 502, what.encode(), "text/plain", False
        finally:
            connection.close()
        return response.status, body, response.getheader("Content-Type", "text/plain"), True


class _BalancerHandler(BaseHTTPRequestHandler):
    balancer: LoopbackBalancer

    def do_GET(self) -> None:
        status, body, content_type = self.balancer.forward(self.path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def balancer(fake: TargetHealthFake, group_arn: str) -> Iterator[LoopbackBalancer]:
    """A LoopbackBalancer for `group_arn` on 127.0.0.1 for the block; `.url` is where it listens."""
    front = LoopbackBalancer(fake, group_arn)
    handler = type("Handler", (_BalancerHandler,), {"balancer": front})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    front.url = f"http://127.0.0.1:{server.server_address[1]}"
    # A short poll: shutdown waits up to one poll interval (0.5 s by default), in every test.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": POLL_SECONDS}, name="elb-balancer", daemon=True
    )
    thread.start()
    try:
        yield front
    finally:
        server.shutdown()
        server.server_close()


# -- the client ----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What a `load()` client saw: answers 2xx, every other outcome (with its monotonic time), bodies."""

    ok: int = 0
    failed: list[str] = field(default_factory=list)
    bodies: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, body: str | None, failure: str | None = None) -> None:
        with self._lock:
            if failure is not None:
                self.failed.append(f"{time.monotonic():.3f} {failure}")
            else:
                self.ok += 1
                self.bodies[body or ""] += 1


def _ask(url: str, result: LoadResult, timeout: float) -> None:
    try:
        with DIRECT.open(url, timeout=timeout) as response:
            result.record(response.read().decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        result.record(None, f"HTTP {exc.code} {exc.read()[:100].decode(errors='replace')}")
    except (OSError, http.client.HTTPException) as exc:
        result.record(None, repr(exc))


@contextmanager
def load(url: str, *, interval: float = 0.01, workers: int = 2, timeout: float = 10.0) -> Iterator[LoadResult]:
    """`workers` threads GET `url` every `interval` until the block ends; the result is final after it."""
    result = LoadResult()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            _ask(url, result, timeout)
            stop.wait(interval)

    threads = [threading.Thread(target=loop, name=f"elb-load-{n}", daemon=True) for n in range(workers)]
    for thread in threads:
        thread.start()
    try:
        yield result
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def create_target_group(endpoint_url: str, name: str = "web", *, delay_s: int = 30) -> str:
    """A target group in moto (through `endpoint_url`) as the e2e tests use it: HTTP on port 80,
    GET /health every 5 s (AWS's shortest), healthy after 2 passes, unhealthy after 2 failures,
    deregistration delay `delay_s`. Its ARN."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint_url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=endpoint_url)
    group = elbv2.create_target_group(
        Name=name, Protocol="HTTP", Port=80, VpcId=vpc, TargetType="instance", HealthCheckPath="/health",
        HealthCheckIntervalSeconds=5, HealthCheckTimeoutSeconds=2, HealthyThresholdCount=2, UnhealthyThresholdCount=2,
    )["TargetGroups"][0]["TargetGroupArn"]  # fmt: skip
    elbv2.modify_target_group_attributes(
        TargetGroupArn=group, Attributes=[{"Key": DEREGISTRATION_DELAY, "Value": str(delay_s)}]
    )
    return str(group)
