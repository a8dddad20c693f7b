"""Should this message be applied? Pure decisions over data; no I/O here.

SQS standard queues deliver at least once and in any order, so every message is judged
against what this instance already applied (`seq > applied_seq` per channel) and against the
rest of its receive batch (only the highest seq per channel is applied).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from deployer.protocol import Channel, Deploy


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
    deploy: Deploy, applied: Mapping[Channel, tuple[int, str]], mine: Collection[Channel]
) -> tuple[Verdict, str]:
    """Verdict for one deploy against `applied` (channel → (seq, deploy_id))."""
    if deploy.channel not in mine:
        return Verdict.NOT_MINE, f"channel {deploy.channel} is not served by this instance"
    current = applied.get(deploy.channel)
    if current is None or deploy.seq > current[0]:
        return Verdict.APPLY, "newer than applied"
    seq, deploy_id = current
    if deploy.seq == seq:
        if deploy.deploy_id == deploy_id:
            return Verdict.DUPLICATE, f"seq {seq} already applied"
        # Invariant 1 says one seq has one deploy; two different ones means tampering or a bug.
        return Verdict.REJECTED, f"seq {seq} was applied as deploy {deploy_id}, message claims {deploy.deploy_id}"
    return Verdict.STALE, f"seq {deploy.seq} is older than applied seq {seq}"


def decide_batch(
    batch: Sequence[Incoming], applied: Mapping[Channel, tuple[int, str]], mine: Collection[Channel]
) -> list[Decision]:
    """One decision per message, in batch order; at most one APPLY per channel (its highest seq)."""
    decisions: list[Decision] = []
    best: dict[Channel, int] = {}  # channel -> index in decisions of the current APPLY
    for incoming in batch:
        deploy = incoming.deploy
        if deploy is None:
            decisions.append(Decision(incoming, Verdict.REJECTED, incoming.error or "unparseable message"))
            continue
        verdict, reason = decide_one(deploy, applied, mine)
        if verdict is Verdict.APPLY and deploy.channel in best:
            rival_index = best[deploy.channel]
            rival = decisions[rival_index].incoming.deploy
            assert rival is not None
            if deploy.seq == rival.seq and deploy.deploy_id == rival.deploy_id:
                verdict, reason = Verdict.DUPLICATE, f"seq {deploy.seq} appears twice in this batch"
            elif deploy.seq == rival.seq:
                verdict, reason = Verdict.REJECTED, f"two different deploys claim seq {deploy.seq}"
            elif deploy.seq < rival.seq:
                verdict, reason = Verdict.SUPERSEDED, f"seq {rival.seq} is in the same batch"
            else:
                decisions[rival_index] = Decision(
                    decisions[rival_index].incoming, Verdict.SUPERSEDED, f"seq {deploy.seq} is in the same batch"
                )
                best[deploy.channel] = len(decisions)
        elif verdict is Verdict.APPLY:
            best[deploy.channel] = len(decisions)
        decisions.append(Decision(incoming, verdict, reason))
    return decisions
