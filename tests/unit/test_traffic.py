"""The load-balancer gate's pure decisions, and its configuration keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployer.agent.config import config_from_dict
from deployer.agent.traffic import (
    Verdict,
    connections_on,
    drain_over,
    established,
    health_verdict,
    healthy_wait_seconds,
)
from deployer.aws.elb import GroupSettings, Health, Target
from deployer.protocol.errors import ConfigError, ManifestError
from deployer.protocol.manifest import Traffic, parse_manifest

GROUP = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef"
#: A /proc/net/tcp excerpt: a listener on 8080 (0A), two established connections to it (one from
#: the load balancer, one from a health check), an established connection *from* port 8080's
#: neighbour to somewhere else, and one in TIME_WAIT (06).
TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0
   2: 0100007F:1F90 0100007F:D432 01 00000000:00000000 00:00000000 00000000  1000        0 3 1 0
   3: 0100007F:D433 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 4 1 0
   4: 0100007F:1F90 0100007F:D434 06 00000000:00000000 00:00000000 00000000  1000        0 5 1 0
   5: garbage
"""


def test_established_counts_connections_accepted_on_the_app_port_only() -> None:
    assert established(TABLE, [8080]) == 2
    assert established(TABLE, [80]) == 0
    assert established(TABLE, [8080, 0xD433]) == 3
    assert established("", [8080]) == 0


def test_connections_on_reads_every_table_and_skips_a_missing_one(tmp_path: Path) -> None:
    tcp = tmp_path / "tcp"
    tcp.write_text(TABLE)
    assert connections_on([8080], (tcp, tmp_path / "tcp6")) == 2


def test_drain_ends_at_no_connections_at_the_delay_or_when_elb_is_done() -> None:
    assert drain_over(elapsed=0.5, delay=300, connections=3, states=["draining"]) is None
    assert drain_over(elapsed=0.5, delay=300, connections=0, states=["draining"]) == "no_connections"
    assert drain_over(elapsed=300, delay=300, connections=3, states=["draining"]) == "deregistration_delay"
    assert drain_over(elapsed=1, delay=300, connections=3, states=["unused", "unused"]) == "deregistered"
    assert drain_over(elapsed=1, delay=300, connections=3, states=["unused", "draining"]) is None


def _health(*states: str) -> list[Health]:
    return [Health(Target(GROUP, "i-1", 80 + n), state) for n, state in enumerate(states)]


def test_healthy_only_when_every_target_is_and_unhealthy_as_soon_as_one_is() -> None:
    assert health_verdict(_health("healthy", "healthy")) is Verdict.HEALTHY
    assert health_verdict(_health("healthy", "initial")) is Verdict.WAITING
    assert health_verdict(_health("initial", "unhealthy")) is Verdict.UNHEALTHY
    assert health_verdict(_health("unused")) is Verdict.WAITING
    assert health_verdict([]) is Verdict.WAITING


def test_the_healthy_wait_is_twice_threshold_plus_one_intervals_of_the_slowest_group() -> None:
    alb_default = GroupSettings(GROUP, 80, interval_s=30, healthy_threshold=5, deregistration_delay_s=300)
    fast = GroupSettings(GROUP, 80, interval_s=5, healthy_threshold=2, deregistration_delay_s=30)
    assert healthy_wait_seconds([fast]) == 30
    assert healthy_wait_seconds([fast, alb_default]) == 360


def test_a_manifest_may_opt_out_of_traffic_management_and_says_so_when_written_back() -> None:
    assert parse_manifest("commands: {post: ['true']}\n").traffic is Traffic.MANAGED
    none = parse_manifest("traffic: none\ncommands: {post: ['true']}\n")
    assert none.traffic is Traffic.NONE
    assert "traffic: none" in none.to_yaml()
    assert parse_manifest(none.to_yaml()) == none
    with pytest.raises(ManifestError, match="traffic 'off' is not one of managed, none"):
        parse_manifest("traffic: 'off'\n")


BASE = {
    "stage": "prod",
    "role": "web",
    "components": ["api"],
    "bucket": "fleet-bucket",
    "topic_arn": "arn:aws:sns:us-east-1:123456789012:deploys",
}


def test_target_groups_are_arns_or_auto_and_every_traffic_key_is_checked() -> None:
    assert not config_from_dict(BASE).behind_load_balancer
    named = config_from_dict({**BASE, "target_group_arns": [GROUP], "traffic_port": 8080})
    assert named.target_group_arns == (GROUP,)
    assert named.behind_load_balancer
    assert config_from_dict({**BASE, "target_group_arns": "auto"}).target_group_arns == "auto"
    with pytest.raises(ConfigError, match="'web' is not an ELBv2 target group ARN"):
        config_from_dict({**BASE, "target_group_arns": ["web"]})
    with pytest.raises(ConfigError, match="must be a list of target group ARNs or 'auto'"):
        config_from_dict({**BASE, "target_group_arns": {"web": 1}})
    with pytest.raises(ConfigError, match=r"traffic_port 70000 must be 1\.\.65535"):
        config_from_dict({**BASE, "traffic_port": 70000})
    with pytest.raises(ConfigError, match="traffic_poll_seconds must be positive"):
        config_from_dict({**BASE, "traffic_poll_seconds": 0})
    with pytest.raises(ConfigError, match="traffic_healthy_timeout_seconds must be positive"):
        config_from_dict({**BASE, "traffic_healthy_timeout_seconds": -1})
