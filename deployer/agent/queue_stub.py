"""An in-memory `InstanceQueue` for unit tests of the agent loop: no emulator, no subprocess.

It keeps SQS's visible behaviour that the loop depends on: a received message is invisible
until deleted or its visibility runs out, `ApproximateReceiveCount` grows on every receive,
a visibility of 0 makes it receivable again at once, a dead-lettered message moves to a
separate list with its reason, and a deleted queue fails every call until `ensure` re-creates it. Time is an injected clock, so tests step it instead of sleeping.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from deployer.agent.queue import Received, clamp_visibility
from deployer.protocol.errors import AwsError, QueueMissing
from deployer.protocol.limits import MAX_RECEIVE_BATCH


@dataclass
class StubMessage:
    message_id: str
    body: str
    receive_count: int = 0
    visible_at: float = 0.0
    receipt_handle: str = ""


@dataclass
class MemoryQueue:
    """The port over a list. `visibility_s` is the queue's default visibility timeout."""

    clock: Callable[[], float]
    visibility_s: int = 600
    queue_name: str = "memory-queue"
    messages: list[StubMessage] = field(default_factory=list)
    dead_letters: list[tuple[str, str]] = field(default_factory=list)  # (body, reason)
    #: Every visibility change, as (message_id, seconds), in order.
    visibility_changes: list[tuple[str, int]] = field(default_factory=list)
    #: Set to make every call fail as SQS does for a deleted queue; `ensure` re-creates it (empty).
    gone: bool = False
    #: How many `ensure` calls fail first (SQS refusing a deleted queue's name for 60 s).
    refuse_ensure: int = 0
    ensured: int = 0
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def name(self) -> str:
        return self.queue_name

    def ensure(self) -> None:
        if self.refuse_ensure > 0:
            self.refuse_ensure -= 1
            raise AwsError("AWS CreateQueue failed: QueueDeletedRecently", code="QueueDeletedRecently", status=400)
        if self.gone:
            self.messages = []
        self.gone = False
        self.ensured += 1

    def delete_queue(self) -> None:
        """What gc (or an operator) does: the queue and everything in it is gone."""
        self.gone = True
        self.messages = []

    def _exists(self) -> None:
        if self.gone:
            raise QueueMissing(f"queue {self.queue_name} no longer exists")

    def send(self, body: str) -> str:
        message_id = f"m-{next(self._ids)}"
        self.messages.append(StubMessage(message_id, body))
        return message_id

    def receive(self, _wait_seconds: int, /) -> list[Received]:
        """What is visible now; a stub has nothing to wait for (time moves by the injected clock)."""
        self._exists()
        now = self.clock()
        batch: list[Received] = []
        for message in self.messages:
            if len(batch) == MAX_RECEIVE_BATCH:
                break
            if message.visible_at > now:
                continue
            message.receive_count += 1
            message.visible_at = now + self.visibility_s
            message.receipt_handle = f"{message.message_id}#{message.receive_count}"
            batch.append(Received(message.message_id, message.receipt_handle, message.body, message.receive_count))
        return batch

    def delete(self, receipt_handle: str) -> None:
        self._exists()
        self.messages = [m for m in self.messages if m.receipt_handle != receipt_handle]

    def set_visibility(self, receipt_handle: str, seconds: int) -> None:
        self._exists()
        for message in self.messages:
            if message.receipt_handle == receipt_handle:
                message.visible_at = self.clock() + clamp_visibility(seconds)
                self.visibility_changes.append((message.message_id, clamp_visibility(seconds)))

    def dead_letter(self, message: Received, reason: str) -> None:
        self._exists()
        self.dead_letters.append((message.body, reason))
        self.delete(message.receipt_handle)

    def pending(self) -> list[str]:
        """Bodies still in the queue (visible or not)."""
        return [m.body for m in self.messages]
