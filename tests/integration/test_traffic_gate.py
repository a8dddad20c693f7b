"""The load-balancer gate and the terminate hook in process, against the emulated ELB and Auto
Scaling (tests/elb_fake.py, tests/asg_fake.py): the faults a rolling deploy meets.

A deregistration ELB never applies, a request still in flight when the drain starts, an app
whose release ELB never finds healthy, a hook that expired before the agent got to it.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import boto3
import pytest

from deployer.agent.termination import TerminateHook
from deployer.agent.traffic import MARKER_NAME, TrafficGate, TrafficSettings
from deployer.aws.clients import autoscaling_client, elbv2_client
from deployer.local.emulator import Emulator
from deployer.protocol.errors import TargetUnhealthy, TrafficUnavailable
from tests.asg_fake import LifecycleFake
from tests.awsproxy import aws_proxy
from tests.elb_fake import TargetHealthFake, balancer, create_target_group, elb_proxy
from tests.support import FAST_POLICY, REGION, group_with_hook, loopback_server, wait_until

pytestmark = pytest.mark.moto_only(reason="ELBv2 and Auto Scaling: LocalStack's community core has neither")

INSTANCE = "i-0gate000000000001"


class App:
    """The instance's app on loopback: healthy or not; `/slow` holds a request until released."""

    def __init__(self) -> None:
        self.healthy = True
        self.release = threading.Event()


def serve(app: App) -> AbstractContextManager[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/slow":
                app.release.wait(10)
            status = 500 if self.path == "/health" and not app.healthy else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    return loopback_server(Handler)


@pytest.fixture
def behind(aws_env: Emulator) -> Iterator[tuple[TargetHealthFake, str, App, int]]:
    """One instance registered and healthy in a group (delay 30 s, 3 s at 0.1×); its app and port."""
    app = App()
    with elb_proxy(aws_env.url) as fake, serve(app) as url:
        port = int(url.rsplit(":", 1)[1])
        group = create_target_group(fake.url)
        fake.bind(INSTANCE, port)
        boto3.client("elbv2", region_name=REGION, endpoint_url=fake.url).register_targets(
            TargetGroupArn=group, Targets=[{"Id": INSTANCE}]
        )
        wait_until(lambda: fake.state(group, INSTANCE) == "healthy", "the instance healthy")
        yield fake, group, app, port


def gate(
    fake: TargetHealthFake, group: str, port: int, state_dir: Path, elbv2: Any = None, **settings: Any
) -> TrafficGate:
    options = {"poll_seconds": 0.1, "drain_timeout_seconds": 2.0, "healthy_timeout_seconds": 4.0, **settings}
    return TrafficGate(
        elbv2 or elbv2_client(REGION, fake.url),
        TrafficSettings(groups=lambda: (group,), port=port, **options),
        instance_id=INSTANCE,
        state_dir=state_dir,
        policy=FAST_POLICY,
        interrupt=threading.Event(),
    )


class IgnoredDeregistration:
    """An elbv2 client whose DeregisterTargets succeeds without taking effect (a fault, not ELB's way)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def deregister_targets(self, **_: Any) -> dict[str, Any]:
        return {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_deregistration_that_never_takes_effect_is_a_drain_timeout_and_the_instance_stays_registered(
    behind: tuple[TargetHealthFake, str, App, int], tmp_path: Path
) -> None:
    fake, group, _, port = behind
    stuck = gate(fake, group, port, tmp_path, IgnoredDeregistration(elbv2_client(REGION, fake.url)))
    with pytest.raises(TrafficUnavailable, match="traffic_drain_timeout: ELB did not take the instance out"):
        stuck.leave()
    assert (tmp_path / MARKER_NAME).exists()  # taken out, as far as the agent knows: put back by settle
    assert stuck.settle() == "re-registered the running release, healthy"
    assert not (tmp_path / MARKER_NAME).exists()
    assert fake.state(group, INSTANCE) == "healthy"


def test_a_drain_waits_for_the_request_in_flight_and_no_longer(
    behind: tuple[TargetHealthFake, str, App, int], tmp_path: Path
) -> None:
    fake, group, app, port = behind
    with balancer(fake, group) as front:
        answered: list[int] = []
        slow = threading.Thread(target=lambda: answered.append(urllib.request.urlopen(front.url + "/slow").status))
        slow.start()
        wait_until(lambda: fake.in_flight(group, INSTANCE) == 1, "a request in flight")
        threading.Timer(0.8, app.release.set).start()
        started = time.monotonic()
        gate(fake, group, port, tmp_path).leave()
        drained = time.monotonic() - started
        slow.join()
    assert answered == [200]  # the request in flight finished before the app was touched
    assert 0.7 <= drained < 2.5  # ended with the request, not at the 3 s deregistration delay
    assert fake.state(group, INSTANCE) == "draining"


def test_a_release_elb_never_finds_healthy_is_register_unhealthy_and_the_previous_one_is_waited_for(
    behind: tuple[TargetHealthFake, str, App, int], tmp_path: Path
) -> None:
    fake, group, app, port = behind
    out = gate(fake, group, port, tmp_path)
    out.leave()
    app.healthy = False  # the new release answers its health check with 500
    with pytest.raises(TargetUnhealthy, match=r"register_unhealthy: the new release is not healthy .*unhealthy"):
        out.rejoin()
    app.healthy = True  # rolled back: the previous release answers again
    assert out.settle() == "re-registered the running release, healthy"
    assert fake.state(group, INSTANCE) == "healthy"


def test_a_target_group_that_does_not_exist_is_named_before_anything_is_taken_out(
    behind: tuple[TargetHealthFake, str, App, int], tmp_path: Path
) -> None:
    fake, _, _, port = behind
    missing = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/gone/0123456789abcdef"
    with pytest.raises(TrafficUnavailable, match=f"target_group_not_found: target group {missing}"):
        gate(fake, missing, port, tmp_path).leave()
    assert not (tmp_path / MARKER_NAME).exists()


def test_a_terminate_hook_that_expired_is_neither_heartbeated_nor_completed_and_says_so(aws_env: Emulator) -> None:
    instance = group_with_hook(aws_env.url, "leave", "EC2_INSTANCE_TERMINATING", 30, "CONTINUE")
    fake = LifecycleFake(aws_env.url, time_scale=0.02)  # the 30 s timeout lasts 0.6 s
    with aws_proxy(aws_env.url, fake) as proxy:
        hook = TerminateHook(autoscaling_client(REGION, proxy.url), "leave", instance, FAST_POLICY)
        fake.terminate(instance)
        assert hook.heartbeat() is True
        assert hook.heartbeat_timeout() == 1  # the fake's scaled HeartbeatTimeout, rounded up
        time.sleep(0.8)
        assert fake.outcome(instance) == "default:CONTINUE"
        assert hook.heartbeat() is False
        assert hook.complete() is False
