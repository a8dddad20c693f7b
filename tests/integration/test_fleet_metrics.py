"""`deployer status --metrics`, end to end: reports written by the agent's own writer and pointers
moved by the real publisher in the emulator, the real CLI in a subprocess putting the gauges, and
CloudWatch's own read APIs on the emulator saying what arrived (names, dimensions, units, values
and the instant they are stamped with)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from deployer.agent.reporter import StatusReporter
from deployer.protocol.layout import ReportKey
from deployer.protocol.names import Channel
from deployer.protocol.report import ComponentState, ComponentStatus
from tests.support import BUCKET, FAST_POLICY, REGION, Fleet, artifact, cli, publish_on, silent_publisher

if TYPE_CHECKING:
    from mypy_boto3_cloudwatch import CloudWatchClient
    from mypy_boto3_cloudwatch.type_defs import DimensionTypeDef

API, JOBS = Channel("prod", "web", "api"), Channel("prod", "worker", "jobs")
GAUGES = ("OnCurrent", "Behind", "Failed", "Stale", "Live", "ConvergedPercent")


def reporter(fleet: Fleet, channel: Channel, instance: str) -> StatusReporter:
    who = ReportKey(channel.stage, channel.role, instance)
    return StatusReporter(fleet.clients.s3, fleet.bucket, fleet.layout, who, (channel.component,), FAST_POLICY)


def sample_fleet(fleet: Fleet, tmp_path: Path) -> None:
    """prod/web/api on seq 2: one instance on it, one behind on seq 1, one failed on seq 2, one
    silent for three hours; prod/worker/jobs on seq 1: one instance on it."""
    publisher = silent_publisher(fleet)
    publish_on(publisher, API, artifact(tmp_path, "api1", "1"), "20261120T101500Z-77aa01c")
    api2 = publish_on(publisher, API, artifact(tmp_path, "api2", "2"), "20261126T015012Z-3f2a9c1")
    jobs1 = publish_on(publisher, JOBS, artifact(tmp_path, "jobs1", "1"), "20261125T220000Z-c0ffee1")
    on_api2: dict[str, Any] = {"seq": api2.seq, "release_id": api2.release_id, "deploy_id": api2.deploy_id}
    reporter(fleet, API, "i-0a1b2c3d4e5f60701").update("api", state=ComponentState.OK, **on_api2)
    reporter(fleet, API, "i-0a1b2c3d4e5f60702").update(
        "api", state=ComponentState.OK, seq=api2.seq - 1, release_id="20261120T101500Z-77aa01c"
    )
    reporter(fleet, API, "i-0a1b2c3d4e5f60703").update("api", state=ComponentState.FAILED, error="exited 3", **on_api2)
    silent = reporter(fleet, API, "i-0a1b2c3d4e5f60704")
    silent.seed("api", ComponentStatus(state=ComponentState.OK, **on_api2))
    fleet.clients.s3.put_object(
        Bucket=fleet.bucket, Key=silent.key, Body=silent.report(datetime.now(UTC) - timedelta(hours=3)).to_json()
    )
    reporter(fleet, JOBS, "i-0f9e8d7c6b5a40301").update(
        "jobs", state=ComponentState.OK, seq=jobs1.seq, release_id=jobs1.release_id, deploy_id=jobs1.deploy_id
    )


def cloudwatch(fleet: Fleet) -> CloudWatchClient:
    return boto3.client("cloudwatch", region_name=REGION, endpoint_url=fleet.endpoint_url)


def dimensions(channel: Channel) -> list[DimensionTypeDef]:
    return [
        {"Name": "Stage", "Value": channel.stage},
        {"Name": "Role", "Value": channel.role},
        {"Name": "Component", "Value": channel.component},
    ]


def stored(
    fleet: Fleet, namespace: str, channel: Channel, since: datetime, until: datetime
) -> dict[str, tuple[float, str]]:
    """Each gauge of `channel` stamped within [since, until]: (its value, its unit), as CloudWatch keeps it."""
    found: dict[str, tuple[float, str]] = {}
    for name in GAUGES:
        answer = cloudwatch(fleet).get_metric_statistics(
            Namespace=namespace,
            MetricName=name,
            Dimensions=dimensions(channel),
            StartTime=since,
            EndTime=until,
            Period=60,
            Statistics=["Maximum", "SampleCount"],
        )
        [point] = answer["Datapoints"]
        assert point["SampleCount"] == 1, name
        found[name] = (point["Maximum"], point["Unit"])
    return found


def test_status_metrics_prints_the_table_and_puts_each_channels_gauges_stamped_when_the_reports_were_read(
    fleet: Fleet, tmp_path: Path
) -> None:
    sample_fleet(fleet, tmp_path)
    before = datetime.now(UTC).replace(microsecond=0)
    result = cli("status", "--bucket", BUCKET, "--metrics")
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert result.returncode == 0, result.stderr

    lines = result.stdout.splitlines()
    assert lines[0].startswith("INSTANCE")
    # The summary counts the silent instance on seq 2; the gauges count only live instances, so
    # that ConvergedPercent says how much of the fleet that is still there has converged.
    assert "prod/web/api: 2/4 on seq 2, 1 failed, 1 behind, 1 stale" in lines
    assert lines[-1] == "put 12 metric(s) for 2 channel(s) into namespace Deployer"
    # Only gauges stamped between the start of the run and its end are read back: the timestamp
    # is the read's, not whatever CloudWatch would have put on an unstamped value.
    assert stored(fleet, "Deployer", API, before, after) == {
        "OnCurrent": (1.0, "Count"),
        "Behind": (1.0, "Count"),
        "Failed": (1.0, "Count"),
        "Stale": (1.0, "Count"),
        "Live": (3.0, "Count"),
        "ConvergedPercent": (100 / 3, "Percent"),
    }
    assert stored(fleet, "Deployer", JOBS, before, after) == {
        "OnCurrent": (1.0, "Count"),
        "Behind": (0.0, "Count"),
        "Failed": (0.0, "Count"),
        "Stale": (0.0, "Count"),
        "Live": (1.0, "Count"),
        "ConvergedPercent": (100.0, "Percent"),
    }


def test_with_json_the_document_stays_whole_and_the_namespace_comes_from_the_environment(
    fleet: Fleet, tmp_path: Path
) -> None:
    sample_fleet(fleet, tmp_path)
    namespace = "Team/Deploys prod"
    result = cli("status", "--bucket", BUCKET, "--json", "--metrics", env={"DEPLOYER_METRICS_NAMESPACE": namespace})
    assert result.returncode == 0, result.stderr

    document = json.loads(result.stdout)
    assert len(document["instances"]) == 5
    assert result.stderr.splitlines()[-1] == f"put 12 metric(s) for 2 channel(s) into namespace {namespace}"
    listed = cloudwatch(fleet).list_metrics(Namespace=namespace)["Metrics"]
    assert sorted((m["MetricName"], m["Dimensions"][2]["Value"]) for m in listed) == sorted(
        (name, channel.component) for name in GAUGES for channel in (API, JOBS)
    )
    assert {json.dumps(m["Dimensions"]) for m in listed} == {json.dumps(dimensions(c)) for c in (API, JOBS)}
    assert cloudwatch(fleet).list_metrics(Namespace="Deployer")["Metrics"] == []


def test_metrics_combine_with_the_uploaded_page_and_an_empty_fleet_puts_nothing(fleet: Fleet, tmp_path: Path) -> None:
    empty = cli("status", "--bucket", BUCKET, "--metrics")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.splitlines() == [
        "no instances have reported yet",
        "put 0 metric(s) for 0 channel(s) into namespace Deployer",
    ]
    assert cloudwatch(fleet).list_metrics(Namespace="Deployer")["Metrics"] == []

    sample_fleet(fleet, tmp_path)
    result = cli("status", "--bucket", BUCKET, "--upload", "--metrics")
    assert result.returncode == 0, result.stderr
    uploaded, put = result.stdout.splitlines()
    assert uploaded.startswith(f"uploaded s3://{BUCKET}/{fleet.layout.fleet_page_key()} (5 instance(s), ")
    assert put == "put 12 metric(s) for 2 channel(s) into namespace Deployer"
    assert len(cloudwatch(fleet).list_metrics(Namespace="Deployer")["Metrics"]) == 12


@pytest.mark.usefixtures("aws_env")  # should it get past the option, it would only reach the emulator
def test_a_namespace_cloudwatch_would_refuse_is_refused_before_anything_is_read() -> None:
    result = cli("status", "--bucket", BUCKET, "--metrics", "--metrics-namespace", "AWS/EC2")
    assert result.returncode == 2
    assert "metrics namespace 'AWS/EC2' is not a CloudWatch namespace" in result.stderr
