from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from deployer.apply.prune import releases_to_prune


def test_the_oldest_releases_beyond_keep_are_pruned() -> None:
    releases = [(f"r{i}", float(i)) for i in range(1, 8)]
    assert sorted(releases_to_prune(releases, active="r7", previous="r6", keep=3)) == ["r1", "r2", "r3", "r4"]


def test_active_and_previous_are_never_pruned_even_when_oldest() -> None:
    releases = [("old-active", 1.0), ("old-previous", 2.0), ("n1", 3.0), ("n2", 4.0), ("n3", 5.0)]
    doomed = releases_to_prune(releases, active="old-active", previous="old-previous", keep=2)
    assert "old-active" not in doomed
    assert "old-previous" not in doomed
    assert sorted(doomed) == ["n1", "n2", "n3"]


def test_nothing_is_pruned_when_under_the_limit() -> None:
    assert releases_to_prune([("a", 1.0), ("b", 2.0)], active="b", previous="a", keep=5) == []


release_names = st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=0, max_size=30, unique=True)


@given(
    names=release_names,
    ages=st.lists(st.floats(min_value=0, max_value=1e9, allow_nan=False), min_size=30, max_size=30),
    keep=st.integers(min_value=2, max_value=10),
    data=st.data(),
)
def test_pruning_never_removes_the_active_or_previous_release_and_keeps_exactly_keep_when_it_can(
    names: list[str], ages: list[float], keep: int, data: st.DataObject
) -> None:
    releases = list(zip(names, ages, strict=False))
    active = data.draw(st.sampled_from([*names, None]) if names else st.none())
    previous = data.draw(st.sampled_from([*names, None]) if names else st.none())
    doomed = releases_to_prune(releases, active=active, previous=previous, keep=keep)
    assert active not in doomed
    assert previous not in doomed
    assert len(set(doomed)) == len(doomed)
    assert set(doomed) <= set(names)
    kept = len(names) - len(doomed)
    protected = len({n for n in (active, previous) if n})
    assert kept == max(min(len(names), keep), protected)
    # What goes is always older than what stays (apart from the protected two).
    age = dict(releases)
    survivors = [age[n] for n in names if n not in doomed and n not in (active, previous)]
    assert all(age[d] <= min(survivors, default=float("inf")) for d in doomed)
