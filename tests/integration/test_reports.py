"""Every reader of status reports judges what it reads: a malformed, forged or vanished report never
crashes `deployer status`, `publish --wait` or `gc`; it is shown as unreadable and counted honestly."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from deployer.agent.reporter import StatusReporter
from deployer.aws import reports
from deployer.aws.clients import make_clients
from deployer.aws.reports import ReportReader
from deployer.aws.retry import RetryPolicy
from deployer.protocol.errors import InvalidReport, TransientFetchError
from deployer.protocol.layout import ReportKey
from deployer.protocol.report import ComponentState, ComponentStatus, StatusReport, parse_report
from publisher.gc import Collector
from publisher.wait import EXIT_TIMEOUT
from tests.awsproxy import Answer, Call, aws_proxy
from tests.faultproxy import FaultProxy, random_faults
from tests.support import (
    BUCKET,
    FAST_POLICY,
    FLAKY_RATE,
    REGION,
    Fleet,
    cli,
    make_tree,
    proxied_through,
    publish_args,
)
from tests.tlsfront import tls_front

WHO = ReportKey("prod", "web", "i-good")


def write_report(fleet: Fleet, who: ReportKey, seq: int = 1) -> StatusReporter:
    reporter = StatusReporter(fleet.clients.s3, BUCKET, fleet.layout, who, ("api",), FAST_POLICY)
    reporter.update("api", state=ComponentState.OK, seq=seq, release_id="r1", deploy_id="d1")
    return reporter


def put_raw(fleet: Fleet, instance: str, body: bytes) -> None:
    key = fleet.layout.status_key(ReportKey("prod", "web", instance))
    fleet.clients.s3.put_object(Bucket=BUCKET, Key=key, Body=body)


def write_report_doc(instance: str) -> bytes:
    """A fresh report as the one writer renders it."""
    report = StatusReport(
        key=ReportKey("prod", "web", instance),
        heartbeat_at=datetime.now(UTC).replace(microsecond=0),
        components={"api": ComponentStatus(state=ComponentState.OK, seq=1)},
    )
    return report.to_json()


def read_large_in_two_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, a read of 10 reports or more takes the large-read path, in 2 worker processes."""
    monkeypatch.setattr(reports, "PROCESS_THRESHOLD", 10)
    monkeypatch.setattr(reports, "read_processes", lambda: 2)


def test_reports_read_through_a_network_that_cuts_connections_at_every_point_are_what_a_clean_read_finds(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reset, or an answer cut inside its headers or its body, is the network's doing: retried,
    never a row marked unreadable or a read that fails, in one process or in worker processes."""
    for n in range(100):
        put_raw(fleet, f"i-{n:03d}", write_report_doc(f"i-{n:03d}"))
    clean = ReportReader(fleet.clients.s3, BUCKET, fleet.layout, policy=FAST_POLICY).refresh()
    assert len(clean) == 100
    assert all(entry.report is not None for entry in clean.values())
    # Enough attempts that the faults cannot exhaust them (0.22 ** 12 per read).
    patient = RetryPolicy(max_attempts=12, base_seconds=0.01, cap_seconds=0.05, deadline_seconds=60)
    with FaultProxy.to(fleet.endpoint_url, rule=random_faults(FLAKY_RATE, seed=20261208)) as network:
        s3 = make_clients(REGION, network.url).s3
        assert ReportReader(s3, BUCKET, fleet.layout, policy=patient).refresh() == clean
        in_one_process = network.injured
        read_large_in_two_workers(monkeypatch)
        reader = ReportReader(s3, BUCKET, fleet.layout, policy=patient)
        assert reader.refresh() == clean
    assert reader.stats.processes == 2
    assert in_one_process > 0
    assert network.injured > in_one_process


def test_reports_read_through_the_environments_http_proxy_are_what_a_direct_read_finds(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator behind an egress proxy (`HTTP_PROXY`): the read's own GETs take the proxied
    transport, in one process and in worker processes, and find what a direct read finds."""
    for n in range(40):
        put_raw(fleet, f"i-{n:03d}", write_report_doc(f"i-{n:03d}"))
    clean = ReportReader(fleet.clients.s3, BUCKET, fleet.layout, policy=FAST_POLICY).refresh()
    with aws_proxy(fleet.endpoint_url) as proxy:
        proxied_through(monkeypatch, proxy.url)
        s3 = make_clients(REGION, fleet.endpoint_url).s3
        in_one_process = ReportReader(s3, BUCKET, fleet.layout, policy=FAST_POLICY)
        assert in_one_process.refresh() == clean
        assert (proxy.count("s3", "GET"), proxy.as_proxy) == (40, proxy.count("s3"))
        proxy.reset_counts()
        read_large_in_two_workers(monkeypatch)
        in_workers = ReportReader(s3, BUCKET, fleet.layout, policy=FAST_POLICY)
        assert in_workers.refresh() == clean
        assert (proxy.count("s3", "GET"), proxy.as_proxy) == (40, proxy.count("s3"))
    assert (in_one_process.stats.processes, in_workers.stats.processes) == (0, 2)


def test_reports_read_over_https_verify_against_the_ca_bundle_the_operator_names(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """S3 is https, and behind a TLS-inspecting proxy an operator names its CA in `AWS_CA_BUNDLE`:
    the read's own GETs verify against it, as botocore's do, in one process and in workers."""
    for n in range(40):
        put_raw(fleet, f"i-{n:03d}", write_report_doc(f"i-{n:03d}"))
    clean = ReportReader(fleet.clients.s3, BUCKET, fleet.layout, policy=FAST_POLICY).refresh()
    with tls_front(fleet.endpoint_url, tmp_path) as front:
        monkeypatch.setenv("AWS_CA_BUNDLE", str(front.certificate))
        s3 = make_clients(REGION, front.url).s3
        in_one_process = ReportReader(s3, BUCKET, fleet.layout, policy=FAST_POLICY)
        assert in_one_process.refresh() == clean
        read_large_in_two_workers(monkeypatch)
        in_workers = ReportReader(s3, BUCKET, fleet.layout, policy=FAST_POLICY)
        assert in_workers.refresh() == clean
        assert front.connections > 0
    assert (in_one_process.stats.processes, in_workers.stats.processes) == (0, 2)


def test_a_report_get_over_https_refuses_a_certificate_its_client_does_not_trust(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Verification is never off: with no bundle named, the client trusts botocore's own, which
    does not hold the front's certificate, and the GET fails before a byte of the report is read."""
    from deployer.aws.rawget import BucketAddress, SignedGetter

    put_raw(fleet, "i-000", write_report_doc("i-000"))
    key = fleet.layout.status_key(ReportKey("prod", "web", "i-000"))
    with tls_front(fleet.endpoint_url, tmp_path) as front:
        for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):
            monkeypatch.delenv(name, raising=False)
        where = BucketAddress.of(make_clients(REGION, front.url).s3, BUCKET, key)
        assert where.verify is True
        with pytest.raises(TransientFetchError, match="CERTIFICATE_VERIFY_FAILED"):
            SignedGetter(where, 1, (5.0, 5.0)).get(key)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"heartbeat_at": "soon"}, "heartbeat_at 'soon' is not an ISO 8601 UTC timestamp"),
        ({"instance_id": "i-someone-else"}, "body says instance_id 'i-someone-else' but its key says 'i-good'"),
        ({"role": "web-admin"}, "body says role 'web-admin' but its key says 'web'"),
        ({"v": 2}, "unsupported report version v=2"),
        ({"surprise": 1}, "unknown key(s): surprise"),
        ({"components": {"api": {"state": "great"}}}, "components.api.state 'great' is not a component state"),
        ({"components": {"api": {"state": "ok", "seq": "7"}}}, "components.api.seq must be a positive integer"),
        ({"last_rejection": "yes"}, "last_rejection must be null or an object"),
    ],
)
def test_the_report_parser_names_what_is_wrong_and_believes_the_key_not_the_body(
    changes: dict[str, Any], error: str
) -> None:
    doc = json.loads(write_report_doc("i-good"))
    doc.update(changes)
    with pytest.raises(InvalidReport) as info:
        parse_report(json.dumps(doc).encode(), WHO)
    assert error in str(info.value)


def test_what_the_writer_writes_the_parser_reads_back() -> None:
    body = write_report_doc("i-good")
    report = parse_report(body, WHO)
    assert report.key == WHO
    assert report.components["api"] == ComponentStatus(state=ComponentState.OK, seq=1)
    assert report.to_json() == body


def test_a_boot_error_round_trips_and_a_report_without_one_has_no_such_key() -> None:
    report = parse_report(write_report_doc("i-good"), WHO)
    assert "boot_error" not in json.loads(report.to_json())  # readers that predate the key still read it
    broken = dataclasses.replace(report, boot_error="AwsError: AccessDenied")
    assert parse_report(broken.to_json(), WHO).boot_error == "AwsError: AccessDenied"
    with pytest.raises(InvalidReport, match="boot_error must be a string or null"):
        parse_report(json.dumps({**json.loads(report.to_json()), "boot_error": 7}).encode(), WHO)


def test_status_shows_an_unreadable_report_as_a_row_and_still_exits_zero(fleet: Fleet) -> None:
    write_report(fleet, WHO)
    put_raw(fleet, "i-broken", b'{"v": 1, "heartbeat_at": "not a time"')
    result = cli("status", "--bucket", BUCKET)
    assert result.returncode == 0, result.stderr
    broken = next(line for line in result.stdout.splitlines() if line.startswith("i-broken"))
    assert "unreadable" in broken
    assert "report is not JSON" in broken
    assert "prod/web: 1 unreadable report(s)" in result.stdout
    rows = json.loads(cli("status", "--bucket", BUCKET, "--json").stdout)["instances"]
    assert {(r["instance_id"], r["state"]) for r in rows} == {("i-good", "ok"), ("i-broken", "unreadable")}


def test_a_report_that_vanishes_between_list_and_get_is_simply_absent(fleet: Fleet) -> None:
    write_report(fleet, WHO)
    write_report(fleet, ReportKey("prod", "web", "i-leaving"))
    leaving = fleet.layout.status_key(ReportKey("prod", "web", "i-leaving"))

    class DeleteFirst:
        """gc (or a deregistering agent) wins the race: the object is gone when its GET arrives."""

        def before(self, call: Call) -> Answer | None:
            if call.method == "GET" and call.action == "GET" and call.path.split("?")[0].endswith(leaving):
                fleet.clients.s3.delete_object(Bucket=BUCKET, Key=leaving)
            return None

    with aws_proxy(fleet.endpoint_url, DeleteFirst()) as proxy:
        reader = ReportReader(make_clients(REGION, proxy.url).s3, BUCKET, fleet.layout, policy=FAST_POLICY)
        entries = reader.refresh()
    assert set(entries) == {WHO}
    assert fleet.clients.s3.list_objects_v2(Bucket=BUCKET, Prefix=leaving)["KeyCount"] == 0


def test_a_large_read_in_worker_processes_finds_what_one_process_finds_with_the_same_requests(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(24):
        put_raw(fleet, f"i-{n:03d}", write_report_doc(f"i-{n:03d}"))
    put_raw(fleet, "i-hostile", hostile_report("i-hostile", "a newline in a release id"))
    with aws_proxy(fleet.endpoint_url) as proxy:
        s3 = make_clients(REGION, proxy.url).s3
        here = ReportReader(s3, BUCKET, fleet.layout, policy=FAST_POLICY).refresh()
        read_large_in_two_workers(monkeypatch)
        proxy.reset_counts()
        reader = ReportReader(s3, BUCKET, fleet.layout, policy=FAST_POLICY)
        spread = reader.refresh()
        assert (proxy.count("s3", "LIST"), proxy.count("s3", "GET")) == (1, 25)
    assert reader.stats.processes == 2
    assert len(reader.stats.worker_cpu_s) == 2
    assert spread == here
    assert [str(e.who) for e in spread.values() if e.report is None] == ["prod/web/i-hostile"]


def test_publish_wait_counts_an_unreadable_report_as_not_converged_and_times_out(fleet: Fleet, tmp_path: Path) -> None:
    put_raw(fleet, "i-forger", json.dumps({**json.loads(write_report_doc("i-forger")), "instance_id": "i-x"}).encode())
    build = make_tree(tmp_path / "build", {"index.html": "v1"})
    result = cli(*publish_args(fleet, build, "--wait", "--poll-interval", "0.2", "--timeout", "1"))
    assert result.returncode == EXIT_TIMEOUT, result.stdout + result.stderr
    assert "i-forger: unreadable: unreadable report: report body says instance_id 'i-x'" in result.stdout
    assert "TIMEOUT" in result.stdout


def test_gc_judges_an_unreadable_report_by_the_age_of_its_object_and_does_not_crash(fleet: Fleet) -> None:
    put_raw(fleet, "i-garbled", b"\x00\x01 not json")
    result = cli("gc", "instances", "--bucket", BUCKET, "--topic-arn", fleet.topic_arn, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0 stale instance(s) would be removed"  # written just now: not stale


def test_fleet_reads_cost_a_list_per_thousand_reports_plus_a_get_per_changed_one(fleet: Fleet) -> None:
    for n in range(25):
        put_raw(fleet, f"i-{n:03d}", write_report_doc(f"i-{n:03d}"))
    with aws_proxy(fleet.endpoint_url) as proxy:
        clients = make_clients(REGION, proxy.url)
        reader = ReportReader(clients.s3, BUCKET, fleet.layout, policy=FAST_POLICY)
        assert len(reader.refresh()) == 25
        assert (proxy.count("s3", "LIST"), proxy.count("s3", "GET")) == (1, 25)
        proxy.reset_counts()
        put_raw(fleet, "i-007", write_report_doc("i-007") + b"\n")  # one instance heartbeats
        assert len(reader.refresh()) == 25
        assert (proxy.count("s3", "LIST"), proxy.count("s3", "GET")) == (1, 1)
        proxy.reset_counts()
        # gc reads only what may be stale: a healthy fleet costs one LIST.
        Collector(clients, BUCKET, fleet.topic_arn, fleet.layout, policy=FAST_POLICY).run(3600)
        assert (proxy.count("s3", "LIST"), proxy.count("s3", "GET")) == (1, 0)


def hostile_report(instance: str, kind: str) -> bytes:
    good = json.loads(write_report_doc(instance))
    if kind == "deep nesting":
        return b'{"v": 1, "components": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    if kind == "over the size limit":
        return json.dumps({**good, "boot_error": "x" * (300 * 1024)}).encode()
    if kind == "a newline in a release id":
        good["components"]["api"]["release_id"] = "r1\ni-0ghost  prod  web  api  r9  9  ok"
    elif kind == "an escape sequence in a release id":
        good["components"]["api"]["release_id"] = "r1\x1b]0;pwned\x07"
    elif kind == "NaN":
        return json.dumps(good).replace('"seq": 1', '"seq": NaN').encode()
    elif kind == "a duplicate key":
        return json.dumps(good).replace('"v": 1', '"v": 1, "v": 1').encode()
    elif kind == "invalid UTF-8":
        return json.dumps(good).encode().replace(b'"ok"', b'"\xff\xfe"')
    return json.dumps(good).encode()


HOSTILE_REPORTS = [
    "deep nesting",
    "over the size limit",
    "a newline in a release id",
    "an escape sequence in a release id",
    "NaN",
    "a duplicate key",
    "invalid UTF-8",
]


@pytest.mark.parametrize("kind", HOSTILE_REPORTS)
def test_a_hostile_report_in_a_fleet_of_50_is_one_unreadable_row_and_the_other_49_read_as_they_are(
    fleet: Fleet, kind: str, tmp_path: Path
) -> None:
    for index in range(49):
        put_raw(fleet, f"i-{index:04d}", write_report_doc(f"i-{index:04d}"))
    put_raw(fleet, "i-hostile", hostile_report("i-hostile", kind))
    entries = ReportReader(fleet.clients.s3, BUCKET, fleet.layout, policy=FAST_POLICY).refresh()
    assert len(entries) == 50
    assert [str(e.who) for e in entries.values() if e.report is None] == ["prod/web/i-hostile"]
    table = cli("status", "--bucket", BUCKET)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("i-")]
    assert len(rows) == 50  # no forged row
    assert "\x1b" not in table.stdout
    assert "\x07" not in table.stdout
    [hostile] = [line for line in rows if line.startswith("i-hostile")]
    assert "unreadable" in hostile
    doc = json.loads(cli("status", "--bucket", BUCKET, "--json").stdout)
    states = [r["state"] for r in doc["instances"]]
    assert (states.count("ok"), states.count("unreadable")) == (49, 1)
    page = cli("status", "--bucket", BUCKET, "--html", str(tmp_path / "fleet.html"))
    assert page.returncode == 0, page.stderr


def test_the_table_shows_control_characters_in_free_text_as_escapes() -> None:
    from publisher.text import render_table

    table = render_table(("ERROR",), [("hook said \x1b[2J\x1b]0;owned\x07 then\nmore\u202e",)])
    assert table.splitlines() == ["ERROR", "hook said \\x1b[2J\\x1b]0;owned\\x07 then\\nmore\\u202e"]
