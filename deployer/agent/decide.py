"""The agent's pure decisions over data; no I/O here.

Should this message be applied? SQS standard queues deliver at least once and in any order,
so every message is judged against what this instance already applied (`seq > applied_seq`
per channel) and against the rest of its receive batch (only the highest seq per channel is
applied). And once an apply ended, what becomes of its message: acknowledged, retried after
a backoff, dead-lettered, or handed back (docs/design.md, "Delivery").
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from deployer.backoff import backoff_seconds
from deployer.protocol.deploy import Deploy
from deployer.protocol.errors import InfrastructureError, Interrupted, RejectedInput, Unauthentic
from deployer.protocol.names import Channel
from deployer.protocol.rollout import base_id

#: A message whose apply failed is retried after 30 s, 60 s, 120 s, … (by SQS visibility), at most this.
RETRY_VISIBILITY_BASE_SECONDS = 30
RETRY_VISIBILITY_CAP_SECONDS = 900


class Verdict(enum.StrEnum):
    APPLY = "apply"
    DUPLICATE = "duplicate"  # this exact deploy was already applied
    STALE = "stale"  # an older seq than the one applied
    SUPERSEDED = "superseded"  # a newer seq for the same channel is in the same batch
    NOT_MINE = "not_mine"  # another stage/role/component (filter policies are only an optimisation)
    REJECTED = "rejected"  # not a valid deploy document, or contradicts what we applied


@dataclass(frozen=True)
class Incoming:
    """One received message: its deploy if it parsed, else why it did not."""

    message_id: str
    receipt_handle: str
    deploy: Deploy | None
    error: str | None = None


@dataclass(frozen=True)
class Decision:
    incoming: Incoming
    verdict: Verdict
    reason: str


def decide_one(
    deploy: Deploy,
    applied: Mapping[Channel, tuple[int, str]],
    mine: Collection[Channel],
    seen: Mapping[Channel, tuple[int, str]] | None = None,
) -> tuple[Verdict, str]:
    """Verdict for one deploy against `applied` and `seen` (channel → (seq, deploy_id)).

    `seen` is the newest deploy of each channel that proved authentic, landed or not: once CI's
    seq 14 was seen, seq 11 is stale even if 14 failed; 14 itself is retried until it lands or
    is rejected for good.
    """
    if deploy.channel not in mine:
        return Verdict.NOT_MINE, f"channel {deploy.channel} is not served by this instance"
    newest = (seen or {}).get(deploy.channel)
    if newest is not None and deploy.seq < newest[0]:
        return Verdict.STALE, f"seq {deploy.seq} is older than seq {newest[0]}, already seen from CI"
    if newest is not None and deploy.seq == newest[0] and base_id(deploy.deploy_id) != base_id(newest[1]):
        return (
            Verdict.REJECTED,
            f"seq {deploy.seq} was published as deploy {newest[1]}, message claims {deploy.deploy_id}",
        )
    current = applied.get(deploy.channel)
    if current is None or deploy.seq > current[0]:
        return Verdict.APPLY, "newer than applied"
    seq, deploy_id = current
    if deploy.seq == seq:
        if deploy.rollout is not None and base_id(deploy.deploy_id) == base_id(deploy_id):
            # A staged rollout moves an instance between its two releases within one seq: the
            # runner reads the cursor and changes nothing if this instance is where it belongs.
            return Verdict.APPLY, f"seq {seq} is a staged rollout: its cursor decides the release"
        if deploy.deploy_id == deploy_id:
            return Verdict.DUPLICATE, f"seq {seq} already applied"
        # Invariant 1 says one seq has one deploy; two different ones means tampering or a bug.
        return Verdict.REJECTED, f"seq {seq} was applied as deploy {deploy_id}, message claims {deploy.deploy_id}"
    return Verdict.STALE, f"seq {deploy.seq} is older than applied seq {seq}"


def decide_batch(
    batch: Sequence[Incoming],
    applied: Mapping[Channel, tuple[int, str]],
    mine: Collection[Channel],
    seen: Mapping[Channel, tuple[int, str]] | None = None,
) -> list[Decision]:
    """One decision per message, in batch order; at most one APPLY per channel (its highest seq).

    The channel's other applicable deploys are SUPERSEDED; `candidates` orders them as fallbacks,
    because the APPLY one is only authenticated (against the channel's history) under the apply
    lock: a forged message with a high seq must not silence a genuine one in the same batch.
    Two different deploys claiming one seq are both candidates for the same reason: history
    decides which of them is real.
    """
    decisions: list[Decision] = []
    copies: set[str] = set()
    for incoming in batch:
        deploy = incoming.deploy
        if deploy is None:
            decisions.append(Decision(incoming, Verdict.REJECTED, incoming.error or "unparseable message"))
            continue
        verdict, reason = decide_one(deploy, applied, mine, seen)
        if verdict is Verdict.APPLY and deploy.to_json() in copies:
            verdict, reason = Verdict.DUPLICATE, f"seq {deploy.seq} appears twice in this batch"
        copies.add(deploy.to_json())
        decisions.append(Decision(incoming, verdict, reason))
    best: dict[Channel, Decision] = {}
    for decision in decisions:
        deploy = decision.incoming.deploy
        if decision.verdict is Verdict.APPLY and deploy is not None:
            rival = best.get(deploy.channel)
            if rival is None or _seq(decision) > _seq(rival):
                best[deploy.channel] = decision
    winners = {id(d) for d in best.values()}
    return [
        Decision(d.incoming, Verdict.SUPERSEDED, f"seq {_seq(best[_channel(d)])} is in the same batch")
        if d.verdict is Verdict.APPLY and id(d) not in winners
        else d
        for d in decisions
    ]


def candidates(decisions: Sequence[Decision]) -> dict[Channel, list[Decision]]:
    """Per channel, what to try in order: the APPLY decision, then the superseded ones, newest first. Pure."""
    found: dict[Channel, list[Decision]] = {}
    for decision in decisions:
        if decision.verdict in (Verdict.APPLY, Verdict.SUPERSEDED):
            found.setdefault(_channel(decision), []).append(decision)
    for channel, listed in found.items():
        found[channel] = sorted(listed, key=lambda d: (d.verdict is not Verdict.APPLY, -_seq(d)))
    return found


def _seq(decision: Decision) -> int:
    assert decision.incoming.deploy is not None
    return decision.incoming.deploy.seq


def _channel(decision: Decision) -> Channel:
    assert decision.incoming.deploy is not None
    return decision.incoming.deploy.channel


class Outcome(enum.StrEnum):
    """How one apply of one deploy ended, as far as its message is concerned."""

    APPLIED = "applied"  # live on this instance (or found already applied under the lock)
    FAILED = "failed"  # the release failed here (hook, health check, activation): counted
    UNAVAILABLE = "unavailable"  # the network or AWS failed: retried, never counted against the release
    REJECTED = "rejected"  # can never succeed
    UNAUTHENTIC = "unauthentic"  # not what CI wrote to the channel's history: never trusted, never recorded
    INTERRUPTED = "interrupted"  # a shutdown stopped it; nothing was decided


class Action(enum.StrEnum):
    ACK = "ack"  # delete the message
    RETRY = "retry"  # leave it; SQS redelivers it after `delay_s` (0: hand it back now)
    DEAD_LETTER = "dead_letter"  # copy it to the DLQ with the reason, then delete it


@dataclass(frozen=True)
class Disposition:
    action: Action
    delay_s: int = 0


#: What a stopping agent does with messages it will not process: visible again at once.
HAND_BACK = Disposition(Action.RETRY, 0)


def outcome_of(exc: BaseException) -> Outcome:
    """The outcome an apply that raised `exc` had; the error tree decides, by type. Pure."""
    if isinstance(exc, Interrupted):
        return Outcome.INTERRUPTED
    if isinstance(exc, Unauthentic):
        return Outcome.UNAUTHENTIC
    if isinstance(exc, RejectedInput):
        return Outcome.REJECTED
    if isinstance(exc, InfrastructureError):
        return Outcome.UNAVAILABLE
    # ReleaseFailed, and anything unexpected (a bug, an OS error): counted, so it cannot loop forever.
    return Outcome.FAILED


def dispose(outcome: Outcome, receive_count: int) -> Disposition:
    """What becomes of a message after its apply. Pure.

    A failed apply is not deleted: SQS redelivers it after a backoff set through its
    visibility (30 s, 60 s, 120 s, … capped), up to maxReceiveCount times, then moves it to
    the DLQ by its redrive policy. A rejected one goes to the DLQ at once.
    """
    if outcome is Outcome.APPLIED:
        return Disposition(Action.ACK)
    if outcome in (Outcome.REJECTED, Outcome.UNAUTHENTIC):
        return Disposition(Action.DEAD_LETTER)
    if outcome is Outcome.INTERRUPTED:
        return HAND_BACK
    delay = backoff_seconds(
        receive_count, base=RETRY_VISIBILITY_BASE_SECONDS, cap=RETRY_VISIBILITY_CAP_SECONDS, jitter=0.0
    )
    return Disposition(Action.RETRY, int(delay))
