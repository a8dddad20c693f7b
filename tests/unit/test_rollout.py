"""Staged rollouts, the pure parts: wave planning and admission, the side an instance runs, the
driver's count, and the plan and cursor parsers."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.agent.decide import Verdict, decide_one
from deployer.aws.elb import Membership
from deployer.protocol.deploy import parse_deploy
from deployer.protocol.errors import InvalidMessage
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState, ComponentStatus
from deployer.protocol.rollout import (
    BUCKETS,
    MAX_ABORT_AFTER,
    PRE_AUTHORISED,
    STABLE_SUFFIX,
    Cursor,
    Plan,
    RolloutState,
    Side,
    Stable,
    bucket,
    parse_cursor,
    plan_waves,
    side_for,
)
from publisher.rollout import capacity_refusal, count
from tests.support import make_deploy, report_entry

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
STABLE = Stable("rel-stable", "deployer/releases/api/rel-stable/manifest.yml", "c" * 64)
API = Channel("prod", "web", "api")
instance_ids = st.from_regex(r"i-[0-9a-f]{17}", fullmatch=True)


def plan_for(
    specs: tuple[str, ...], live: list[str], deploy_id: str = "d-1", zones: dict[str, str | None] | None = None
) -> Plan:
    waves = plan_waves(specs, deploy_id, live, zones)
    return Plan(waves.specs, waves.first, waves.thresholds, STABLE, max_failed="10%", zones=waves.zones)


@settings(max_examples=50)
@given(st.lists(instance_ids, min_size=1, max_size=40, unique=True), st.uuids())
def test_admission_is_deterministic_monotone_and_the_first_wave_is_never_empty(
    live: list[str], deploy_id: object
) -> None:
    plan = plan_for(("10%", "30%", "60%", "100%"), live, str(deploy_id))
    assert plan.first
    for instance in live:
        admitted = [plan.admits(str(deploy_id), instance, wave) for wave in range(plan.last_wave + 1)]
        assert admitted == sorted(admitted)  # once admitted, admitted in every later wave
        assert admitted[-1]  # the last wave admits everyone
        assert plan.wave_of(str(deploy_id), instance) == plan_for(plan.waves, live, str(deploy_id)).wave_of(
            str(deploy_id), instance
        )


def test_buckets_spread_instances_evenly() -> None:
    points = [bucket("d-1", f"i-{n:017x}") for n in range(20_000)]
    for threshold in (1000, 2500, 5000, 9000):
        share = sum(p < threshold for p in points) / len(points)
        assert abs(share - threshold / BUCKETS) < 0.015, threshold
    assert bucket("d-1", "i-0") != bucket("d-2", "i-0") or bucket("d-1", "i-1") != bucket("d-2", "i-1")


@pytest.mark.parametrize(
    ("specs", "live", "at_least"),
    [
        (("1", "100%"), 3, [1, 3]),
        (("10%", "100%"), 3, [1, 3]),  # 10 % of 3 is still one instance
        (("2", "50%"), 10, [2, 5, 10]),  # the last wave is always everyone
        (("1", "5", "100%"), 10, [1, 5, 10]),  # a count becomes its share of the live fleet
        # Hash buckets alone admitted 1, then 0 more, then 9 here: each wave reaches its share.
        (("1", "30%", "100%"), 10, [1, 3, 10]),
        (("1", "25%", "50%"), 8, [1, 2, 4, 8]),
    ],
)
def test_each_wave_reaches_at_least_its_share_of_the_fleet_the_publisher_knows(
    specs: tuple[str, ...], live: int, at_least: list[int]
) -> None:
    fleet = [f"i-{n:017x}" for n in range(live)]
    plan = plan_for(specs, fleet)
    admitted = [sum(plan.admits("d-1", i, wave) for i in fleet) for wave in range(plan.last_wave + 1)]
    assert len(admitted) == len(at_least)
    assert all(n >= least for n, least in zip(admitted, at_least, strict=True)), admitted
    assert admitted[0] == at_least[0]  # wave 0 is exactly its share, never more
    assert admitted[-1] == live


def test_zonal_waves_admit_a_zone_at_a_time_after_the_canary_and_a_newcomer_joins_its_zones_wave() -> None:
    fleet = {f"i-{n:017x}": f"us-east-1{'abc'[n % 3]}" for n in range(9)}
    zones: dict[str, str | None] = dict(fleet)
    plan = plan_for(("1", "az"), list(fleet), zones=zones)
    assert plan.zones == (("us-east-1a",), ("us-east-1b",), ("us-east-1c",))
    assert plan.last_wave == 3
    [canary] = plan.first
    for instance, zone in fleet.items():
        expected = 0 if instance == canary else 1 + "abc".index(zone[-1])
        assert plan.wave_of("d-1", instance, zone) == expected
    assert plan.wave_of("d-1", "i-new", "us-east-1b") == 2  # scale-out into a zone: that zone's wave
    assert plan.wave_of("d-1", "i-new", "us-east-1d") == 3  # a zone the plan does not name: the last
    assert plan.wave_of("d-1", "i-new", None) == 3
    assert plan.wave_label(2) == "us-east-1b"
    two = plan_for(("az:2",), list(fleet), zones=zones)
    assert (two.first, two.zones, two.last_wave) == ((), (("us-east-1a", "us-east-1b"), ("us-east-1c",)), 1)
    assert parse_deploy_plan(two) == two


def parse_deploy_plan(plan: Plan) -> Plan:
    from deployer.protocol.rollout import plan_from_dict

    return plan_from_dict(json.loads(json.dumps(plan.to_dict())))


@pytest.mark.parametrize(
    ("specs", "live", "error"),
    [
        (("50%", "10%"), 3, "waves must not shrink"),
        (("1", "150%"), 3, "must be an instance count or a percentage up to 100%"),
        (("x",), 3, "must be an instance count"),
        (("1",), 0, "no live instance runs this channel"),
        (("1", "10%", "az"), 3, "after at most one canary wave"),
        (("az", "100%"), 3, "must be an instance count"),
        (("az",), 3, "no live instance reports its Availability Zone"),
    ],
)
def test_an_impossible_plan_is_refused_with_the_reason(specs: tuple[str, ...], live: int, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        plan_waves(specs, "d-1", [f"i-{n:017x}" for n in range(live)])


def cursor(wave: int = 0, state: RolloutState = RolloutState.ROLLING) -> Cursor:
    return Cursor("d-1", wave, state, NOW, "ci:1", NOW + timedelta(seconds=60))


def test_the_cursor_decides_the_side_and_a_missing_one_changes_nothing() -> None:
    plan = Plan(("1", "100%"), ("i-first",), (BUCKETS,), STABLE)
    assert side_for(plan, "d-1", "i-first", cursor(0)) is Side.CANDIDATE
    assert side_for(plan, "d-1", "i-other", cursor(0)) is Side.STABLE
    assert side_for(plan, "d-1", "i-other", cursor(1)) is Side.CANDIDATE
    assert side_for(plan, "d-1", "i-first", cursor(1, RolloutState.ABORTED)) is Side.STABLE
    assert side_for(plan, "d-1", "i-other", cursor(0, RolloutState.DONE)) is Side.CANDIDATE
    # No valid cursor (deleted, forged): nobody moves; a newcomer takes stable.
    assert side_for(plan, "d-1", "i-first", None, Side.CANDIDATE) is Side.CANDIDATE
    assert side_for(plan, "d-1", "i-other", None) is Side.STABLE


def test_a_plan_round_trips_in_the_deploy_document_and_a_bad_one_is_refused_by_name() -> None:
    plan = Plan(("1", "100%"), ("i-0123456789abcdef0",), (BUCKETS,), STABLE, bake_s=30, max_failed="1")
    deploy = make_deploy(rollout=plan)
    assert parse_deploy(deploy.to_json()) == deploy
    doc = json.loads(deploy.to_json())
    for change, error in (
        ({"thresholds": [5000]}, "thresholds must rise to 10000"),
        ({"first": []}, "first must list 1 to 100 instance ids"),
        ({"max_failed": "lots"}, "max_failed 'lots' must be"),
        ({"surprise": 1}, "unknown key"),
        ({"stable": {"release_id": "r"}}, "stable must name release_id, manifest_key and manifest_sha256"),
    ):
        with pytest.raises(InvalidMessage, match=error):
            parse_deploy(json.dumps({**doc, "rollout": {**doc["rollout"], **change}}))
    with pytest.raises(InvalidMessage, match="reserved for a rollout's stable side"):
        parse_deploy(json.dumps({**doc, "deploy_id": "d" + STABLE_SUFFIX}))


def test_a_cursor_is_parsed_strictly_and_only_for_its_own_rollout() -> None:
    raw = cursor(2).to_json()
    assert parse_cursor(raw, "d-1") == cursor(2)
    with pytest.raises(InvalidMessage, match="is for deploy 'd-1', not 'd-2'"):
        parse_cursor(raw, "d-2")
    with pytest.raises(InvalidMessage, match="state 'won' is not one of"):
        parse_cursor(json.dumps({**json.loads(raw), "state": "won"}), "d-1")


def test_the_stable_side_is_its_own_deploy_at_the_same_seq_and_moving_between_sides_is_applied() -> None:
    plan = Plan(("1", "100%"), ("i-first",), (BUCKETS,), STABLE)
    candidate = make_deploy(rollout=plan, deploy_id="d-1", seq=9)
    stable = candidate.stable_variant()
    assert (stable.deploy_id, stable.seq, stable.release_id) == ("d-1" + STABLE_SUFFIX, 9, "rel-stable")
    applied = {API: (9, stable.deploy_id)}
    assert decide_one(candidate, applied, [API], {API: (9, stable.deploy_id)})[0] is Verdict.APPLY
    plain = replace(candidate, rollout=None)
    assert decide_one(plain, {API: (9, "d-1")}, [API])[0] is Verdict.DUPLICATE


def test_the_driver_counts_admitted_converged_failed_and_waiting_among_live_instances() -> None:
    plan = Plan(("1", "100%"), ("i-a",), (BUCKETS,), STABLE, max_failed="0")
    deploy = make_deploy(rollout=plan, deploy_id="d-1")

    def on(deploy_id: str, state: ComponentState, age: float = 1) -> object:
        status = ComponentStatus(state=state, seq=deploy.seq, deploy_id=deploy_id, release_id="r")
        return report_entry("x", {"api": status}, NOW - timedelta(seconds=age))

    entries = {
        "i-a": on("d-1", ComponentState.OK),
        "i-b": on("d-1" + STABLE_SUFFIX, ComponentState.WAITING),
        "i-c": on("d-1" + STABLE_SUFFIX, ComponentState.WAITING, age=600),  # scaled in: drops out
    }
    tally = count(deploy, 0, entries, NOW, ttl_s=60)  # type: ignore[arg-type]
    assert (set(tally.admitted), set(tally.converged), set(tally.waiting), tally.live) == ({"i-a"}, {"i-a"}, {"i-b"}, 2)
    entries["i-a"] = on("d-1", ComponentState.FAILED)
    assert count(deploy, 0, entries, NOW, ttl_s=60).failed == {"i-a": "failed"}  # type: ignore[arg-type]


GROUP_ARN = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef"


def _group(registered: int, healthy: int) -> Membership:
    ids = [f"i-{n}" for n in range(registered)]
    return Membership(GROUP_ARN, frozenset(ids), frozenset(ids[:healthy]))


def test_a_wave_starts_only_if_it_leaves_the_minimum_healthy_share_of_each_group() -> None:
    four = _group(4, 4)
    assert capacity_refusal([four], ["i-0", "i-1"], 50) is None
    refusal = capacity_refusal([four], ["i-0", "i-1"], 75)
    assert refusal == (
        f"{GROUP_ARN} would keep 2 of 4 targets healthy with 2 out of service, under --min-healthy-percent 75 (3)"
    )
    # An instance of the wave that is not healthy now takes nothing away.
    assert capacity_refusal([_group(4, 3)], ["i-3"], 75) is None
    # One target may always leave, as instance refresh replaces one at a time at 100 %.
    assert capacity_refusal([four], ["i-0"], 100) is None
    assert capacity_refusal([_group(1, 1)], ["i-0"], 90) is None
    assert capacity_refusal([_group(0, 0)], ["i-0"], 100) is None
    assert capacity_refusal([four, _group(4, 2)], ["i-0"], 75) is not None  # every group counts


def test_the_pre_authorised_abort_fires_on_k_distinct_admitted_failures_of_a_rolling_rollout_only() -> None:
    plan = replace(Plan(("1", "50%", "100%"), ("i-canary",), (5000, BUCKETS), STABLE), abort_after=2)
    admitted = [i for i in (f"i-{n:04d}" for n in range(200)) if plan.wave_of("d-1", i) == 1][:3]
    outsider = next(i for i in (f"i-{n:04d}" for n in range(200)) if plan.wave_of("d-1", i) == 2)
    rolling = cursor(wave=1)
    assert plan.abort_fired("d-1", rolling, [admitted[0]]) is None  # K − 1
    assert plan.abort_fired("d-1", rolling, [admitted[0], admitted[0], outsider]) is None  # one owner, an outsider
    fired = plan.abort_fired("d-1", rolling, ["i-canary", admitted[1]])
    assert fired is not None
    assert fired.startswith(PRE_AUTHORISED)
    assert fired.endswith(
        f"2 admitted instance(s) failed, the plan's limit is 2 ({', '.join(sorted(['i-canary', admitted[1]]))})"
    )
    # Not before its wave admits them, not once the rollout is done or already aborted, not without a rule.
    assert plan.abort_fired("d-1", cursor(wave=0), admitted[:2]) is None
    assert plan.abort_fired("d-1", cursor(wave=1, state=RolloutState.DONE), admitted) is None
    assert plan.abort_fired("d-1", cursor(wave=1, state=RolloutState.ABORTED), admitted) is None
    assert plan.abort_fired("d-1", None, admitted) is None
    assert replace(plan, abort_after=None).abort_fired("d-1", rolling, admitted) is None


def test_the_abort_rule_is_signed_into_the_plan_and_a_bad_one_is_refused_by_name() -> None:
    plan = Plan(("1", "100%"), ("i-0123456789abcdef0",), (BUCKETS,), STABLE, abort_after=3)
    deploy = make_deploy(rollout=plan)
    assert parse_deploy(deploy.to_json()) == deploy
    assert "abort_after" not in json.dumps(make_deploy(rollout=replace(plan, abort_after=None)).to_dict())
    doc = json.loads(deploy.to_json())
    for bad in (0, -1, "3", True, MAX_ABORT_AFTER + 1):
        doc["rollout"]["abort_after"] = bad
        with pytest.raises(InvalidMessage, match=r"rollout\.abort_after must be an instance count"):
            parse_deploy(json.dumps(doc))
