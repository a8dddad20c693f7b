"""One publish, many regions and accounts: the targets of a fleet definition moved as waves.

Every target is a fleet of its own (bucket, topic, seqs, agents, trust). A publish across them
first **stores the release in every target** (the artifact once per region, the manifest; a
target that cannot be reached or written fails the command before any pointer moves), then
writes the **record** (deployer.protocol.targets) and moves the targets wave by wave: each
target's pointer moves (a staged rollout inside it with `--waves`), the wave must converge in
every one of its targets (and bake), then the next wave starts. When a target fails (it does
not converge, its inner rollout rolls back, its topic refuses the deploy), the waves after it
never start and **every target already moved is moved back** to the release it ran before, as
a rollback deploy (a new seq; agents that keep the release on disk re-activate it). The record
says, at every step, which targets moved to which seq: `rollout status|resume|abort --targets`
read it, so a resumed publish knows exactly where it stands. (docs/design.md, "Regions and accounts")
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from deployer.aws.clients import assumed_session, make_clients
from deployer.aws.reports import ReportReader
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.aws.s3 import get_document, list_objects, put_conditional, read_pointer
from deployer.protocol.errors import DeployerError, PreconditionFailed, PublishError
from deployer.protocol.events import EventType, deploy_event
from deployer.protocol.layout import Layout
from deployer.protocol.names import Channel
from deployer.protocol.targets import Move, MoveState, Record, RecordState, Target, parse_record, waves_of
from publisher.notify import Herald
from publisher.publish import Publisher
from publisher.rollback import rollback
from publisher.rollout import EXIT_ROLLED_BACK, Driver, Gates, RolloutEnd, prepare
from publisher.wait import Progress, Waiter, WaitOptions, verdict_line

if TYPE_CHECKING:
    from deployer.protocol.manifest import Manifest
    from publisher.pack import Artifact
    from publisher.signing import Signer

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Reach:
    """A target, connected: a publisher with clients in its region, as its role where it names one."""

    target: Target
    publisher: Publisher

    def label(self) -> str:
        account = self.target.topic_arn.split(":")[4]
        return f"{self.target.name} ({self.target.region}, {account})"

    def reader(self, channel: Channel) -> ReportReader:
        p = self.publisher
        return ReportReader(p.clients.s3, p.bucket, p.layout, channel.stage, channel.role)


def connect(
    target: Target,
    endpoint_url: str | None,
    signers: Sequence[Signer] = (),
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Reach:
    """Clients in the target's region, as the target's role (AssumeRole with its external id) when it
    names one; the caller's own credentials otherwise."""
    session = None
    if target.role_arn:
        name = f"deployer-{socket.gethostname()}-{os.getpid()}".replace(".", "-")
        session = assumed_session(target.region, endpoint_url, target.role_arn, target.external_id, name, policy)
    clients = make_clients(target.region, endpoint_url, session)
    return Reach(target, Publisher(clients, target.bucket, target.topic_arn, Layout(target.prefix), signers=signers))


class Records:
    """The records of publishes across targets, in the first target's bucket; written conditionally."""

    def __init__(self, reach: Reach) -> None:
        self.publisher = reach.publisher

    def latest(self, channel: Channel) -> tuple[Record, str] | None:
        p = self.publisher
        listed = list_objects(p.clients.s3, p.bucket, p.layout.targets_records_prefix(channel), p.policy)
        if not listed:
            return None
        newest = max(listed, key=lambda item: item.key)
        found = get_document(p.clients.s3, p.bucket, newest.key, p.policy)
        return (parse_record(found[0]), found[1]) if found else None

    def write(self, channel: Channel, record: Record, etag: str | None) -> str:
        p = self.publisher
        key = p.layout.targets_record_key(channel, record.id)
        try:
            return put_conditional(
                p.clients.s3, p.bucket, key, record.to_json().encode(), if_match=etag, policy=p.policy
            )
        except PreconditionFailed:
            raise PublishError(
                "the targets record was changed by someone else (another driver, or `rollout abort --targets`); stopping"
            ) from None


def new_record_id(now: datetime | None = None) -> str:
    """Sortable by time, unique: `20261207T182659Z-1a2b3c4d`."""
    return f"{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@dataclass
class Spread:
    """Drives one publish across targets to done or rolled back; one line per step, prefixed by target."""

    reaches: Sequence[Reach]
    channel: Channel
    wait: WaitOptions
    gates: Gates | None = None
    origin: Mapping[str, str] = field(default_factory=dict)
    herald: Herald = field(default_factory=Herald)
    echo: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    _etag: str | None = None

    @property
    def records(self) -> Records:
        return Records(self.reaches[0])

    def publish(self, artifact: Artifact, template: Manifest, release_id: str) -> int:
        """Store the release in every target (side by side), record the publish, then move the waves."""
        with ThreadPoolExecutor(min(8, len(self.reaches)), thread_name_prefix="store") as pool:
            stores = {
                reach.target.name: pool.submit(
                    reach.publisher.store, self.channel, artifact, template=template, release_id=release_id
                )
                for reach in self.reaches
            }
            for reach in self.reaches:
                try:
                    stores[reach.target.name].result()
                except DeployerError as exc:
                    raise PublishError(f"{reach.label()}: {exc}; no target was moved") from None
        self.echo(f"stored release {release_id} in {len(self.reaches)} target(s)")
        record = Record(new_record_id(), str(self.channel), release_id, tuple(r.target for r in self.reaches))
        self._etag = self.records.write(self.channel, record, None)
        return self.drive(record)

    def resume(self, record: Record, etag: str) -> int:
        self._etag = etag
        if record.state is not RecordState.ROLLING:
            self.echo(f"the publish of {record.release_id} across targets is {record.state.value}; nothing to do")
            return 0 if record.state is RecordState.DONE else EXIT_ROLLED_BACK
        return self.drive(record)

    def abort(self, record: Record, etag: str, reason: str) -> int:
        """`rollout abort --targets`: every target the record moved goes back now."""
        self._etag = etag
        if record.state is not RecordState.ROLLING:
            self.echo(f"the publish of {record.release_id} across targets is already {record.state.value}")
            return 0 if record.state is RecordState.DONE else EXIT_ROLLED_BACK
        return self.roll_back(record, reason)

    def drive(self, record: Record) -> int:
        by_name = {reach.target.name: reach for reach in self.reaches}
        waves = waves_of(record.targets)
        for index, wave in enumerate(waves):
            for target in wave:
                if target.name in record.moves:
                    continue
                try:
                    move, sns_error = self._move(by_name[target.name], record.release_id)
                except DeployerError as exc:
                    return self.roll_back(record, f"{by_name[target.name].label()} could not be moved: {exc}")
                record = self._save(record.moved(target, move))
                if sns_error:
                    failed = replace(move, state=MoveState.FAILED)
                    record = self._save(record.moved(target, failed))
                    return self.roll_back(
                        record, f"{by_name[target.name].label()}: its topic refused the deploy ({sns_error})"
                    )
            for target in wave:
                move = record.moves[target.name]
                if move.state is not MoveState.MOVED:
                    continue
                state, why = self._converge(by_name[target.name], move)
                record = self._save(record.moved(target, replace(move, state=state)))
                if state is not MoveState.PASSED:
                    return self.roll_back(record, f"{by_name[target.name].label()}: {why}")
            if index < len(waves) - 1 and self.gates is not None and self.gates.bake_s > 0:
                self.echo(f"targets wave {index} passed; baking {self.gates.bake_s:.0f}s")
                self.sleep(self.gates.bake_s)
        self._save(replace(record, state=RecordState.DONE, reason=None))
        self.echo(f"OK: {self.channel} release {record.release_id} is on every target ({len(record.targets)})")
        return 0

    def roll_back(self, record: Record, reason: str) -> int:
        """Every target the record moved goes back to the release it replaced; the others were never touched."""
        self.echo(f"stopping: {reason}")
        log.error("targets_rolling_back", reason=reason, next="every target already moved returns to its release")
        by_name = {reach.target.name: reach for reach in self.reaches}
        for target in record.targets:
            move = record.moves.get(target.name)
            reach = by_name[target.name]
            if move is None:
                self.echo(f"[{target.name}] not moved")
                continue
            if move.state is MoveState.ROLLED_BACK:
                self.echo(f"[{target.name}] already back on {move.replaced or 'its earlier release'}")
                continue
            if move.replaced is None:
                self.echo(f"[{target.name}] left on {record.release_id}: it had no earlier release to go back to")
                continue
            try:
                result, _ = rollback(reach.publisher, self.channel, to=move.replaced, origin=dict(self.origin))
            except DeployerError as exc:
                self.echo(f"[{target.name}] could NOT be rolled back ({exc}); run `deployer rollout abort --targets …`")
                continue
            record = self._save(record.moved(target, replace(move, state=MoveState.ROLLED_BACK)))
            self.echo(f"[{target.name}] rolled back to {move.replaced} as seq {result.deploy.seq}")
        self._save(replace(record, state=RecordState.ROLLED_BACK, reason=reason[:500]))
        self.echo(f"ROLLED BACK: {self.channel} release {record.release_id} across targets: {reason}")
        return EXIT_ROLLED_BACK

    def _move(self, reach: Reach, release_id: str) -> tuple[Move, str | None]:
        p = reach.publisher
        before = read_pointer(p.clients.s3, p.bucket, p.layout, self.channel, p.policy)
        staging = None
        if self.gates is not None and self.gates.waves:
            gates = self.gates.watching(self.wait)
            staging = prepare(
                p, self.channel, gates, {who.instance_id: e for who, e in reach.reader(self.channel).refresh().items()}
            )
        result = p.publish_existing(self.channel, release_id, origin=self.origin, staged=staging)
        deploy = result.deploy
        self.echo(f"[{reach.target.name}] published {deploy.channel} release {release_id} as seq {deploy.seq}")
        self.herald.emit(deploy_event(EventType.DEPLOY_PUBLISHED, deploy), notify=False)
        replaced = before.deploy.release_id if before else None
        return Move(deploy.seq, deploy.deploy_id, replaced), result.sns_error

    def _converge(self, reach: Reach, move: Move) -> tuple[MoveState, str]:
        """Wait for the target's fleet (drive its staged rollout): PASSED, or why not."""
        p = reach.publisher
        pointer = read_pointer(p.clients.s3, p.bucket, p.layout, self.channel, p.policy)
        if pointer is None or pointer.deploy.deploy_id != move.deploy_id:
            return MoveState.FAILED, "its pointer was moved by someone else meanwhile"
        deploy = pointer.deploy
        if deploy.rollout is not None:
            plan = deploy.rollout
            gates = (self.gates or Gates.of_plan(plan)).watching(self.wait)
            driver = Driver(
                p, reach.reader(self.channel), gates, deploy, echo=self._prefixed(reach), herald=self.herald
            )
            driver.take(force=True)
            end = driver.drive()
            if end is RolloutEnd.DONE:
                return MoveState.PASSED, ""
            state = MoveState.ROLLED_BACK if end is RolloutEnd.ROLLED_BACK else MoveState.FAILED
            return state, f"its staged rollout ended {end.value}"
        shown = [""]

        def progress(now: Progress) -> None:
            if now.line() != shown[0]:
                shown[0] = now.line()
                self.echo(f"[{reach.target.name}] {shown[0]}")

        outcome = Waiter(reach.reader(self.channel), self.wait).wait(deploy, progress)
        self.herald.emit(outcome.event())
        self.echo(f"[{reach.target.name}] {verdict_line(outcome)}")
        if outcome.exit_code == 0:
            return MoveState.PASSED, ""
        return MoveState.FAILED, verdict_line(outcome)

    def _save(self, record: Record) -> Record:
        self._etag = self.records.write(self.channel, record, self._etag)
        return record

    def _prefixed(self, reach: Reach) -> Callable[[str], None]:
        return lambda line: self.echo(f"[{reach.target.name}] {line}")
