"""`deployer rollback` and `deployer history`: an older release as a new seq, re-activated from disk."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from deployer.protocol.deploy import Deploy
from deployer.protocol.errors import PublishError
from publisher.history import describe_origin
from publisher.rollback import pick_previous
from tests.support import BUCKET, AgentProcess, Fleet, artifact_key_of, cli, make_deploy, wait_until

CHANNEL = ("--stage", "prod", "--role", "web", "--component", "api")


def d(seq: int, release: str) -> Deploy:
    return make_deploy(seq=seq, release_id=release)


def test_previous_is_the_newest_earlier_seq_with_a_different_release() -> None:
    history = [d(4, "r3"), d(3, "r3"), d(2, "r2"), d(1, "r1")]  # newest first, seq 3 was a re-publish of r3
    assert pick_previous(history, d(4, "r3")).release_id == "r2"
    # After rolling back to r2 at seq 5, "previous" is r3 again: two rollbacks toggle.
    assert pick_previous([d(5, "r2"), *history], d(5, "r2")).release_id == "r3"
    with pytest.raises(PublishError, match="no earlier release"):
        pick_previous([d(1, "r1")], d(1, "r1"))


def test_history_says_who_published_from_where() -> None:
    assert describe_origin({"github_repository": "acme/api", "github_run_id": "77", "github_actor": "ana"}) == (
        "github:acme/api#77 ana@?"
    )
    assert describe_origin({"user": "ci", "host": "runner-3"}) == "ci@runner-3"
    assert describe_origin({"user": "ops", "host": "h", "action": "rollback", "rollback_from_seq": "4"}) == (
        "ops@h (rollback from seq 4)"
    )
    assert describe_origin({}) == "-"


def test_rollback_reactivates_the_kept_release_without_downloading_it(
    fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent()
    first = publish("release one")
    # Both must have been applied (in one receive batch the older would be superseded, never on disk).
    wait_until(lambda: agent.on_seq(first.seq), "seq 1")
    second = publish("release two")
    wait_until(lambda: agent.on_seq(second.seq), "seq 2")
    # Prove no download: the first release's artifact in S3 is garbage now; only the disk copy is right.
    artifact_key = artifact_key_of(fleet, first)
    fleet.clients.s3.put_object(Bucket=BUCKET, Key=artifact_key, Body=b"not the release any more")

    result = cli("rollback", "--bucket", BUCKET, "--topic-arn", fleet.topic_arn, *CHANNEL)
    assert result.returncode == 0, result.stderr
    assert f"from {second.release_id} (seq 2) to {first.release_id} as seq 3" in result.stdout
    wait_until(lambda: agent.on_seq(3), "the rollback at seq 3")
    assert agent.served() == "release one"
    assert [e["seq"] for e in agent.events("release_reused")] == [3]
    # Hooks ran for the rollback like for any deploy.
    assert len(agent.hook_runs()) == 3

    history = cli("history", "--bucket", BUCKET, *CHANNEL)
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert lines[0].split() == ["SEQ", "RELEASE", "DEPLOY", "PUBLISHED", "BY", "/", "FROM"]
    assert lines[1].startswith(f"3 *  {first.release_id}")
    assert "(rollback from seq 2)" in lines[1]
    assert [line.split()[0] for line in lines[1:]] == ["3", "2", "1"]
    as_json = json.loads(cli("history", "--bucket", BUCKET, *CHANNEL, "--json", "--limit", "2").stdout)
    assert as_json["current_seq"] == 3
    assert [x["seq"] for x in as_json["deploys"]] == [3, 2]
    assert as_json["deploys"][0]["origin"]["action"] == "rollback"


def test_rollback_to_a_named_release_and_waiting_for_it(
    fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent(heartbeat_interval_seconds=1)
    first = publish("one")
    publish("two")
    third = publish("three")
    wait_until(lambda: agent.on_seq(third.seq), "seq 3")
    result = cli(
        "rollback", "--bucket", BUCKET, "--topic-arn", fleet.topic_arn, *CHANNEL, "--to", first.release_id,
        "--wait", "--poll-interval", "0.3", "--timeout", "30", "--heartbeat-ttl", "20",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 1/1 converged on seq 4" in result.stdout
    assert agent.served() == "one"


def test_rollback_refuses_what_it_cannot_do(fleet: Fleet, publish: Callable[..., Deploy]) -> None:
    base = ("rollback", "--bucket", BUCKET, "--topic-arn", fleet.topic_arn, *CHANNEL)
    never = cli(*base)
    assert never.returncode == 1
    assert "has never been published" in never.stderr
    only = publish("only")
    assert "no earlier release" in cli(*base).stderr
    assert "already on release" in cli(*base, "--to", only.release_id).stderr
    missing = cli(*base, "--to", "no-such-release")
    assert missing.returncode == 1
    assert "release no-such-release of component api does not exist" in missing.stderr
