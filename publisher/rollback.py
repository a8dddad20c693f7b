"""`deployer rollback`: publish an earlier release as the channel's next seq.

A rollback is an ordinary deploy of an older release at a newer seq (docs/design.md), so it gets
the same ordering, idempotency and fan-out as any publish; agents that still keep the release
on disk (symlink strategy, `keep_releases`) re-activate it without downloading.

"Previous" means: the release of the highest history seq below the current pointer whose
release id differs from the current one. Rolling back twice therefore toggles between the
last two releases, like `cd -`; use `--to RELEASE_ID` to go further back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from deployer.aws.s3 import read_pointer
from deployer.protocol.deploy import Deploy
from deployer.protocol.errors import PublishError
from deployer.protocol.names import Channel
from publisher.history import iter_history
from publisher.publish import Publisher, PublishResult, Staged


def pick_previous(history_newest_first: Iterable[Deploy], current: Deploy) -> Deploy:
    """Pure: the first deploy below the current seq that names a different release."""
    for deploy in history_newest_first:
        if deploy.seq < current.seq and deploy.release_id != current.release_id:
            return deploy
    raise PublishError(f"{current.channel} has no earlier release than {current.release_id} to roll back to")


def rollback(
    publisher: Publisher,
    channel: Channel,
    *,
    to: str | None = None,
    origin: Mapping[str, str] | None = None,
    staged: Staged | None = None,
) -> tuple[PublishResult, Deploy]:
    """Publish the previous (or the named) release as a new seq. Returns the result and the replaced deploy."""
    pointer = read_pointer(publisher.clients.s3, publisher.bucket, publisher.layout, channel, publisher.policy)
    if pointer is None:
        raise PublishError(f"{channel} has never been published; there is nothing to roll back")
    current = pointer.deploy
    if to is None:
        history = iter_history(publisher.clients.s3, publisher.bucket, publisher.layout, channel, publisher.policy)
        to = pick_previous(history, current).release_id
    elif to == current.release_id:
        raise PublishError(f"{channel} is already on release {to} (seq {current.seq})")
    marked = {**(origin or {}), "action": "rollback", "rollback_from_seq": str(current.seq)}
    return publisher.publish_existing(channel, to, origin=marked, staged=staged), current
