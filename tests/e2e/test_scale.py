"""Fleet scale against the limits real AWS enforces and moto does not (`tests/limits.py`): the
filter-policy quota, API throttling, the size limit with attributes, the queue re-create delay.
Agents are real subprocesses talking to moto through the limits proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deployer.agent.queue import DLQ_RETENTION_SECONDS, REJECTION_ATTRIBUTE
from deployer.aws.clients import make_clients
from deployer.protocol.deploy import Deploy
from deployer.protocol.limits import MAX_SQS_MESSAGE_BYTES
from deployer.protocol.manifest import Hook
from deployer.protocol.names import DLQ_SUFFIX
from publisher.wait import EXIT_FAILED, EXIT_TIMEOUT
from tests.awsproxy import AwsProxy, Rule, aws_proxy, sqs_error
from tests.limits import (
    FilterPolicyQuota,
    MessageSize,
    QueueRecreateDelay,
    Refuse,
    SubscribeComparesAttributes,
    Throttle,
)
from tests.support import (
    FAST_AGENT,
    REGION,
    AgentProcess,
    Fleet,
    artifact,
    cli,
    make_asg,
    publish_args,
    wait_until,
)

#: Agents retry boot after 5-10 s; a healed queue comes back after the proxy's re-create delay.
SLOW = 60.0
#: The re-create delay the proxy enforces here (AWS: 60 s), long enough to be met once.
RECREATE_DELAY_S = 3.0


@pytest.fixture
def limits(fleet: Fleet) -> Iterator[AwsProxy]:
    """moto behind the limits every test here must live with; a test may append its own rules."""
    rules: list[Rule] = [
        FilterPolicyQuota(per_topic=2),
        SubscribeComparesAttributes(fleet.endpoint_url),
        QueueRecreateDelay(RECREATE_DELAY_S),
        MessageSize(fleet.endpoint_url),
    ]
    with aws_proxy(fleet.endpoint_url, *rules) as proxy:
        yield proxy


def test_the_limits_proxy_refuses_a_filter_policy_past_the_quota_like_sns(limits: AwsProxy, fleet: Fleet) -> None:
    """The fake is checked first: with a quota of 2, the third filtered subscription gets SNS's 403."""
    sqs, sns = fleet.clients.sqs, make_clients(REGION, limits.url).sns
    codes = []
    for n in range(3):
        url = sqs.create_queue(QueueName=f"filtered-{n}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        try:
            sns.subscribe(TopicArn=fleet.topic_arn, Protocol="sqs", Endpoint=arn, Attributes={"FilterPolicy": "{}"})
            codes.append("ok")
        except sns.exceptions.ClientError as exc:
            codes.append(f"{exc.response['ResponseMetadata']['HTTPStatusCode']} {exc.response['Error']['Code']}")
    assert codes == ["ok", "ok", "403 FilterPolicyLimitExceeded"]


def test_more_agents_than_the_filter_policy_quota_all_boot_and_converge(
    limits: AwsProxy, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agents = [start_agent(endpoint_url=limits.url) for _ in range(4)]
    deploy = publish("for every instance")
    for agent in agents:
        wait_until(lambda a=agent: a.on_seq(deploy.seq), f"{agent.instance_id} to converge")  # type: ignore[misc]
    assert not [key for key in limits.refused if key[1] == "Subscribe"]


def test_an_agent_restarts_cleanly_after_its_queues_attributes_drifted(
    limits: AwsProxy, fleet: Fleet, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(endpoint_url=limits.url)
    agent.stop()
    # An operator (or an older release) changed the DLQ: CreateQueue with attributes would now fail.
    dlq = agent.queue_url(DLQ_SUFFIX)
    fleet.clients.sqs.set_queue_attributes(QueueUrl=dlq, Attributes={"MessageRetentionPeriod": "60"})
    agent.start()
    # It re-subscribes too, with the very attributes its subscription has (SNS compares them).
    wait_until(lambda: len(agent.events("agent_serving")) == 2, "the restarted agent to serve")
    assert not agent.events("boot_failed")
    retention = fleet.clients.sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["MessageRetentionPeriod"])
    assert retention["Attributes"]["MessageRetentionPeriod"] == str(DLQ_RETENTION_SECONDS)


def test_an_agent_that_cannot_boot_says_so_keeps_retrying_and_wait_never_says_ok(
    limits: AwsProxy, fleet: Fleet, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    healthy = start_agent(endpoint_url=limits.url, **FAST_AGENT)
    denied = Refuse(
        lambda call: call.action == "CreateQueue" and "i-e2e0000000000002" in str(call.params.get("QueueName")),
        lambda: sqs_error("AccessDenied", "not authorized to perform sqs:CreateQueue", "AccessDenied", 403),
    )
    limits.rules = [denied, *limits.rules]
    broken = start_agent(endpoint_url=limits.url, **FAST_AGENT)
    report = broken.status()
    assert report is not None
    assert report.boot_error is not None
    assert "AccessDenied" in report.boot_error
    assert broken.alive()  # not a crash loop: it retries by itself

    waited = cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", "--timeout", "4"))
    assert waited.returncode == EXIT_TIMEOUT, waited.stdout + waited.stderr
    assert f"{broken.instance_id}: pending: the agent cannot boot (it retries): " in waited.stdout
    assert "OK:" not in waited.stdout
    status = cli("status", "--bucket", fleet.bucket)
    assert "boot_failed" in status.stdout, status.stdout
    assert "1 cannot boot" in status.stdout

    limits.rules = limits.rules[1:]  # IAM fixed: the next attempt joins and catches up
    wait_until(lambda: broken.on_seq(1), "the broken agent to boot and converge", timeout=SLOW)
    assert healthy.on_seq(1)
    report = broken.status()
    assert report is not None
    assert report.boot_error is None


@pytest.mark.moto_only(reason="an Auto Scaling group (make_asg): LocalStack's community core answers 501")
def test_publish_wait_with_asg_counts_an_instance_that_never_reported_as_lost(
    fleet: Fleet, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    members = make_asg(fleet.endpoint_url, "web-asg", 3)
    for instance in members[:2]:
        start_agent(instance, **FAST_AGENT)
    blind = cli(*publish_args(fleet, artifact(tmp_path, "v1", "v1"), "--wait", "--heartbeat-ttl", "3"))
    # Without --asg, the instance that never wrote a report is not seen at all (the README says so).
    assert "OK: 2/2 converged" in blind.stdout, blind.stdout
    assert blind.returncode == 0
    seen = cli(
        *publish_args(fleet, artifact(tmp_path, "v2", "v2"), "--wait", "--heartbeat-ttl", "3", "--asg", "web-asg")
    )
    assert seen.returncode == EXIT_FAILED, seen.stdout + seen.stderr
    assert f"{members[2]}: lost: in service but never wrote a status report" in seen.stdout
    assert "FAILED: 2/3 converged on seq 2" in seen.stdout
    missing = cli(*publish_args(fleet, artifact(tmp_path, "v3", "v3"), "--wait", "--asg", "no-such-asg"))
    assert missing.returncode == 1
    assert "Auto Scaling group 'no-such-asg' not found" in missing.stderr
    assert "published" not in missing.stdout  # refused before the pointer moved


def test_a_queue_deleted_under_a_running_agent_is_recreated_and_the_agent_catches_up(
    limits: AwsProxy, fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent(endpoint_url=limits.url)
    sqs = make_clients(REGION, limits.url).sqs
    for suffix in ("", DLQ_SUFFIX):
        sqs.delete_queue(QueueUrl=agent.queue_url(suffix))
    fleet.clients.s3.delete_object(Bucket=fleet.bucket, Key=fleet.layout.status_key(agent.who))
    missed = publish("published while the queue was gone")
    wait_until(lambda: agent.on_seq(missed.seq), "the agent to heal and catch up", timeout=SLOW)
    assert agent.events("queue_missing")
    refused = [e for e in agent.events("queue_recreate_failed") if "QueueDeletedRecently" in e["error"]]
    assert refused, "the re-create delay was never met"
    assert agent.events("queue_recreated")
    assert agent.status() is not None  # re-reported
    pushed = publish("pushed to the new queue")
    wait_until(lambda: agent.on_seq(pushed.seq), "the next deploy to arrive through the re-created queue")
    assert [e["reason"] for e in agent.events("reconcile_behind")] == ["queue_recreated"]


def test_a_failed_dlq_copy_leaves_that_message_to_redrive_and_the_rest_of_the_batch_is_applied(
    limits: AwsProxy, fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent(endpoint_url=limits.url)
    broken_dlq = Refuse(
        lambda call: call.action == "SendMessage" and str(call.params.get("QueueUrl")).endswith(DLQ_SUFFIX),
        lambda: sqs_error("AccessDenied", "the DLQ's policy denies this principal", "AccessDenied", 403),
    )
    limits.rules = [broken_dlq, *limits.rules]
    busy = publish("slow", post=(Hook("sleep 2"),))
    wait_until(lambda: bool(agent.events("apply_started")), "the slow apply to start")
    fleet.clients.sqs.send_message(QueueUrl=agent.queue_url(), MessageBody="poison")
    good = publish("after the poison")  # arrives in the same receive as the poison
    wait_until(lambda: agent.on_seq(good.seq), "the good deploy of the batch to be applied")
    assert busy.seq < good.seq
    failed = agent.events("message_settle_failed")
    assert [e["action"] for e in failed] == ["dead_letter"]
    assert broken_dlq.refused >= 1
    assert agent.alive()


def test_a_poison_message_at_the_size_limit_reaches_the_dlq_cut_to_fit_its_reason(
    limits: AwsProxy, fleet: Fleet, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(endpoint_url=limits.url)
    fleet.clients.sqs.send_message(QueueUrl=agent.queue_url(), MessageBody="x" * MAX_SQS_MESSAGE_BYTES)
    wait_until(lambda: bool(agent.events("message_rejected")), "the oversized message to be rejected")
    answer = fleet.clients.sqs.receive_message(
        QueueUrl=agent.queue_url(DLQ_SUFFIX), MessageAttributeNames=["All"], WaitTimeSeconds=5
    )
    [moved] = answer["Messages"]
    reason = moved["MessageAttributes"][REJECTION_ATTRIBUTE]["StringValue"]
    assert f"of {MAX_SQS_MESSAGE_BYTES} bytes to fit SQS's size limit" in reason
    assert MAX_SQS_MESSAGE_BYTES - 1500 < len(moved["Body"]) < MAX_SQS_MESSAGE_BYTES
    assert not agent.events("message_settle_failed")


def test_a_scale_out_under_api_throttling_boots_a_dozen_agents_and_converges(
    fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    """Hundreds of instances launched at once hit SNS's and SQS's API rates; a dozen agents
    against a proportionally small rate stand in for them on two cores."""
    control = frozenset({"CreateQueue", "GetQueueAttributes", "SetQueueAttributes", "GetQueueUrl"})
    throttles = [Throttle("sns", frozenset({"Subscribe"}), rate=1, burst=1), Throttle("sqs", control, rate=6, burst=4)]
    with aws_proxy(fleet.endpoint_url, *throttles) as proxy:
        agents = [start_agent(endpoint_url=proxy.url, boot=False) for _ in range(12)]
        deploy = publish("after the scale-out")
        for agent in agents:
            wait_until(lambda a=agent: a.on_seq(deploy.seq), f"{agent.instance_id} to converge", timeout=SLOW)  # type: ignore[misc]
        assert all(t.throttled for t in throttles), [t.throttled for t in throttles]
        assert all(agent.alive() for agent in agents)
