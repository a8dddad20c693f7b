"""`deployer gc` and clean deregistration against the emulator: only stale instances go, in a safe order."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from deployer.agent.config import AgentConfig
from deployer.agent.queue import SqsQueue
from deployer.agent.reporter import StatusReporter
from deployer.aws.registration import Removal, remove_registration, subscriptions_by_endpoint
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.names import TopicArn
from deployer.protocol.report import Lifecycle
from deployer.protocol.timestamps import parse_timestamp
from publisher.gc import Collector, Registration, describe, select_stale
from tests.support import BUCKET, FAST_POLICY, Fleet, cli

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def config(fleet: Fleet, role: str = "web") -> AgentConfig:
    return AgentConfig(stage="prod", role=role, components=("api",), bucket=BUCKET, topic_arn=fleet.topic_arn)


#: gc runs "this much later" than the test writes: LastModified of everything written now is then this old.
LATER = timedelta(hours=4)


def register(fleet: Fleet, instance_id: str, heartbeat_in_s: float = 0, role: str = "web") -> str:
    """What an agent's boot leaves behind: queue + DLQ + subscription + status report. Returns the subscription ARN.

    The report's heartbeat is `heartbeat_in_s` from now: an instance still alive when gc runs
    LATER heartbeats then, one that died heartbeated last now.
    """
    cfg = config(fleet, role)
    handle = SqsQueue(fleet.clients.sqs, fleet.clients.sns, cfg, instance_id, FAST_POLICY).ensure()
    reporter = StatusReporter(fleet.clients.s3, BUCKET, Layout(), ReportKey("prod", role, instance_id), ("api",))
    heartbeat = datetime.now(UTC) + timedelta(seconds=heartbeat_in_s)
    fleet.clients.s3.put_object(Bucket=BUCKET, Key=reporter.key, Body=reporter.report(now=heartbeat).to_json())
    return handle.subscription_arn


ALIVE_LATER = LATER.total_seconds()


def later() -> datetime:
    return datetime.now(UTC) + LATER


def queues(fleet: Fleet) -> set[str]:
    return {url.rsplit("/", 1)[1] for url in fleet.clients.sqs.list_queues().get("QueueUrls", [])}


def subscriptions(fleet: Fleet) -> set[str]:
    subs = fleet.clients.sns.list_subscriptions_by_topic(TopicArn=fleet.topic_arn)["Subscriptions"]
    return {s["Endpoint"].rsplit(":", 1)[1] for s in subs}


def statuses(fleet: Fleet) -> set[str]:
    listed = fleet.clients.s3.list_objects_v2(Bucket=BUCKET, Prefix="deployer/status/").get("Contents", [])
    return {Path(o["Key"]).stem for o in listed}


def collector(fleet: Fleet) -> Collector:
    return Collector(fleet.clients, BUCKET, fleet.topic_arn, fleet.layout, policy=FAST_POLICY)


def reg(instance: str, heartbeat: str | None, modified_age_s: float = 0) -> Registration:
    return Registration(
        ReportKey("prod", "web", instance),
        f"k/{instance}",
        "e",
        parse_timestamp(heartbeat),
        NOW - timedelta(seconds=modified_age_s),
    )


def leave(fleet: Fleet, instance_id: str, subscription_arn: str | None = None) -> Removal:
    """What a deregistering agent does; without the ARN from boot, its subscription is looked up by queue ARN."""
    name = config(fleet).queue_name(instance_id)
    found = subscriptions_by_endpoint(fleet.clients, fleet.topic_arn, FAST_POLICY)
    arns = [subscription_arn] if subscription_arn else found.get(TopicArn.parse(fleet.topic_arn).queue_arn(name), [])
    return remove_registration(
        fleet.clients,
        bucket=BUCKET,
        layout=fleet.layout,
        who=ReportKey("prod", "web", instance_id),
        queue_name=name,
        subscription_arns=arns,
        policy=FAST_POLICY,
    )


def test_stale_means_silent_twice_over_neither_the_heartbeat_nor_the_object_younger_than_the_ttl() -> None:
    regs = [
        reg("fresh", "2026-11-26T11:59:00Z", modified_age_s=60),
        reg("old", "2026-11-26T08:00:00Z", modified_age_s=4 * 3600),
        reg("older", "2026-11-25T08:00:00Z", modified_age_s=28 * 3600),
        reg("backdated", "2026-11-25T08:00:00Z", modified_age_s=60),  # the body lies; S3 wrote it a minute ago
        reg("unreadable-old", None, modified_age_s=7200),
        reg("unreadable-new", None, modified_age_s=10),
    ]
    assert [r.who.instance_id for r in select_stale(regs, NOW, 3600)] == ["older", "old", "unreadable-old"]


def test_an_instance_asleep_in_a_warm_pool_is_never_collected_however_silent() -> None:
    asleep = replace(reg("warm", "2026-11-20T08:00:00Z", modified_age_s=7 * 86400), lifecycle=Lifecycle.WARMED)
    left = replace(reg("left", "2026-11-26T08:00:00Z", modified_age_s=4 * 3600), lifecycle=Lifecycle.TERMINATED)
    assert [r.who.instance_id for r in select_stale([asleep, left], NOW, 3600)] == ["left"]


def test_gc_removes_only_stale_instances_subscription_first_and_a_dry_run_removes_nothing(fleet: Fleet) -> None:
    register(fleet, "i-alive", heartbeat_in_s=ALIVE_LATER)
    register(fleet, "i-dead")
    register(fleet, "i-dead-worker", role="worker")
    before = (queues(fleet), subscriptions(fleet), statuses(fleet))
    assert len(before[0]) == 6

    dry = collector(fleet).run(3600, dry_run=True, now=later())
    assert describe(dry, dry_run=True) == [
        "would remove prod/web/i-dead: 1 subscription(s), queues deployer--prod--web--i-dead, "
        "deployer--prod--web--i-dead--dlq, status report",
        "would remove prod/worker/i-dead-worker: 1 subscription(s), queues deployer--prod--worker--i-dead-worker, "
        "deployer--prod--worker--i-dead-worker--dlq, status report",
        "2 stale instance(s) would be removed",
    ]
    assert (queues(fleet), subscriptions(fleet), statuses(fleet)) == before

    removed = collector(fleet).run(3600, now=later())
    assert {r.instance_id for r in removed} == {"i-dead", "i-dead-worker"}
    assert queues(fleet) == {"deployer--prod--web--i-alive", "deployer--prod--web--i-alive--dlq"}
    assert subscriptions(fleet) == {"deployer--prod--web--i-alive"}
    assert statuses(fleet) == {"i-alive"}

    # Idempotent: the next scheduled run finds nothing to do.
    assert collector(fleet).run(3600, now=later()) == []
    # And publishing still reaches the live instance (no subscription to a missing queue is left).
    fleet.clients.sns.publish(TopicArn=fleet.topic_arn, Message="ping")


def test_the_gc_command_reports_in_text_and_json_and_refuses_a_ttl_short_enough_to_catch_a_hook(fleet: Fleet) -> None:
    register(fleet, "i-alive")
    text = cli("gc", "instances", "--bucket", BUCKET, "--topic-arn", fleet.topic_arn, "--dry-run")
    assert (text.returncode, text.stdout.strip()) == (0, "0 stale instance(s) would be removed"), text.stderr
    machine = cli("gc", "instances", "--bucket", BUCKET, "--topic-arn", fleet.topic_arn, "--json")
    assert json.loads(machine.stdout) == {"dry_run": False, "removed": []}
    short = cli("gc", "instances", "--bucket", BUCKET, "--topic-arn", fleet.topic_arn, "--ttl", "60")
    assert short.returncode == 2
    assert "60" in short.stderr


def test_a_back_dated_heartbeat_does_not_get_a_live_instance_collected(fleet: Fleet) -> None:
    # A report whose body claims a heartbeat from yesterday, written just now (a forger, or a bad clock).
    register(fleet, "i-live", heartbeat_in_s=-24 * 3600)
    assert collector(fleet).run(3600) == []
    assert statuses(fleet) == {"i-live"}


def test_a_decoy_key_never_names_another_roles_queues(fleet: Fleet) -> None:
    register(fleet, "i-victim", heartbeat_in_s=ALIVE_LATER, role="web-admin")
    # Under the old naming, status/prod/web/admin-i-victim.json made gc delete deployer-prod-web-admin-i-victim.
    for decoy in ("admin-i-victim", "admin--i-victim", "../web-admin/i-victim"):
        key = f"deployer/status/prod/web/{decoy}.json"
        fleet.clients.s3.put_object(Bucket=BUCKET, Key=key, Body=b"{}")
    removed = collector(fleet).run(3600, now=later())
    assert [r.instance_id for r in removed] == ["admin-i-victim"]  # a report key of role web, gone with nothing else
    assert removed[0].queues == ()
    assert queues(fleet) == {"deployer--prod--web-admin--i-victim", "deployer--prod--web-admin--i-victim--dlq"}


def test_gc_finishes_a_removal_that_was_interrupted_after_the_subscription_went(fleet: Fleet) -> None:
    sub = register(fleet, "i-half")
    fleet.clients.sns.unsubscribe(SubscriptionArn=sub)
    [removal] = collector(fleet).run(3600, now=later())
    assert removal.subscriptions == ()
    assert removal.queues == ("deployer--prod--web--i-half", "deployer--prod--web--i-half--dlq")
    assert queues(fleet) == set()
    assert statuses(fleet) == set()


def test_gc_leaves_an_instance_that_heartbeated_between_the_scan_and_the_removal(fleet: Fleet) -> None:
    register(fleet, "i-back")

    class RacingCollector(Collector):
        def scan(self, now: datetime, ttl_s: float) -> list[Registration]:
            found = super().scan(now, ttl_s)
            register(fleet, "i-back", heartbeat_in_s=ALIVE_LATER)  # the instance comes back and rewrites its report
            return found

    racing = RacingCollector(fleet.clients, BUCKET, fleet.topic_arn, fleet.layout, policy=FAST_POLICY)
    assert racing.run(3600, now=later()) == []
    assert statuses(fleet) == {"i-back"}
    assert "deployer--prod--web--i-back" in queues(fleet)


def test_an_agent_deregisters_itself_on_clean_shutdown(fleet: Fleet) -> None:
    register(fleet, "i-other")
    sub = register(fleet, "i-leaving")
    calls: list[str] = []
    for client in (fleet.clients.sns, fleet.clients.sqs, fleet.clients.s3):
        client.meta.events.register("before-call", lambda model, **_: calls.append(model.name))
    removal = leave(fleet, "i-leaving", sub)
    assert removal.subscriptions == (sub,)
    # Subscription first, queues next, the status report last (so an interrupted run is finished by gc).
    mutations = [c for c in calls if c in ("Unsubscribe", "DeleteQueue", "DeleteObject")]
    assert mutations == ["Unsubscribe", "DeleteQueue", "DeleteQueue", "DeleteObject"]
    assert subscriptions(fleet) == {"deployer--prod--web--i-other"}
    assert queues(fleet) == {"deployer--prod--web--i-other", "deployer--prod--web--i-other--dlq"}
    assert statuses(fleet) == {"i-other"}
    # Without the subscription ARN it finds its own subscription by the queue's ARN; repeating is harmless.
    register(fleet, "i-leaving")
    leave(fleet, "i-leaving")
    leave(fleet, "i-leaving")
    assert statuses(fleet) == {"i-other"}
    assert subscriptions(fleet) == {"deployer--prod--web--i-other"}
