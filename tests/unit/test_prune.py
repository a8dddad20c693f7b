from __future__ import annotations

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
