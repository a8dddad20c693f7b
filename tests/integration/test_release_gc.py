"""`deployer gc --releases` against the emulator: condemn, then delete only what nothing refers to.

S3's LastModified cannot be back-dated on the emulator, so "a month later" is the collector's
injected `now`; the race test instead scales the protocol's two delays down together
(`Grace`), so it runs on the real clock, as production does.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deployer.agent.reporter import StatusReporter
from deployer.aws.s3 import get_document
from deployer.protocol.errors import PublishError
from deployer.protocol.layout import ReportKey
from deployer.protocol.manifest import parse_manifest
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState
from deployer.protocol.retention import DEFAULT_GRACE, Grace
from deployer.protocol.trust import UNVERIFIED
from publisher.publish import Publisher
from publisher.retention import ReleaseCollector, ReleaseCondemned, describe_releases
from tests.support import BUCKET, FAST_POLICY, Fleet, NoFanout, artifact, cli, publish_on

PROD = Channel("prod", "web", "api")
STAGING = Channel("staging", "web", "api")
MONTH_LATER = datetime.now(UTC) + timedelta(days=30)


def publisher(fleet: Fleet, grace: Grace = DEFAULT_GRACE) -> Publisher:
    clients = type(fleet.clients)(s3=fleet.clients.s3, sns=NoFanout(fleet.clients.sns), sqs=fleet.clients.sqs)  # type: ignore[arg-type]
    return Publisher(clients, fleet.bucket, fleet.topic_arn, fleet.layout, FAST_POLICY, grace=grace)


def collector(fleet: Fleet, grace: Grace = DEFAULT_GRACE) -> ReleaseCollector:
    return ReleaseCollector(fleet.clients, fleet.bucket, fleet.layout, FAST_POLICY, grace)


def exists(fleet: Fleet, release_id: str, component: str = "api") -> bool:
    """The release's manifest, and the artifact it names, are both in S3."""
    found = get_document(fleet.clients.s3, BUCKET, fleet.layout.manifest_key(component, release_id))
    if found is None:
        return False
    src = parse_manifest(found[0]).src or ""
    return get_document(fleet.clients.s3, BUCKET, src.removeprefix(f"s3://{BUCKET}/")) is not None


def artifacts(fleet: Fleet) -> int:
    listed = fleet.clients.s3.list_objects_v2(Bucket=BUCKET, Prefix=fleet.layout.blobs_prefix())
    return sum(1 for o in listed.get("Contents", []) if not o["Key"].endswith(".json"))


def condemned(fleet: Fleet, release_id: str) -> bool:
    key = fleet.layout.condemned_key("api", release_id)
    return bool(fleet.clients.s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0))


def runs(fleet: Fleet, who: str, release_id: str) -> None:
    reporter = StatusReporter(
        fleet.clients.s3, BUCKET, fleet.layout, ReportKey("prod", "web", who), ("api",), FAST_POLICY
    )
    reporter.update("api", state=ComponentState.OK, seq=1, release_id=release_id, deploy_id="d1")


@pytest.fixture
def six(fleet: Fleet, tmp_path: Path) -> list[str]:
    """r1…r6 published to prod in turn, r2 promoted to staging, an instance still running r1."""
    pub = publisher(fleet)
    for n in range(1, 7):
        publish_on(pub, PROD, artifact(tmp_path, f"r{n}", f"release {n} " * 200), f"r{n}")
    pub.publish_existing(STAGING, "r2")
    runs(fleet, "i-behind", "r1")
    return [f"r{n}" for n in range(1, 7)]


def test_a_release_nothing_refers_to_is_condemned_first_and_deleted_by_a_later_run(
    fleet: Fleet, six: list[str]
) -> None:
    gc = collector(fleet)
    first = gc.run(keep=2, older_than_days=14, now=MONTH_LATER)
    # r6 is the pointer, r5 and r6 the last two history entries, r2 staging's pointer, r1 a report.
    assert [r.release_id for r in first.condemned] == ["r3", "r4"]
    assert first.deleted == []
    assert first.kept == 10  # four releases and six artifacts, all still named by a manifest
    assert all(exists(fleet, r) for r in six), "condemning deletes nothing"

    second = gc.run(keep=2, older_than_days=14, now=MONTH_LATER + timedelta(hours=2))
    assert [r.release_id for r in second.deleted] == ["r3", "r4"]
    assert second.bytes_reclaimed == sum(r.size for r in first.condemned) > 0
    assert [r for r in six if exists(fleet, r)] == ["r1", "r2", "r5", "r6"]
    assert not any(condemned(fleet, r) for r in ("r3", "r4")), "the mark goes last"
    assert "2 release(s) deleted" in describe_releases(second)[-1]
    # Their artifacts are shared objects, named by no manifest any more: condemned in turn.
    assert [r.component for r in second.condemned] == ["artifacts", "artifacts"]
    assert artifacts(fleet) == 6

    third = gc.run(keep=2, older_than_days=14, now=MONTH_LATER + timedelta(hours=4))
    assert [r.component for r in third.deleted] == ["artifacts", "artifacts"]
    assert third.bytes_reclaimed > 100 * 2
    assert artifacts(fleet) == 4
    assert all(exists(fleet, r) for r in ("r1", "r2", "r5", "r6"))

    fourth = gc.run(keep=2, older_than_days=14, now=MONTH_LATER + timedelta(hours=6))
    assert (fourth.condemned, fourth.deleted) == ([], []), "a later run finds nothing to do"
    assert fourth.kept == 8  # four releases and their four artifacts


@pytest.mark.usefixtures("six")
def test_young_releases_are_kept_whatever_refers_to_them(fleet: Fleet) -> None:
    outcome = collector(fleet).run(keep=0, older_than_days=14)
    assert outcome.condemned == []
    assert outcome.kept == 12  # six releases, six artifacts


@pytest.mark.usefixtures("six")
def test_a_rollback_takes_a_condemned_release_back_and_gc_then_keeps_it(fleet: Fleet) -> None:
    gc = collector(fleet)
    gc.run(keep=2, older_than_days=14, now=MONTH_LATER)
    assert condemned(fleet, "r3")

    deploy = publisher(fleet).publish_existing(PROD, "r3").deploy
    assert deploy.release_id == "r3"
    assert not condemned(fleet, "r3"), "the publish removed the mark"

    later = gc.run(keep=2, older_than_days=14, now=MONTH_LATER + timedelta(hours=2))
    assert [r.release_id for r in later.deleted] == ["r4"]
    assert exists(fleet, "r3")


@pytest.mark.usefixtures("six")
def test_a_publish_refuses_a_release_gc_may_already_be_deleting_and_moves_nothing(fleet: Fleet) -> None:
    grace = Grace(sweep_after_s=0.4, reprieve_within_s=0.2)
    collector(fleet, grace).run(keep=2, older_than_days=0)
    time.sleep(0.3)  # past the reprieve window: a sweep may start any moment

    with pytest.raises(
        ReleaseCondemned, match=r"r3 of api was condemned .* publish the build again under a new release id"
    ):
        publisher(fleet, grace).publish_existing(PROD, "r3")
    result = cli("history", "--bucket", BUCKET, "--stage", "prod", "--role", "web", "--component", "api", "--json")
    assert '"current_seq": 6' in result.stdout, "no seq was claimed"


class PausedDeletes:
    """An S3 client whose first DeleteObject waits for `go`: gc stopped between judging and deleting."""

    def __init__(self, real: Any) -> None:
        self.real, self.reached, self.go = real, threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def delete_object(self, **kwargs: Any) -> Any:
        self.reached.set()
        assert self.go.wait(30)
        return self.real.delete_object(**kwargs)


@pytest.mark.usefixtures("six")
def test_a_rollback_while_gc_is_between_judging_and_deleting_is_refused_not_left_pointing_at_nothing(
    fleet: Fleet,
) -> None:
    grace = Grace(sweep_after_s=0.4, reprieve_within_s=0.2)
    collector(fleet, grace).run(keep=2, older_than_days=0)  # condemns r1…r4 (r1's instance is not reporting)
    time.sleep(0.5)
    paused = PausedDeletes(fleet.clients.s3)
    slow = ReleaseCollector(replace(fleet.clients, s3=paused), BUCKET, fleet.layout, FAST_POLICY, grace)  # type: ignore[arg-type]
    sweeping = threading.Thread(target=lambda: slow.run(keep=2, older_than_days=0))
    sweeping.start()
    assert paused.reached.wait(30), "gc never reached a delete"

    try:
        with pytest.raises(ReleaseCondemned):
            publisher(fleet, grace).publish_existing(PROD, "r3")
    finally:
        paused.go.set()
        sweeping.join(30)
    assert not exists(fleet, "r3")
    pointer = fleet.clients.s3.get_object(Bucket=BUCKET, Key=fleet.layout.pointer_key(PROD))["Body"].read()
    assert UNVERIFIED.open(pointer).release_id == "r6", "the pointer never named the deleted release"


@pytest.mark.usefixtures("six")
def test_a_release_referenced_again_after_it_was_condemned_is_pardoned(fleet: Fleet) -> None:
    gc = collector(fleet)
    gc.run(keep=2, older_than_days=14, now=MONTH_LATER)
    runs(fleet, "i-old", "r4")  # an instance booted from an old image reports r4 (it is rolling forward)

    later = gc.run(keep=2, older_than_days=14, now=MONTH_LATER + timedelta(hours=2))
    assert [r.release_id for r in later.pardoned] == ["r4"]
    assert [r.release_id for r in later.deleted] == ["r3"]
    assert exists(fleet, "r4")
    assert not condemned(fleet, "r4")


@pytest.mark.usefixtures("six")
def test_an_interrupted_sweep_is_finished_by_the_next_run(fleet: Fleet) -> None:
    gc = collector(fleet)
    gc.run(keep=2, older_than_days=14, now=MONTH_LATER)
    # A run died after deleting r3's manifest: the artifact and the mark are left.
    fleet.clients.s3.delete_object(Bucket=BUCKET, Key=fleet.layout.manifest_key("api", "r3"))

    later = gc.run(keep=2, older_than_days=14, now=MONTH_LATER + timedelta(hours=2))
    assert sorted(r.release_id for r in later.deleted) == ["r3", "r4"]
    listed = fleet.clients.s3.list_objects_v2(Bucket=BUCKET, Prefix=fleet.layout.release_dir("api", "r3"))
    assert listed.get("KeyCount", 0) == 0


@pytest.mark.usefixtures("six")
def test_an_unreadable_history_entry_keeps_every_release_of_its_component(fleet: Fleet) -> None:
    fleet.clients.s3.put_object(Bucket=BUCKET, Key=fleet.layout.history_key(PROD, 5), Body=b"{not json")

    outcome = collector(fleet).run(keep=2, older_than_days=14, now=MONTH_LATER)
    assert outcome.condemned == []
    assert outcome.unknown == frozenset({"api"})
    assert "skipped component api: its pointer or recent history is unreadable" in describe_releases(outcome)


@pytest.mark.usefixtures("six")
def test_gc_releases_from_the_command_line_says_what_it_would_do() -> None:
    result = cli("gc", "releases", "--bucket", BUCKET, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert '"kept": 12' in result.stdout
    assert '"bytes_reclaimed": 0' in result.stdout

    too_soon = cli("gc", "releases", "--bucket", BUCKET, "--older-than", "0.5")
    assert too_soon.returncode == 2
    assert "--older-than" in too_soon.stderr

    no_topic = cli("gc", "instances", "--bucket", BUCKET)
    assert no_topic.returncode == 2
    assert "--topic-arn" in no_topic.stderr


@pytest.mark.usefixtures("six")
def test_the_old_gc_spelling_still_works_and_says_what_replaces_it() -> None:
    old = cli("gc", "--bucket", BUCKET, "--releases", "--dry-run", "--json")
    assert old.returncode == 0, old.stderr
    assert json.loads(old.stdout)["kept"] == 12
    assert "`deployer gc --releases` is deprecated: use `deployer gc releases`" in old.stderr
    no_topic = cli("gc", "--bucket", BUCKET)
    assert "`deployer gc` is deprecated: use `deployer gc instances`" in no_topic.stderr
    assert no_topic.returncode == 2


def test_releases_published_and_rolled_back_to_while_gc_runs_are_never_deleted_under_a_pointer(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The race the two phases exist for, on the real clock with both delays scaled down 3,600×:
    gc condemns and sweeps everything it may (keep 1, no minimum age) in a loop, while CI
    publishes new builds and rolls back to old ones, and a watcher checks that the release the
    pointer names always exists."""
    grace = Grace(sweep_after_s=1.0, reprieve_within_s=0.5)
    pub, gc = publisher(fleet, grace), collector(fleet, grace)
    publish_on(pub, PROD, artifact(tmp_path, "seed", "seed"), "seed")
    stop = threading.Event()
    violations: list[str] = []
    deleted: list[str] = []

    def collect() -> None:
        while not stop.is_set():
            deleted.extend(r.release_id for r in gc.run(keep=1, older_than_days=0).deleted)

    def watch() -> None:
        while not stop.is_set():
            pointer = fleet.clients.s3.get_object(Bucket=BUCKET, Key=fleet.layout.pointer_key(PROD))["Body"].read()
            release = UNVERIFIED.open(pointer).release_id
            if not exists(fleet, release):
                violations.append(release)

    threads = [threading.Thread(target=collect), threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    try:
        outcomes = ci_in_a_loop(pub, tmp_path, seconds=4.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert violations == [], f"the pointer named a deleted release: {violations}"
    assert deleted, "gc deleted nothing: the race was not exercised"
    assert outcomes["published"] > 3, outcomes
    assert set(outcomes) <= {"published", "rolled back", "refused: condemned", "refused: gone"}


def ci_in_a_loop(pub: Publisher, tmp_path: Path, seconds: float) -> Counter[str]:
    """Two new builds, then a rollback to a random earlier one, and again; what happened, counted."""
    rng = random.Random(7)
    published = ["seed"]
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        n = len(published) + sum(outcomes.values())
        if n % 3 == 0:
            try:
                pub.publish_existing(PROD, rng.choice(published[:-1]))
                outcomes["rolled back"] += 1
            except ReleaseCondemned:
                outcomes["refused: condemned"] += 1
            except PublishError as exc:
                outcomes["refused: gone" if "does not exist" in str(exc) else str(exc)] += 1
        else:
            publish_on(pub, PROD, artifact(tmp_path, f"b{n}", f"build {n}"), f"b{n}")
            published.append(f"b{n}")
            outcomes["published"] += 1
        time.sleep(rng.uniform(0.0, 0.3))
    return outcomes


def test_a_publish_of_an_artifact_gc_may_be_deleting_gets_a_copy_of_its_own(fleet: Fleet, tmp_path: Path) -> None:
    grace = Grace(sweep_after_s=0.4, reprieve_within_s=0.2)
    pub, gc = publisher(fleet, grace), collector(fleet, grace)
    old = artifact(tmp_path, "old", "old build")
    publish_on(pub, PROD, old, "r1")
    publish_on(pub, PROD, artifact(tmp_path, "new", "new build"), "r2")
    gc.run(keep=1, older_than_days=0)  # condemns r1
    time.sleep(0.5)
    swept = gc.run(keep=1, older_than_days=0)  # deletes r1, condemns its artifact
    assert [r.release_id for r in swept.deleted] == ["r1"]
    assert [r.component for r in swept.condemned] == ["artifacts"]
    time.sleep(0.3)  # past the reprieve: the shared artifact may go any moment

    again = publish_on(pub, PROD, old, "r3")
    manifest = parse_manifest(fleet.clients.s3.get_object(Bucket=BUCKET, Key=again.manifest_key)["Body"].read())
    assert manifest.src == f"s3://{BUCKET}/{fleet.layout.artifact_key('api', 'r3')}"
    time.sleep(0.5)
    later = gc.run(keep=1, older_than_days=0)
    assert [r.component for r in later.deleted] == ["artifacts"], "the shared copy went"
    assert exists(fleet, "r3"), "the release's own copy did not"
