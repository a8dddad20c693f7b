"""The ELBv2 target-health fake (tests/elb_fake.py) against moto: its states and timings as AWS
documents them, its errors as botocore parses them, and its balancer's routing.

Every boto3 call goes through the fake's proxy, so creating the VPC and the target group also
shows that what the fake does not answer reaches moto unchanged. One health-check interval is
5 s × 0.1 = 0.5 s; a target is healthy two passing checks, about a second, after it registers.
The module shares one fake (reset for each test, which makes its own VPC and group in a moto
that `aws_env` reset): the proxy takes up to half a second to shut down.
"""

from __future__ import annotations

import threading
import time
import urllib.error
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.exceptions import ClientError

from deployer.local.emulator import Emulator
from tests.awsproxy import DIRECT
from tests.elb_fake import (
    DEREGISTRATION_DELAY,
    MIN_DRAIN_SECONDS,
    POLL_SECONDS,
    TICK_SECONDS,
    LoopbackBalancer,
    State,
    TargetHealthFake,
    balancer,
    elb_proxy,
    load,
)
from tests.support import REGION, wait_until

if TYPE_CHECKING:
    from mypy_boto3_elbv2 import ElasticLoadBalancingv2Client

MOTO_ONLY = pytest.mark.moto_only(reason="ELBv2: LocalStack's community core has no Elastic Load Balancing")
#: The group's settings in AWS seconds, and what they are at the fake's 0.1×.
INTERVAL = 5 * 0.1
HEALTHY_AFTER = 2 * INTERVAL
#: Timing slack for the fake's tick and the test's polling (both 50 ms at most).
SLACK = 2 * TICK_SECONDS


class App(BaseHTTPRequestHandler):
    """A target's app: answers its `body` with `status`; `/slow` waits until released (or 5 s)."""

    body = ""
    status = 200
    release = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/slow":
            self.release.wait(5)
        data = self.body.encode()
        try:
            self.send_response(self.status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the balancer cut the request (its deregistration delay elapsed)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """`loopback_server` with a short poll: its shutdown would wait up to 0.5 s per app, in every test."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_SECONDS}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET (an error status too)."""
    try:
        with DIRECT.open(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


@dataclass
class Lab:
    """The fake in front of moto, a target group in a VPC (created through the fake), and apps."""

    fake: TargetHealthFake
    elbv2: ElasticLoadBalancingv2Client
    group_arn: str
    stack: ExitStack
    apps: list[type[App]] = field(default_factory=list)

    def app(self, instance_id: str, body: str, stack: ExitStack | None = None) -> type[App]:
        """Start an app answering `body` and bind `instance_id` to its port (until `stack` closes)."""
        handler: type[App] = type("App", (App,), {"body": body, "release": threading.Event()})
        self.fake.bind(instance_id, (stack or self.stack).enter_context(serve(handler)))
        self.apps.append(handler)
        return handler

    def register(self, *instances: str) -> None:
        self.elbv2.register_targets(TargetGroupArn=self.group_arn, Targets=[{"Id": i} for i in instances])

    def deregister(self, *instances: str) -> None:
        self.elbv2.deregister_targets(TargetGroupArn=self.group_arn, Targets=[{"Id": i} for i in instances])

    def health(self, *instances: str) -> dict[str, tuple[str, str]]:
        """DescribeTargetHealth through the proxy: instance → (state, reason); every target without names."""
        if instances:
            found = self.elbv2.describe_target_health(
                TargetGroupArn=self.group_arn, Targets=[{"Id": i} for i in instances]
            )["TargetHealthDescriptions"]
        else:
            found = self.elbv2.describe_target_health(TargetGroupArn=self.group_arn)["TargetHealthDescriptions"]
        return {d["Target"]["Id"]: (d["TargetHealth"]["State"], d["TargetHealth"].get("Reason", "")) for d in found}

    def wait_for(self, instance_id: str, state: str, timeout: float = 5) -> None:
        wait_until(lambda: self.health(instance_id)[instance_id][0] == state, f"{instance_id} {state}", timeout)

    def set_delay(self, aws_seconds: int) -> None:
        self.elbv2.modify_target_group_attributes(
            TargetGroupArn=self.group_arn, Attributes=[{"Key": DEREGISTRATION_DELAY, "Value": str(aws_seconds)}]
        )

    def changes(self, instance_id: str) -> list[tuple[float, str]]:
        return [(at, state) for at, _, state in self.fake.history(instance_id)]


@pytest.fixture(scope="module")
def shared_fake(emulator: Emulator) -> Iterator[TargetHealthFake]:
    """One fake and proxy for the module: the proxy's shutdown waits up to 0.5 s (its server's poll),
    which every test would otherwise pay. `lab` resets it."""
    with elb_proxy(emulator.url) as fake:
        yield fake


@pytest.fixture
def lab(aws_env: Emulator, shared_fake: TargetHealthFake) -> Iterator[Lab]:
    fake = shared_fake
    assert fake.upstream == aws_env.url  # aws_env reset moto: each test makes its own VPC and group
    fake.reset()
    fake.unused_when_drained = False
    assert fake.proxy is not None
    fake.proxy.reset_counts()
    with ExitStack() as stack:
        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=fake.url)
        elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=fake.url)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        [group] = elbv2.create_target_group(
            Name="web",
            Protocol="HTTP",
            Port=80,
            VpcId=vpc,
            TargetType="instance",
            HealthCheckIntervalSeconds=5,
            HealthyThresholdCount=2,
            UnhealthyThresholdCount=2,
            HealthCheckTimeoutSeconds=2,
        )["TargetGroups"]
        elbv2.modify_target_group_attributes(
            TargetGroupArn=group["TargetGroupArn"], Attributes=[{"Key": DEREGISTRATION_DELAY, "Value": "30"}]
        )
        lab = Lab(fake, elbv2, group["TargetGroupArn"], stack)
        try:
            yield lab
        finally:
            for app in lab.apps:  # let requests held open end, so no handler outlives the test
                app.release.set()
            fake.reset()  # nothing checked against apps that are gone


def slow_request(
    front: LoopbackBalancer, pool: ThreadPoolExecutor, lab: Lab, instance_id: str
) -> Future[tuple[int, str]]:
    """A GET of /slow through the balancer, once it is in flight to `instance_id`."""
    future = pool.submit(get, front.url + "/slow")
    wait_until(lambda: lab.fake.in_flight(lab.group_arn, instance_id) == 1, "the slow request in flight", 5)
    return future


@MOTO_ONLY
def test_a_registered_target_is_initial_until_healthy_threshold_checks_pass(lab: Lab) -> None:
    lab.app("i-a", "a")
    lab.register("i-a")
    [described] = lab.elbv2.describe_target_health(TargetGroupArn=lab.group_arn)["TargetHealthDescriptions"]
    assert described["Target"] == {"Id": "i-a", "Port": 80}
    assert described["HealthCheckPort"] == "80"  # traffic-port, as the port AWS checks
    assert described["TargetHealth"] == {
        "State": "initial",
        "Reason": "Elb.RegistrationInProgress",
        "Description": "Target registration is in progress",
    }
    reasons = set()
    while (health := lab.health("i-a")["i-a"])[0] == State.INITIAL:
        reasons.add(health[1])
        time.sleep(0.05)
    assert health == (State.HEALTHY, "")
    assert reasons == {"Elb.RegistrationInProgress", "Elb.InitialHealthChecking"}
    [(registered, _), (healthy, _)] = lab.changes("i-a")
    # The first check one interval after registering, the second one interval later: both must pass.
    assert HEALTHY_AFTER - SLACK <= healthy - registered <= HEALTHY_AFTER + 2 * INTERVAL
    lab.register("i-a")  # registering a registered target changes nothing
    assert lab.fake.state(lab.group_arn, "i-a") == State.HEALTHY
    assert len(lab.changes("i-a")) == 2
    assert lab.fake.proxy is not None
    assert lab.fake.proxy.calls[("elasticloadbalancing", "CreateTargetGroup")] == 1  # passed through to moto
    assert lab.fake.proxy.refused[("elasticloadbalancing", "RegisterTargets", 200)] == 2  # answered by the fake


@MOTO_ONLY
def test_a_deregistered_target_drains_until_no_request_is_in_flight(lab: Lab) -> None:
    lab.set_delay(7)  # 0.7 s at 0.1×
    lab.app("i-a", "a")
    lab.register("i-a")
    lab.wait_for("i-a", State.HEALTHY)
    with balancer(lab.fake, lab.group_arn) as front, ThreadPoolExecutor(1) as pool:
        held = slow_request(front, pool, lab, "i-a")
        lab.deregister("i-a")
        assert lab.health("i-a")["i-a"] == (State.DRAINING, "Target.DeregistrationInProgress")
        assert get(front.url) == (503, "no healthy target")  # no new request to a draining target
        time.sleep(MIN_DRAIN_SECONDS + SLACK)
        assert lab.fake.drained(lab.group_arn, "i-a") is None  # a request is still in flight
        [app] = lab.apps
        app.release.set()
        assert held.result(timeout=5) == (200, "a")  # the request in flight finishes
        finished = time.monotonic()
    wait_until(lambda: lab.fake.drained(lab.group_arn, "i-a") is not None, "the deregistration to complete", 2)
    drained = lab.fake.drained(lab.group_arn, "i-a")
    assert drained is not None
    assert drained <= finished + SLACK
    # Complete, but shown draining until the delay has elapsed, as AWS shows it.
    assert lab.health("i-a")["i-a"][0] == State.DRAINING
    lab.wait_for("i-a", State.UNUSED)
    assert lab.health("i-a")["i-a"] == (State.UNUSED, "Target.NotRegistered")
    [_, _, (draining, state), (unused, _)] = lab.changes("i-a")
    assert state == State.DRAINING
    assert 0.7 - SLACK <= unused - draining <= 0.7 + 2 * SLACK
    assert lab.health() == {}  # DescribeTargetHealth without targets lists none that is unused


@MOTO_ONLY
def test_with_unused_when_drained_a_target_is_unused_once_nothing_is_in_flight(lab: Lab) -> None:
    lab.fake.unused_when_drained = True
    lab.app("i-a", "a")
    lab.register("i-a")
    lab.wait_for("i-a", State.HEALTHY)
    with balancer(lab.fake, lab.group_arn) as front, ThreadPoolExecutor(1) as pool:
        held = slow_request(front, pool, lab, "i-a")
        lab.deregister("i-a")
        time.sleep(MIN_DRAIN_SECONDS + SLACK)
        assert lab.health("i-a")["i-a"][0] == State.DRAINING
        lab.apps[0].release.set()
        assert held.result(timeout=5) == (200, "a")
        finished = time.monotonic()
    lab.wait_for("i-a", State.UNUSED, timeout=1)  # not the 3 s of the group's delay
    [_, _, (draining, _), (unused, _)] = lab.changes("i-a")
    assert unused <= finished + SLACK
    assert unused - draining < 1.0  # well before the group's delay (30 s, 3 s at 0.1×)
    # Without a request in flight, draining still shows for MIN_DRAIN_SECONDS.
    lab.register("i-a")
    lab.deregister("i-a")
    assert lab.health("i-a")["i-a"][0] == State.DRAINING
    lab.wait_for("i-a", State.UNUSED, timeout=1)
    [*_, (again, _), (gone, _)] = lab.changes("i-a")
    assert MIN_DRAIN_SECONDS <= gone - again <= MIN_DRAIN_SECONDS + 2 * SLACK


@MOTO_ONLY
def test_a_deregistered_target_drains_at_most_the_deregistration_delay(lab: Lab) -> None:
    lab.set_delay(5)  # 0.5 s at 0.1×
    lab.app("i-a", "a")
    lab.register("i-a")
    lab.wait_for("i-a", State.HEALTHY)
    with balancer(lab.fake, lab.group_arn) as front, ThreadPoolExecutor(1) as pool:
        held = slow_request(front, pool, lab, "i-a")  # held open until the test ends
        lab.deregister("i-a")
        # The delay elapsed with the request in flight: ELB is done with the target and cuts it.
        assert held.result(timeout=5) == (502, "deregistration delay elapsed")
    assert lab.health("i-a")["i-a"] == (State.UNUSED, "Target.NotRegistered")
    [_, _, (draining, _), (unused, _)] = lab.changes("i-a")
    assert 0.5 - SLACK <= unused - draining <= 0.5 + 2 * SLACK
    drained = lab.fake.drained(lab.group_arn, "i-a")
    assert drained is not None
    assert abs(drained - unused) < SLACK
    assert [r.status for r in front.routed] == [502]


@MOTO_ONLY
def test_a_target_group_that_does_not_exist_is_target_group_not_found(lab: Lab) -> None:
    gone = lab.group_arn.rsplit("/", 1)[0] + "/0123456789abcdef"
    calls = (
        lambda: lab.elbv2.describe_target_health(TargetGroupArn=gone),
        lambda: lab.elbv2.register_targets(TargetGroupArn=gone, Targets=[{"Id": "i-a"}]),
        lambda: lab.elbv2.deregister_targets(TargetGroupArn=gone, Targets=[{"Id": "i-a"}]),
    )
    for call in calls:
        with pytest.raises(ClientError) as raised:
            call()
        error = raised.value.response["Error"]
        assert (error["Code"], error["Message"]) == ("TargetGroupNotFound", f"Target groups '{gone}' not found")
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert type(raised.value).__name__ == "TargetGroupNotFoundException"  # botocore's modelled error
    lab.register("i-a")
    lab.elbv2.delete_target_group(TargetGroupArn=lab.group_arn)  # through the proxy, to moto
    with pytest.raises(ClientError, match="TargetGroupNotFound"):
        lab.health("i-a")


@MOTO_ONLY
def test_the_balancer_never_sends_a_request_to_a_draining_or_initial_target(lab: Lab) -> None:
    lab.set_delay(5)  # 0.5 s at 0.1×
    lab.app("i-a", "a")
    lab.app("i-b", "b")
    lab.register("i-a")
    time.sleep(INTERVAL)
    lab.register("i-b")  # healthy an interval after i-a
    lab.wait_for("i-a", State.HEALTHY)
    with balancer(lab.fake, lab.group_arn) as front, load(front.url) as result:
        assert lab.health("i-b")["i-b"][0] == State.INITIAL
        lab.wait_for("i-b", State.HEALTHY)
        time.sleep(0.2)  # both serve for a while
        lab.deregister("i-a")  # a rolling swap: b in, then a out
        lab.wait_for("i-a", State.UNUSED)
    assert result.failed == []
    assert result.bodies["a"] > 0
    assert result.bodies["b"] > 0
    assert result.ok == sum(result.bodies.values()) == len(front.routed)
    assert front.served == {"i-a": result.bodies["a"], "i-b": result.bodies["b"]}
    b_healthy = next(at for at, state in lab.changes("i-b") if state == State.HEALTHY)
    a_draining = next(at for at, state in lab.changes("i-a") if state == State.DRAINING)
    assert all(r.picked_at >= b_healthy for r in front.routed if r.instance_id == "i-b")
    assert all(r.picked_at < a_draining for r in front.routed if r.instance_id == "i-a")


@MOTO_ONLY
def test_a_target_whose_app_stops_answering_becomes_unhealthy(lab: Lab) -> None:
    """i-a's app stops once healthy; i-b's answers 503 from the start, then 200; nothing listens for i-c."""
    with ExitStack() as app_stack:
        lab.app("i-a", "a", stack=app_stack)
        erring = lab.app("i-b", "b")
        erring.status = 503
        lab.register("i-a", "i-b", "i-c")
        lab.wait_for("i-a", State.HEALTHY)
        lab.wait_for("i-b", State.UNHEALTHY)
        lab.wait_for("i-c", State.UNHEALTHY)
    stopped = time.monotonic()  # connections to i-a's port are refused from now on
    erring.status = 200
    # An initial target that fails its checks stays initial until UnhealthyThresholdCount failures.
    [(registered, _), (b_unhealthy, _)] = lab.changes("i-b")
    assert 2 * INTERVAL - SLACK <= b_unhealthy - registered <= 3 * INTERVAL
    [described] = lab.elbv2.describe_target_health(TargetGroupArn=lab.group_arn, Targets=[{"Id": "i-b"}])[
        "TargetHealthDescriptions"
    ]
    assert described["TargetHealth"] == {
        "State": "unhealthy",
        "Reason": "Target.ResponseCodeMismatch",
        "Description": "Health checks failed with these codes: [503]",
    }
    assert lab.health("i-c")["i-c"] == (State.UNHEALTHY, "Target.FailedHealthChecks")
    lab.wait_for("i-a", State.UNHEALTHY)
    assert lab.health("i-a")["i-a"] == (State.UNHEALTHY, "Target.FailedHealthChecks")
    # Two failed checks: the next one within an interval of the stop, the second an interval later.
    a_unhealthy = lab.changes("i-a")[-1][0]
    assert INTERVAL - SLACK <= a_unhealthy - stopped <= 2 * INTERVAL + SLACK
    assert [state for _, state in lab.changes("i-a")] == ["initial", "healthy", "unhealthy"]
    lab.wait_for("i-b", State.HEALTHY)  # unhealthy → healthy after HealthyThresholdCount passes
    b_healthy = lab.changes("i-b")[-1][0]
    assert HEALTHY_AFTER - SLACK <= b_healthy - b_unhealthy <= HEALTHY_AFTER + INTERVAL + SLACK
    with balancer(lab.fake, lab.group_arn) as front:
        assert [get(front.url) for _ in range(4)] == [(200, "b")] * 4  # never the unhealthy i-a or i-c
        assert front.served == {"i-b": 4}


@MOTO_ONLY
def test_registering_a_draining_target_makes_it_initial_and_describe_lists_every_registered_target(lab: Lab) -> None:
    lab.register("i-a", "i-b")
    lab.elbv2.register_targets(TargetGroupArn=lab.group_arn, Targets=[{"Id": "i-a", "Port": 8080}])
    lab.deregister("i-a")  # port 80, the group's
    found = lab.elbv2.describe_target_health(TargetGroupArn=lab.group_arn)["TargetHealthDescriptions"]
    assert sorted((d["Target"]["Id"], d["Target"]["Port"], d["TargetHealth"]["State"]) for d in found) == [
        ("i-a", 80, "draining"),
        ("i-a", 8080, "initial"),
        ("i-b", 80, "initial"),
    ]
    assert lab.health("i-c") == {"i-c": (State.UNUSED, "Target.NotRegistered")}
    lab.register("i-a")
    assert lab.fake.state(lab.group_arn, "i-a", 80) == State.INITIAL
    assert [state for _, state in lab.changes("i-a")] == ["initial", "initial", "draining", "initial"]
    with pytest.raises(ValueError, match="name one"):
        lab.fake.state(lab.group_arn, "i-a")
