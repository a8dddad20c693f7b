"""Release gc's pure parts: grouping a LIST into releases, what a deploy refers to, the verdict."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from deployer.protocol.layout import Layout
from deployer.protocol.retention import Grace
from deployer.protocol.rollout import Plan, Stable
from publisher.retention import References, Release, deploy_references, group_releases, judge
from tests.support import make_deploy

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
LAYOUT = Layout("deployer")


def release(release_id: str, age: timedelta, condemned: timedelta | None = None, component: str = "api") -> Release:
    return Release(
        component,
        release_id,
        ((f"deployer/releases/{component}/{release_id}/manifest.yml", 100),),
        NOW - age,
        NOW - condemned if condemned is not None else None,
        LAYOUT.condemned_key(component, release_id),
        LAYOUT.release_dir(component, release_id) + "/",
    )


def refs(*ids: str, unknown: frozenset[str] = frozenset()) -> References:
    return References({"api": frozenset(ids)}, unknown)


def test_an_old_release_nothing_refers_to_is_condemned_not_deleted() -> None:
    verdict = judge([release("r1", 30 * DAY), release("r2", 30 * DAY)], refs("r2"), NOW, 14 * 86400)
    assert [r.release_id for r in verdict.condemn] == ["r1"]
    assert verdict.sweep == []
    assert verdict.kept == 1


def test_a_young_release_is_kept_even_if_nothing_refers_to_it() -> None:
    verdict = judge([release("r1", 2 * DAY)], refs(), NOW, 14 * 86400)
    assert verdict.condemn == []
    assert verdict.kept == 1


def test_a_condemned_release_is_deleted_only_once_its_mark_is_older_than_the_grace() -> None:
    fresh, ripe = release("r1", 30 * DAY, condemned=timedelta(minutes=59)), release("r2", 30 * DAY, condemned=DAY)
    verdict = judge([fresh, ripe], refs(), NOW, 14 * 86400)
    assert [r.release_id for r in verdict.sweep] == ["r2"]
    assert verdict.condemn == []
    assert verdict.kept == 0, "a condemned release waiting for its sweep is neither condemned again nor kept"


def test_a_condemned_release_that_is_referenced_again_is_pardoned_not_deleted() -> None:
    verdict = judge([release("r1", 30 * DAY, condemned=DAY)], refs("r1"), NOW, 14 * 86400)
    assert [r.release_id for r in verdict.pardon] == ["r1"]
    assert verdict.sweep == []


def test_a_component_that_could_not_be_judged_keeps_every_release() -> None:
    releases = [release("r1", 30 * DAY), release("r2", 30 * DAY, condemned=DAY)]
    verdict = judge(releases, refs(unknown=frozenset({"api"})), NOW, 14 * 86400)
    assert verdict.condemn == []
    assert verdict.sweep == []
    assert [r.release_id for r in verdict.pardon] == ["r2"]


def test_a_listing_groups_into_releases_with_the_manifest_first_and_foreign_keys_left_out() -> None:
    t = NOW - DAY
    rows = [
        ("deployer/releases/api/r1/artifact.tar.gz", 1000, t),
        ("deployer/releases/api/r1/manifest.yml", 200, t + timedelta(seconds=1)),
        ("deployer/releases/api/r2/condemned.json", 30, t),  # a sweep that died after its last object
        ("deployer/releases/api/r3/notes/extra.txt", 5, t),  # not a key the publisher writes
        ("deployer/releases/API/r4/manifest.yml", 5, t),  # not a component name
        ("deployer/releases/api/.hidden/manifest.yml", 5, t),  # not a release id
    ]
    releases = {r.release_id: r for r in group_releases(LAYOUT, rows)}
    assert set(releases) == {"r1", "r2"}
    assert [key.rsplit("/", 1)[1] for key, _ in releases["r1"].objects] == ["manifest.yml", "artifact.tar.gz"]
    assert releases["r1"].size == 1200
    assert releases["r1"].newest == t + timedelta(seconds=1)
    assert releases["r2"].objects == ()
    assert releases["r2"].condemned_at == t


def test_a_rollout_deploy_refers_to_its_candidate_and_its_stable_release() -> None:
    stable = Stable("r1", "deployer/releases/api/r1/manifest.yml", "b" * 64)
    plan = Plan(waves=("1", "100%"), first=("i-1",), thresholds=(10000,), stable=stable)
    deploy = make_deploy(release_id="r2", manifest_key="deployer/releases/api/r2/manifest.yml", rollout=plan)
    assert deploy_references(LAYOUT, deploy) == {("api", "r1"), ("api", "r2")}


def test_a_deploy_naming_another_releases_manifest_keeps_that_one_too() -> None:
    deploy = make_deploy(release_id="r2", manifest_key="deployer/releases/api/r0/manifest.yml")
    assert deploy_references(LAYOUT, deploy) == {("api", "r2"), ("api", "r0")}


def test_a_reprieve_must_end_at_most_halfway_to_the_sweep() -> None:
    with pytest.raises(ValueError, match="halfway"):
        Grace(sweep_after_s=60, reprieve_within_s=31)
