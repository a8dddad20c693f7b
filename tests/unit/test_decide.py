from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer.agent.decide import (
    HAND_BACK,
    Action,
    Disposition,
    Incoming,
    Outcome,
    Verdict,
    decide_batch,
    decide_one,
    dispose,
    outcome_of,
)
from deployer.protocol.errors import (
    ActivationFailed,
    ArtifactError,
    AwsError,
    FetchError,
    HealthCheckFailed,
    HookFailed,
    Interrupted,
    InvalidMessage,
    ManifestError,
    TransientFetchError,
)
from deployer.protocol.names import Channel
from tests.support import make_deploy

API = Channel("prod", "web", "api")
WORKER = Channel("prod", "web", "worker")
MINE = {API, WORKER}


def incoming(seq: int, component: str = "api", deploy_id: str | None = None, stage: str = "prod") -> Incoming:
    deploy = make_deploy(seq=seq, component=component, deploy_id=deploy_id or f"d-{component}-{seq}", stage=stage)
    return Incoming(message_id=f"m-{component}-{seq}-{id(deploy)}", receipt_handle=f"r-{id(deploy)}", deploy=deploy)


def test_a_newer_seq_is_applied_and_older_or_equal_ones_are_not() -> None:
    applied = {API: (5, "d-api-5")}
    assert decide_one(incoming(6).deploy, applied, MINE)[0] is Verdict.APPLY  # type: ignore[arg-type]
    assert decide_one(incoming(5).deploy, applied, MINE)[0] is Verdict.DUPLICATE  # type: ignore[arg-type]
    assert decide_one(incoming(4).deploy, applied, MINE)[0] is Verdict.STALE  # type: ignore[arg-type]


def test_the_first_deploy_of_a_channel_is_applied() -> None:
    assert decide_one(incoming(1).deploy, {}, MINE)[0] is Verdict.APPLY  # type: ignore[arg-type]


def test_the_same_seq_with_a_different_deploy_id_is_rejected_loudly() -> None:
    verdict, reason = decide_one(incoming(5, deploy_id="other").deploy, {API: (5, "d-api-5")}, MINE)  # type: ignore[arg-type]
    assert verdict is Verdict.REJECTED
    assert "other" in reason


def test_a_deploy_for_another_stage_is_not_mine_even_if_the_filter_policy_let_it_through() -> None:
    assert decide_one(incoming(1, stage="dev").deploy, {}, MINE)[0] is Verdict.NOT_MINE  # type: ignore[arg-type]


def test_in_one_batch_only_the_highest_seq_per_channel_is_applied() -> None:
    batch = [incoming(3), incoming(7), incoming(5), incoming(2, "worker"), incoming(7)]
    verdicts = [d.verdict for d in decide_batch(batch, {API: (1, "d-api-1")}, MINE)]
    assert verdicts == [Verdict.SUPERSEDED, Verdict.APPLY, Verdict.SUPERSEDED, Verdict.APPLY, Verdict.DUPLICATE]


def test_an_unparseable_message_is_rejected_with_its_parse_error() -> None:
    bad = Incoming("m1", "r1", None, "deploy document is not JSON")
    [decision] = decide_batch([bad], {}, MINE)
    assert decision.verdict is Verdict.REJECTED
    assert decision.reason == "deploy document is not JSON"


batches = st.lists(
    st.tuples(st.sampled_from(["api", "worker", "other"]), st.integers(min_value=1, max_value=20)), max_size=25
)


@given(batch=batches, applied_api=st.integers(min_value=0, max_value=20))
def test_a_batch_applies_at_most_one_deploy_per_channel_and_it_is_the_newest(
    batch: list[tuple[str, int]], applied_api: int
) -> None:
    messages = [incoming(seq, component) for component, seq in batch]
    applied = {API: (applied_api, f"d-api-{applied_api}")} if applied_api else {}
    decisions = decide_batch(messages, applied, MINE)
    assert len(decisions) == len(messages)
    for channel in MINE:
        seqs = [m.deploy.seq for m in messages if m.deploy and m.deploy.channel == channel]
        floor = applied.get(channel, (0, ""))[0]
        chosen = [d for d in decisions if d.verdict is Verdict.APPLY and d.incoming.deploy.channel == channel]  # type: ignore[union-attr]
        newer = [s for s in seqs if s > floor]
        if newer:
            assert len(chosen) == 1
            assert chosen[0].incoming.deploy.seq == max(newer)  # type: ignore[union-attr]
        else:
            assert chosen == []
    assert all(d.verdict is Verdict.NOT_MINE for d in decisions if d.incoming.deploy.component == "other")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (InvalidMessage("manifest sha256 … does not match"), Outcome.REJECTED),
        (ManifestError("unknown key(s): srcc"), Outcome.REJECTED),
        (ArtifactError("unsafe archive member"), Outcome.REJECTED),
        (FetchError("cannot get s3://b/k: NoSuchKey"), Outcome.UNAVAILABLE),
        (TransientFetchError("download interrupted after 10 bytes"), Outcome.UNAVAILABLE),
        (AwsError("AWS GetObject failed: SlowDown", code="SlowDown", status=503), Outcome.UNAVAILABLE),
        (HookFailed("post hook #0 exited 1"), Outcome.FAILED),
        (HealthCheckFailed("health check failed 3 time(s)"), Outcome.FAILED),
        (ActivationFailed("rsync exited 23"), Outcome.FAILED),
        (Interrupted("stopped while waiting for the apply lock"), Outcome.INTERRUPTED),
        (RuntimeError("a bug"), Outcome.FAILED),  # counted, so a bug cannot loop forever
        (OSError(28, "No space left on device"), Outcome.FAILED),
    ],
)
def test_the_error_tree_alone_decides_what_an_apply_failure_means(error: BaseException, outcome: Outcome) -> None:
    assert outcome_of(error) is outcome


@pytest.mark.parametrize(
    ("outcome", "receive_count", "disposition"),
    [
        (Outcome.APPLIED, 1, Disposition(Action.ACK)),
        (Outcome.APPLIED, 4, Disposition(Action.ACK)),
        (Outcome.REJECTED, 1, Disposition(Action.DEAD_LETTER)),
        (Outcome.FAILED, 1, Disposition(Action.RETRY, 30)),
        (Outcome.FAILED, 2, Disposition(Action.RETRY, 60)),
        (Outcome.FAILED, 3, Disposition(Action.RETRY, 120)),
        (Outcome.FAILED, 10, Disposition(Action.RETRY, 900)),  # capped at 15 minutes
        (Outcome.UNAVAILABLE, 1, Disposition(Action.RETRY, 30)),
        (Outcome.INTERRUPTED, 1, HAND_BACK),
        (Outcome.INTERRUPTED, 3, Disposition(Action.RETRY, 0)),
    ],
)
def test_each_outcome_maps_to_one_queue_disposition(
    outcome: Outcome, receive_count: int, disposition: Disposition
) -> None:
    assert dispose(outcome, receive_count) == disposition


def test_once_a_newer_seq_was_seen_from_ci_an_older_one_is_stale_even_before_the_newer_lands() -> None:
    applied, seen = {API: (10, "d-api-10")}, {API: (14, "d-api-14")}
    assert decide_one(make_deploy(seq=11, deploy_id="d-api-11"), applied, MINE, seen)[0] is Verdict.STALE
    assert decide_one(make_deploy(seq=14, deploy_id="d-api-14"), applied, MINE, seen)[0] is Verdict.APPLY  # its retry
    assert decide_one(make_deploy(seq=14, deploy_id="rival"), applied, MINE, seen)[0] is Verdict.REJECTED
    assert decide_one(make_deploy(seq=15, deploy_id="d-api-15"), applied, MINE, seen)[0] is Verdict.APPLY
