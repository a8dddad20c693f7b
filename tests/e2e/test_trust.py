"""Nobody but CI moves the fleet: each attack of issue 11, replayed against real agents on the emulator.

Every forged or replayed deploy must be rejected to the DLQ with its reason and `last_rejection`,
and leave the running release, `state.json` and the component's status exactly as they were.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from deployer.aws.s3 import get_document
from deployer.protocol.deploy import Deploy, parse_deploy
from deployer.protocol.layout import ReportKey
from deployer.protocol.names import DLQ_SUFFIX, Channel
from deployer.protocol.report import ComponentState
from publisher.publish import Publisher
from tests.support import BUCKET, AgentProcess, Fleet, InstanceRole, cli, make_tree, publish_args, wait_until

API = Channel("prod", "web", "api")


def history(fleet: Fleet, channel: Channel, seq: int) -> Deploy:
    found = get_document(fleet.clients.s3, BUCKET, fleet.layout.history_key(channel, seq))
    assert found is not None
    return parse_deploy(found[0])


def dlq_rejections(fleet: Fleet, agent: AgentProcess) -> dict[str, str]:
    """Body → deployer_rejection of every message in the agent's DLQ."""
    found = fleet.clients.sqs.receive_message(
        QueueUrl=agent.queue_url(DLQ_SUFFIX), MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
    )
    return {m["Body"]: m["MessageAttributes"]["deployer_rejection"]["StringValue"] for m in found.get("Messages", [])}


def snapshot(agent: AgentProcess) -> tuple[str, str, object]:
    """What a rejected message must not change: the live release, the ledger, the component's status."""
    status = agent.component()
    return agent.served(), (agent.home / "state" / "state.json").read_text(), (status.seq, status.state, status.error)


def send(fleet: Fleet, agent: AgentProcess, deploy: Deploy) -> None:
    fleet.clients.sqs.send_message(QueueUrl=agent.queue_url(), MessageBody=deploy.to_json())


def test_forged_and_replayed_deploys_are_rejected_and_change_nothing(
    fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent()
    first = publish("release one")
    second = publish("release two")
    wait_until(lambda: agent.on_seq(second.seq), "seq 2")
    before = snapshot(agent)

    attacks = {
        # A copy of history seq 1 with a huge seq: used to downgrade and freeze an instance.
        "forged high seq": replace(first, seq=999999),
        # The same document under the next seq, before CI published it.
        "old document, new seq": replace(first, seq=3),
        # Seq 2 with another release's manifest: one seq, two deploys.
        "rival for an applied seq": replace(second, deploy_id="rival", release_id=first.release_id),
    }
    for forged in attacks.values():
        send(fleet, agent, forged)
    wait_until(lambda: len(agent.events("message_rejected") + agent.events("deploy_unauthentic")) >= 3, "rejections")
    rejected = dlq_rejections(fleet, agent)
    assert set(rejected) == {d.to_json() for d in attacks.values()}
    assert "seq 999999" in rejected[attacks["forged high seq"].to_json()]
    assert "no deploy was published as seq 3" in rejected[attacks["old document, new seq"].to_json()]
    assert snapshot(agent) == before
    report = agent.status()
    assert report is not None
    assert report.last_rejection is not None
    assert agent.hook_runs() == [first.deploy_id, second.deploy_id]

    # The genuine seq 3 still lands: the instance was neither downgraded nor frozen.
    third = publish("release three")
    wait_until(lambda: agent.on_seq(third.seq), "the genuine seq 3")
    assert agent.served() == "release three"


def test_a_document_of_another_stage_cannot_be_passed_off_as_this_channels(
    fleet: Fleet, tmp_path: Path, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent()
    live = publish("prod release")
    wait_until(lambda: agent.on_seq(live.seq), "seq 1")
    # A release that exists in the bucket, published to dev only.
    publisher = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)
    build = make_tree(tmp_path / "dev-build", {"index.html": "dev only"})
    from publisher.pack import pack_directory
    from tests.support import release_template

    dev = publisher.publish(
        Channel("dev", "web", "api"), pack_directory(build, tmp_path / "dev.tar.gz"), template=release_template()
    ).deploy
    before = snapshot(agent)
    send(fleet, agent, replace(dev, stage="prod", seq=live.seq + 1))
    wait_until(lambda: bool(agent.events("deploy_unauthentic")), "the rejection")
    assert snapshot(agent) == before
    assert agent.served() == "prod release"


def test_an_instance_frozen_by_a_forgery_before_authentication_re_converges_at_reconcile(
    start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    agent = start_agent(reconcile_interval_seconds=1)
    first = publish("release one")
    wait_until(lambda: agent.on_seq(first.seq), "seq 1")
    agent.stop()
    agent.process = None
    # What an unauthenticated agent left behind: seq 999999 recorded for a deploy CI never wrote.
    state_file = agent.home / "state" / "state.json"
    state = json.loads(state_file.read_text())
    state["channels"]["prod/web/api"]["seq"] = 999999
    state_file.write_text(json.dumps(state))
    second = publish("release two")  # looks stale to the frozen instance
    agent.start()
    wait_until(lambda: agent.on_seq(second.seq), "the repaired instance to take seq 2")
    assert agent.events("applied_seq_unconfirmed")
    assert agent.served() == "release two"


def test_an_instance_role_session_confines_the_status_key_and_tags_the_queues_with_its_owner(
    fleet: Fleet,
    tmp_path: Path,
    start_agent: Callable[..., AgentProcess],
    publish: Callable[..., Deploy],
    instance_role: InstanceRole,
) -> None:
    agent = start_agent("i-0123456789abcdef0", role=instance_role)
    userid = f"{instance_role.role_id}:i-0123456789abcdef0"
    key = fleet.layout.status_key(ReportKey("prod", "web", "i-0123456789abcdef0", instance_role.role_id))
    assert key.endswith(f"/{userid}.json")  # the object IAM's ${aws:userid} lets only this instance write
    assert get_document(fleet.clients.s3, BUCKET, key) is not None
    for url in (agent.queue_url(), agent.queue_url(DLQ_SUFFIX)):
        assert fleet.clients.sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"deployer-owner": userid}
    assert not agent.events("owner_unconfined")
    deploy = publish("confined")
    wait_until(lambda: agent.on_seq(deploy.seq), "the confined agent to apply")
    rows = json.loads(cli("status", "--bucket", BUCKET, "--json").stdout)["instances"]
    assert [(r["instance_id"], r["state"]) for r in rows] == [("i-0123456789abcdef0", ComponentState.OK.value)]
    build = make_tree(tmp_path / "next", {"index.html": "next"})
    waited = cli(*publish_args(fleet, build, "--wait", "--poll-interval", "0.3", "--timeout", "60"))
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "OK: 1/1 converged" in waited.stdout
