"""Behind a load balancer: real agents leave and rejoin a target group around each release switch.

moto's ELBv2 has no time (healthy at once, unused at once); `tests/elb_fake.py` gives its target
group ELB's states and timing on loopback at 0.1× (one health-check interval is 0.5 s) and a
balancer that sends requests only to healthy targets. Each agent's app (`tests/webapp.py`) is
restarted by the release's post hook, with a moment where nothing listens: a request sent to it
then fails. A load client counts every request that failed while the fleet was deployed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from deployer.protocol.report import ComponentState
from publisher.rollout import EXIT_ROLLED_BACK
from tests.elb_fake import AGENT_BEHIND_FAKE, TargetHealthFake, balancer, create_target_group, elb_proxy, load
from tests.support import (
    REGION,
    AgentProcess,
    Fleet,
    cli,
    free_port,
    kill_hard,
    kill_pid_file,
    make_tree,
    publish_args,
    wait_until,
)
from tests.webapp import template_file

pytestmark = pytest.mark.moto_only(reason="ELBv2 target groups: LocalStack's community core has no ELBv2")

FAST = ("--heartbeat-ttl", "8", "--poll-interval", "0.3", "--timeout", "120")


@dataclass
class WebFleet:
    fleet: Fleet
    fake: TargetHealthFake
    group_arn: str
    agents: list[AgentProcess]
    tmp_path: Path

    def publish(self, name: str, *extra: str, files: dict[str, str] | None = None) -> tuple[int, str]:
        build = make_tree(self.tmp_path / f"build-{name}", {"index.html": name, **(files or {})})
        template = template_file(self.tmp_path / f"{name}.yml")
        args = publish_args(self.fleet, build, "--manifest", str(template), "--release-id", name, "--wait", *FAST)
        done = cli(*args, *extra, env={"AWS_ENDPOINT_URL": self.fake.url})
        return done.returncode, done.stdout + done.stderr

    def healthy(self) -> set[str]:
        return {
            a.instance_id or ""
            for a in self.agents
            if self.fake.state(self.group_arn, a.instance_id or "") == "healthy"
        }


@pytest.fixture
def web_fleet(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess], request: pytest.FixtureRequest
) -> Iterator[WebFleet]:
    """Four instances serving v1 behind a target group (interval 5 s, healthy after 2, delay 30 s, at 0.1×)."""
    size = getattr(request, "param", 4)
    with elb_proxy(fleet.endpoint_url) as fake:
        group = create_target_group(fake.url)
        elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=fake.url)
        agents = []
        for n in range(size):
            port = free_port()
            instance = f"i-web{n:013d}"
            fake.bind(instance, port)
            env = {"APP_PORT": str(port), "APP_PIDFILE": str(tmp_path / f"app-{n}.pid")}
            agents.append(
                start_agent(
                    instance,
                    env=env,
                    endpoint_url=fake.url,
                    target_group_arns=[group],
                    traffic_port=port,
                    **AGENT_BEHIND_FAKE,
                )
            )
        web = WebFleet(fleet, fake, group, agents, tmp_path)
        try:
            # Not registered yet (Auto Scaling registers an instance when it enters service): applied in place.
            code, out = web.publish("v1")
            assert code == 0, out
            elbv2.register_targets(TargetGroupArn=group, Targets=[{"Id": a.instance_id or ""} for a in agents])
            wait_until(lambda: len(web.healthy()) == size, "every instance healthy behind the load balancer")
            yield web
        finally:
            for n in range(size):
                kill_pid_file(tmp_path / f"app-{n}.pid")


def out_of_service_at_once(fake: TargetHealthFake, instances: list[str], group: str, since: float) -> int:
    """The most instances that were not `healthy` at the same moment after `since`."""
    changes = sorted((t, i, state) for i in instances for t, g, state in fake.history(i) if g == group and t >= since)
    current = dict.fromkeys(instances, "healthy")
    worst = 0
    for _t, instance, state in changes:
        current[instance] = state
        worst = max(worst, sum(1 for s in current.values() if s != "healthy"))
    return worst


def test_a_rolling_deploy_in_two_waves_loses_no_request(web_fleet: WebFleet) -> None:
    web = web_fleet
    with balancer(web.fake, web.group_arn) as front, load(front.url) as result:
        time.sleep(0.5)
        started = time.monotonic()
        code, out = web.publish(
            "v2", "--waves", "2,100%", "--target-group", web.group_arn, "--min-healthy-percent", "50"
        )
        time.sleep(0.5)
    assert code == 0, out
    assert "OK: rollout of prod/web/api seq 2 done in 2 waves" in out
    assert result.failed == [], (result.failed[:10], out)
    assert result.bodies["v1"] > 0, result.bodies
    assert result.bodies["v2"] > 0, result.bodies
    assert all(agent.served() == "v2" for agent in web.agents)
    ids = [a.instance_id or "" for a in web.agents]
    assert out_of_service_at_once(web.fake, ids, web.group_arn, started) == 2  # one wave at a time
    assert web.healthy() == set(ids)
    for agent in web.agents:
        drained = agent.events("traffic_drained")[-1]
        assert drained["why"] in ("no_connections", "deregistered"), drained  # never the 30 s delay
        assert agent.events("traffic_healthy"), agent.log_path.read_text()[-2000:]


def test_a_first_wave_that_would_take_the_group_under_its_healthy_minimum_is_refused_before_publishing(
    web_fleet: WebFleet,
) -> None:
    web = web_fleet
    # Only 2 of 4 may be out (50 %); a first wave of 3 never gets the capacity.
    code, out = web.publish("v2", "--waves", "3,100%", "--target-group", web.group_arn, "--min-healthy-percent", "50")
    assert code != 0, out
    assert "wave 0 refused" in out, out
    assert "under --min-healthy-percent 50 (2)" in out, out
    assert "nothing was published" in out
    assert all(agent.served() == "v1" for agent in web.agents)


def test_a_release_the_load_balancer_finds_unhealthy_is_rolled_back_and_registered_again(web_fleet: WebFleet) -> None:
    web = web_fleet
    with balancer(web.fake, web.group_arn) as front, load(front.url) as result:
        code, out = web.publish("v2", "--waves", "1,100%", "--max-failed", "0", files={"unhealthy": "yes"})
        time.sleep(0.3)
    assert code == EXIT_ROLLED_BACK, out
    assert result.failed == [], (result.failed[:10], out)
    failed = [
        a for a in web.agents if any("register_unhealthy" in str(e.get("error")) for e in a.events("apply_failed"))
    ]
    assert len(failed) == 1, out
    [victim] = failed
    wait_until(lambda: victim.served() == "v1", "the failed instance back on v1")
    wait_until(lambda: len(web.healthy()) == len(web.agents), "every instance healthy again")
    errors = [str(e.get("error")) for e in victim.events("apply_failed")]
    assert any("re-registered the running release, healthy" in e for e in errors), errors


@pytest.mark.parametrize("web_fleet", [1], indirect=True)
def test_an_agent_killed_while_out_of_service_registers_again_when_it_comes_back(web_fleet: WebFleet) -> None:
    web = web_fleet
    [agent] = web.agents
    build = make_tree(web.tmp_path / "build-slow", {"index.html": "slow"})
    # The first run of its post hooks hangs (the test kills the agent then); a resumed one does not.
    once = 'test -f "$DEPLOYER_RELEASE_DIR/../../slept" || { touch "$DEPLOYER_RELEASE_DIR/../../slept"; sleep 30; }'
    template = template_file(web.tmp_path / "slow.yml", first=(once,))
    args = publish_args(web.fleet, build, "--manifest", str(template), "--release-id", "slow")
    assert cli(*args, env={"AWS_ENDPOINT_URL": web.fake.url}).returncode == 0
    wait_until(lambda: bool(agent.events("traffic_drained")), "the instance out of service")
    kill_hard(agent)
    assert web.fake.state(web.group_arn, agent.instance_id or "") in ("draining", "unused")
    assert (Path(agent.config["state_dir"]) / "traffic.json").exists()  # what it took out, for the next start
    agent.start()
    # The restarted agent resumes the apply (its slow hook again) or registers at boot: either way it is back.
    wait_until(lambda: web.healthy() == {agent.instance_id}, "the instance healthy again", timeout=60)
    marker = Path(agent.config["state_dir"]) / "traffic.json"
    wait_until(lambda: not marker.exists(), "the agent to see it healthy and drop its marker")
    assert agent.served() == "slow"


def test_a_target_group_that_does_not_exist_is_reported_and_nothing_is_applied(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    missing = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/gone/0123456789abcdef"
    with elb_proxy(fleet.endpoint_url) as fake:
        env = {"APP_PORT": str(free_port()), "APP_PIDFILE": str(tmp_path / "app.pid")}
        agent = start_agent(env=env, endpoint_url=fake.url, target_group_arns=[missing], **AGENT_BEHIND_FAKE)
        build = make_tree(tmp_path / "build-v1", {"index.html": "v1"})
        template = template_file(tmp_path / "v1.yml")
        args = publish_args(fleet, build, "--manifest", str(template), "--release-id", "v1")
        assert cli(*args).returncode == 0
        wait_until(lambda: agent.component().state is ComponentState.FAILED, "the failure reported")
        assert "target_group_not_found" in (agent.component().error or "")
        assert not (agent.root / "opt" / "api" / "current").exists()
        assert agent.alive()
