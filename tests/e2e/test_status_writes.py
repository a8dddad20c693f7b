"""Status reports stay cheap: one write per change and per heartbeat, none in between."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable

from deployer.agent.reporter import StatusReporter
from deployer.aws.clients import make_clients
from deployer.aws.reports import ReportReader
from deployer.protocol.deploy import Deploy
from deployer.protocol.layout import ReportKey
from deployer.protocol.manifest import Hook
from tests.awsproxy import Answer, Call, aws_proxy
from tests.support import BUCKET, REGION, AgentProcess, Fleet, wait_until


def writes(fleet: Fleet, agent: AgentProcess) -> int:
    key = fleet.layout.status_key(agent.who)
    listed = fleet.clients.s3.list_object_versions(Bucket=BUCKET, Prefix=key).get("Versions", [])
    return len(listed)


def test_an_idle_agent_writes_its_status_once_per_heartbeat_and_a_fast_deploy_adds_one_write(
    fleet: Fleet, start_agent: Callable[..., AgentProcess], publish: Callable[..., Deploy]
) -> None:
    # Versioning keeps every PUT of the status object, so the versions count the writes.
    fleet.clients.s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    agent = start_agent(heartbeat_interval_seconds=3600)
    time.sleep(2)
    assert writes(fleet, agent) == 1  # the boot report; no pointer yet, nothing else to say
    deploy = publish("counted")
    wait_until(lambda: agent.on_seq(deploy.seq), "seq 1")
    time.sleep(2)
    assert writes(fleet, agent) == 2  # + ok; `applying` is only reported for applies slower than 1 s
    slow = publish("slow", post=(Hook("sleep 2"),))
    wait_until(lambda: agent.on_seq(slow.seq), "seq 2")
    assert writes(fleet, agent) == 4  # + applying (after 1 s), + ok
    heartbeating = start_agent(heartbeat_interval_seconds=1)
    wait_until(lambda: writes(fleet, heartbeating) >= 4, "three heartbeats after boot", timeout=15)


def test_polling_the_fleet_downloads_only_the_reports_that_changed(fleet: Fleet) -> None:
    reporters = [
        StatusReporter(fleet.clients.s3, BUCKET, fleet.layout, ReportKey("prod", "web", i), ("api",))
        for i in ("i-a", "i-b", "i-c")
    ]
    for reporter in reporters:
        reporter.write()
    gets: list[str] = []

    class RecordGets:
        """The objects GET asks for, as they reach the wire (fleet reads sign their own GETs)."""

        def before(self, call: Call) -> Answer | None:
            if call.action == "GET":
                gets.append(urllib.parse.unquote(call.path.split("?")[0]).removeprefix(f"/{BUCKET}/"))
            return None

    with aws_proxy(fleet.endpoint_url, RecordGets()) as proxy:
        reader = ReportReader(make_clients(REGION, proxy.url).s3, BUCKET, fleet.layout, "prod", "web")
        everyone = {ReportKey("prod", "web", i) for i in ("i-a", "i-b", "i-c")}
        assert set(reader.refresh()) == everyone
        assert len(gets) == 3
        assert set(reader.refresh()) == everyone
        assert len(gets) == 3  # nothing changed: one LIST, no GET
        reporters[1].update("api", seq=1)
        fleet.clients.s3.delete_object(Bucket=BUCKET, Key=fleet.layout.status_key(ReportKey("prod", "web", "i-c")))
        entries = reader.refresh()
    assert gets[3:] == [fleet.layout.status_key(ReportKey("prod", "web", "i-b"))]
    assert {who.instance_id for who in entries} == {"i-a", "i-b"}
    report = entries[ReportKey("prod", "web", "i-b")].report
    assert report is not None
    assert report.components["api"].seq == 1
