"""The deploy runner in process: a real Applier on tmp_path, history through the `History` port.

What CI wrote (history entries, rollout cursors) is a dict here; everything else is the real
thing: the ledger, the apply lock, the applier with a file:// artifact and an inline manifest,
the hooks as processes, the status reporter (its S3 writes recorded). The subprocess tests
cover the same paths end to end; these say which decision made each outcome.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from deployer.agent.config import AgentConfig
from deployer.agent.decide import Outcome
from deployer.agent.ledger import DeployStatus, Ledger
from deployer.agent.metrics import Metrics
from deployer.agent.reporter import StatusReporter
from deployer.agent.runner import DeployRunner
from deployer.agent.shutdown import Shutdown
from deployer.protocol.deploy import Deploy
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.manifest import Commands, Hook, Manifest, SyncStrategy
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState
from deployer.protocol.rollout import BUCKETS, Cursor, Plan, RolloutState, Stable
from tests.support import FAST_POLICY, make_deploy, release_tarball

TOPIC = "arn:aws:sns:us-east-1:123456789012:deployer"
INSTANCE = "i-0runner000000001"
LAYOUT = Layout("deployer")
RAN = 'echo "$DEPLOYER_DEPLOY_ID" >> "$DEPLOYER_RELEASE_DIR/../../hooks.log"'


@dataclass
class Published:
    """`History` as a dict: what CI wrote, by channel and seq (entries) or deploy id (cursors)."""

    entries: dict[tuple[Channel, int], bytes] = field(default_factory=dict)
    cursors: dict[tuple[Channel, str], bytes] = field(default_factory=dict)
    #: Who told that a rollout's candidate failed (failure markers), by channel and deploy id.
    failures: dict[tuple[Channel, str], frozenset[str]] = field(default_factory=dict)

    def entry(self, channel: Channel, seq: int) -> bytes | None:
        return self.entries.get((channel, seq))

    def cursor(self, channel: Channel, deploy_id: str) -> bytes | None:
        return self.cursors.get((channel, deploy_id))

    def failed(self, channel: Channel, deploy_id: str) -> frozenset[str]:
        return self.failures.get((channel, deploy_id), frozenset())

    def publish(self, deploy: Deploy) -> Deploy:
        self.entries[(deploy.channel, deploy.seq)] = deploy.to_json().encode()
        return deploy


@dataclass
class RecordedS3:
    """Where the status reporter writes: kept in memory. Nothing else of the runner may use S3 here."""

    puts: list[dict[str, Any]] = field(default_factory=list)

    def put_object(self, **request: Any) -> dict[str, str]:
        self.puts.append(request)
        return {"ETag": '"e"'}


@dataclass
class Instance:
    runner: DeployRunner
    published: Published
    reporter: StatusReporter
    ledger: Ledger
    root: Path

    def hooks(self) -> list[str]:
        log = self.root / "opt/api/hooks.log"
        return log.read_text().split() if log.exists() else []

    def served(self) -> str | None:
        page = self.root / "opt/api/current/index.html"
        return page.read_text() if page.exists() else None


@pytest.fixture
def instance(tmp_path: Path) -> Instance:
    config = AgentConfig(
        stage="prod",
        role="web",
        components=("api",),
        bucket="fleet",
        topic_arn=TOPIC,
        instance_id=INSTANCE,
        root_dir=tmp_path / "root",
        state_dir=tmp_path / "state",
        max_receive_count=2,
    )
    s3 = cast(Any, RecordedS3())
    ledger = Ledger(config.state_dir)
    reporter = StatusReporter(s3, "fleet", LAYOUT, ReportKey("prod", "web", INSTANCE), ("api",), FAST_POLICY)
    published = Published()
    metrics = Metrics("prod", "web", tmp_path / "textfile" / "deployer.prom")
    runner = DeployRunner(
        config,
        s3,
        FAST_POLICY,
        ledger=ledger,
        reporter=reporter,
        instance_id=INSTANCE,
        shutdown=Shutdown(5.0),
        history=published,
        metrics=metrics,
    )
    return Instance(runner, published, reporter, ledger, config.root_dir)


def release(tmp_path: Path, name: str, seq: int, *, post: str = RAN) -> Deploy:
    """A deploy of release `name` with an inline manifest and a file:// artifact (no S3 involved)."""
    artifact = tmp_path / f"{name}.tar.gz"
    artifact.write_bytes(release_tarball({"index.html": name}))
    manifest = Manifest(
        src=artifact.as_uri(),
        checksum=hashlib.sha256(artifact.read_bytes()).hexdigest(),
        dest="/opt/api/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(post=(Hook(post),)),
    ).to_yaml()
    return make_deploy(
        deploy_id=f"00000000-0000-4000-8000-{seq:012d}",
        seq=seq,
        release_id=name,
        manifest_key=LAYOUT.manifest_key("api", name),
        manifest_sha256=hashlib.sha256(manifest.encode()).hexdigest(),
        manifest=manifest,
    )


def test_a_deploy_its_history_confirms_is_applied_recorded_and_reported(instance: Instance, tmp_path: Path) -> None:
    deploy = instance.published.publish(release(tmp_path, "r1", 1))
    assert instance.runner.apply(deploy) == (Outcome.APPLIED, "applied")
    assert instance.served() == "r1"
    assert instance.hooks() == [deploy.deploy_id]
    assert instance.ledger.load().applied()[deploy.channel] == (1, deploy.deploy_id)
    assert instance.reporter.components["api"].state is ComponentState.OK
    # Delivered again: nothing runs twice.
    assert instance.runner.apply(deploy)[0] is Outcome.APPLIED
    assert instance.hooks() == [deploy.deploy_id]
    # Measured once (the second delivery was a skip), with the artifact's bytes.
    textfile = (tmp_path / "textfile/deployer.prom").read_text()
    assert 'deployer_applies_total{stage="prod",role="web",component="api",outcome="applied"} 1' in textfile
    assert 'deployer_download_bytes_total{stage="prod",role="web",component="api"} 0' not in textfile


def test_nothing_of_a_deploy_history_does_not_confirm_happens_before_it_is_found_out(
    instance: Instance, tmp_path: Path
) -> None:
    deploy = release(tmp_path, "forged", 1)  # never published: no history entry
    outcome, why = instance.runner.apply(deploy)
    assert outcome is Outcome.UNAUTHENTIC
    assert "no deploy was published as seq 1 of prod/web/api" in why
    assert instance.hooks() == []
    assert instance.served() is None
    assert not (instance.root / "opt/api/releases/forged").exists()  # staged, never entered releases/
    assert instance.ledger.deploy_record(deploy.deploy_id) is None
    assert instance.reporter.components["api"].state is ComponentState.PENDING


def test_a_deploy_unlike_its_history_entry_is_unauthentic_whatever_else_failed(
    instance: Instance, tmp_path: Path
) -> None:
    genuine = instance.published.publish(release(tmp_path, "r1", 1))
    forged = replace(release(tmp_path, "evil", 1, post="exit 3"), deploy_id=genuine.deploy_id)
    outcome, why = instance.runner.apply(forged)
    assert outcome is Outcome.UNAUTHENTIC  # not FAILED: its hook never ran to fail
    assert "was published as deploy" in why
    assert instance.hooks() == []
    assert instance.ledger.deploy_record(forged.deploy_id) is None


def test_an_instance_on_the_stable_release_holds_it_until_its_wave_without_running_anything(
    instance: Instance, tmp_path: Path
) -> None:
    stable = instance.published.publish(release(tmp_path, "r1", 1))
    instance.runner.apply(stable)
    plan = Plan(
        waves=("1", "100%"),
        first=("i-0somebodyelse0001",),
        thresholds=(BUCKETS,),
        stable=Stable(stable.release_id, stable.manifest_key, stable.manifest_sha256),
    )
    candidate = instance.published.publish(replace(release(tmp_path, "r2", 2), rollout=plan))
    now = datetime.now(UTC)
    cursor = Cursor(candidate.deploy_id, 0, RolloutState.ROLLING, now, "ci", now + timedelta(minutes=1))
    instance.published.cursors[(candidate.channel, candidate.deploy_id)] = cursor.to_json().encode()
    outcome, why = instance.runner.apply(candidate)
    assert (outcome, why) == (Outcome.APPLIED, "runs the stable release; admitted in wave 1")
    assert instance.served() == "r1"
    assert instance.hooks() == [stable.deploy_id]  # holding stable runs no hook
    assert instance.reporter.components["api"].state is ComponentState.WAITING
    held = instance.ledger.deploy_record(candidate.deploy_id + ":stable")
    assert held is not None
    assert held.status is DeployStatus.COMPLETED


def test_a_deploy_that_failed_max_receive_count_times_is_no_longer_worth_retrying(
    instance: Instance, tmp_path: Path
) -> None:
    broken = instance.published.publish(release(tmp_path, "bad", 1, post="exit 3"))
    assert instance.runner.worth_retrying(broken)
    assert instance.runner.apply(broken)[0] is Outcome.FAILED
    assert instance.runner.worth_retrying(broken)  # one failure of two allowed
    assert instance.runner.apply(broken)[0] is Outcome.FAILED
    assert not instance.runner.worth_retrying(broken)
    assert instance.reporter.components["api"].state is ComponentState.FAILED
    assert "exited 3" in (instance.reporter.components["api"].error or "")
