"""The test suite's one support module: fixtures and helpers every test directory shares.

Loaded as a pytest plugin by tests/conftest.py (`pytest_plugins`), so fixtures need no import
and helpers are imported from here by name. Nothing here, nor anything it starts, talks to any
address but loopback: an audit hook fails any in-process connect elsewhere, agents get an
explicit endpoint and instance id (or the fake IMDS below), and AWS_EC2_METADATA_DISABLED keeps
botocore off the metadata address.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from deployer.aws.clients import Clients, make_clients
from deployer.aws.reports import ReportEntry
from deployer.aws.retry import RetryPolicy
from deployer.aws.s3 import get_document
from deployer.local.emulator import Emulator
from deployer.local.loopback import install_loopback_guard
from deployer.protocol.deploy import Deploy
from deployer.protocol.layout import Layout, ReportKey
from deployer.protocol.manifest import Commands, Hook, Manifest, SyncStrategy, parse_manifest
from deployer.protocol.names import DEFAULT_QUEUE_PREFIX, Channel, queue_name
from deployer.protocol.report import ComponentState, ComponentStatus, Lifecycle, StatusReport, parse_report
from publisher.infra import init_resources
from publisher.pack import pack_directory
from publisher.publish import Publisher
from tests import iam_record, iameval
from tests.emulators import LOCALSTACK, LocalStack, selected, skip_moto_only
from tests.faultproxy import FaultProxy, random_faults

#: Where this run's IAM records are (set in the collecting process only).
IAM_RECORDS = pytest.StashKey[Path]()
REGION = "us-east-1"
BUCKET = "deployer-test"
TOPIC = "deployer-test"
#: Fast backoff so tests that exercise retries do not sleep for seconds.
FAST_POLICY = RetryPolicy(max_attempts=5, base_seconds=0.01, cap_seconds=0.05, deadline_seconds=10)


install_loopback_guard()


def proxied_through(monkeypatch: pytest.MonkeyPatch, proxy_url: str) -> None:
    """This process (and what it starts) as an instance behind an egress proxy: `HTTP_PROXY` set,
    nothing exempted by `NO_PROXY`. Both spellings, as urllib reads either."""
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy_url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


# -- the IAM check: every call the product makes, recorded in every process --------------------


def pytest_configure(config: pytest.Config) -> None:
    """Record the product's AWS calls in this process, the xdist workers and every subprocess.

    Set once, by the process that collects the results (the controller, or the only process):
    workers and subprocesses inherit the environment. The repository goes on PYTHONPATH so an
    agent started from any directory can import the recorder.
    """
    if hasattr(config, "workerinput") or os.environ.get(iam_record.RECORDS_ENV):
        return
    directory = Path(tempfile.mkdtemp(prefix="deployer-iam-records-"))
    config.stash[IAM_RECORDS] = directory
    repo = str(Path(__file__).resolve().parents[1])
    os.environ[iam_record.RECORDS_ENV] = str(directory)
    os.environ[iam_record.PLUGINS_ENV] = iam_record.PLUGIN
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Decide every recorded call under the generated policies; a denied own call fails the run."""
    directory = session.config.stash.get(IAM_RECORDS, None)
    if directory is None or not any(directory.glob("calls-*.jsonl")):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter is not None else print
    reason = iameval.available()
    if reason is not None:
        say(f"IAM check: skipped: {reason}")
        if os.environ.get("CI"):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    from tests.iam_check import check, unlisted

    outcome = check(directory)
    for line in outcome.lines():
        say(line)
    gaps = unlisted(outcome)
    for gap in gaps:
        say(f"IAM check FAILED: {gap} is made by the product but not in publisher.iam_model.expected_calls (doctor)")
    if outcome.failures or gaps:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator | LocalStack]:
    """moto, started per session (per xdist worker); or, with DEPLOYER_TEST_EMULATOR=localstack,
    the LocalStack that `scripts/localstack run` started (see tests/emulators.py)."""
    if selected() == LOCALSTACK:
        yield LocalStack.from_environment()
        return
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with Emulator(log_path=log_path) as server:
        yield server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip_moto_only(items)


@pytest.fixture
def aws_env(emulator: Emulator | LocalStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Emulator | LocalStack:
    """A clean emulator and an environment pointing every boto3 client (and subprocess) at it;
    `publish`'s cache in the test's own directory, so no test sees another's."""
    emulator.reset()
    monkeypatch.setenv("DEPLOYER_CACHE_DIR", str(tmp_path / "deployer-cache"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", emulator.url)
    # test/test: LocalStack checks a presigned URL of an access key it does not know against the
    # secret "test" (and refuses it otherwise); moto takes any.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "DEPLOYER_BUCKET", "DEPLOYER_TOPIC_ARN", "DEPLOYER_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    return emulator


@dataclass(frozen=True)
class Fleet:
    """An initialised bucket + topic on the emulator."""

    clients: Clients
    bucket: str
    topic_arn: str
    endpoint_url: str
    layout: Layout = Layout("deployer")  # noqa: RUF009 - frozen, so sharing the default is safe


@pytest.fixture
def fleet(aws_env: Emulator | LocalStack) -> Fleet:
    clients = make_clients(REGION, aws_env.url)
    result = init_resources(clients, BUCKET, TOPIC)
    return Fleet(clients=clients, bucket=BUCKET, topic_arn=result.topic_arn, endpoint_url=aws_env.url)


class FakeImds(BaseHTTPRequestHandler):
    """An IMDSv2 lookalike: a token PUT first, then GETs carrying the token (instance id, region, tags)."""

    instance_id = "i-0fakeimds000001"
    region = "eu-west-1"
    token = "fake-token"
    tags: dict[str, str] = {}
    #: `autoscaling/target-lifecycle-state` (None: not in an Auto Scaling group, a 404).
    lifecycle_state: str | None = None
    url = ""

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._reply(200, self.token)
        else:
            self._reply(400, "bad token request")

    def do_GET(self) -> None:
        tag_prefix = "/latest/meta-data/tags/instance/"
        answers = {"/latest/meta-data/instance-id": self.instance_id, "/latest/meta-data/placement/region": self.region}
        answers.update({tag_prefix + name: value for name, value in self.tags.items()})
        if self.lifecycle_state is not None:
            answers["/latest/meta-data/autoscaling/target-lifecycle-state"] = self.lifecycle_state
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self._reply(401, "IMDSv2 token required")
        elif self.path in answers:
            self._reply(200, answers[self.path])
        else:
            self._reply(404, "not found")

    def _reply(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def loopback_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on a free port of 127.0.0.1 in a thread; yields its URL, shuts it down after."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serve_imds(tags: dict[str, str] | None = None) -> Iterator[type[FakeImds]]:
    """A FakeImds on 127.0.0.1, its own class (so a test may change its tags); `.url` says where."""
    handler: type[FakeImds] = type("Imds", (FakeImds,), {"tags": dict(tags or {})})
    with loopback_server(handler) as url:
        handler.url = url
        yield handler


@pytest.fixture
def fake_imds() -> Iterator[str]:
    """The URL of a FakeImds with no tags."""
    with serve_imds() as imds:
        yield imds.url


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening."""
    return free_port()


def free_port() -> int:
    """A loopback port nothing listens on (an endpoint that refuses at once, or for an app started later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def make_deploy(**overrides: object) -> Deploy:
    values: dict[str, object] = {
        "deploy_id": "0b7c7c55-1d1e-4c39-9a55-5a1c1f2e0001",
        "stage": "prod",
        "role": "web",
        "component": "api",
        "seq": 7,
        "release_id": "20261126T0150Z-3f2a9c1",
        "manifest_key": "deployer/releases/api/20261126T0150Z-3f2a9c1/manifest.yml",
        "manifest_sha256": "a" * 64,
        "published_at": "2026-11-26T01:50:00Z",
    }
    values.update(overrides)
    return Deploy(**values)  # type: ignore[arg-type]


def report_entry(
    instance: str,
    components: dict[str, ComponentStatus],
    heartbeat: datetime,
    role: str = "web",
    error: str | None = None,
    lifecycle: Lifecycle | None = None,
) -> ReportEntry:
    """A listed report, as `ReportReader` returns it; `error` makes it unreadable (no report)."""
    who = ReportKey("prod", role, instance)
    report = (
        None if error else StatusReport(key=who, heartbeat_at=heartbeat, components=components, lifecycle=lifecycle)
    )
    return ReportEntry(who, f"deployer/status/prod/{role}/{instance}.json", "etag", heartbeat, report, error)


# -- agents as real subprocesses -----------------------------------------------------------

WAIT_SECONDS = 30.0
#: Every deploy's post hook appends its deploy id here, so tests can count hook runs per agent.
HOOK_LOG = "hooks.log"


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def agent_config(fleet: Fleet, home: Path, instance_id: str | None, **overrides: Any) -> dict[str, Any]:
    """The config an agent of the test fleet gets: prod/web/api, its own root and state under `home`."""
    config: dict[str, Any] = {
        "stage": "prod",
        "role": "web",
        "components": ["api"],
        "bucket": BUCKET,
        "topic_arn": fleet.topic_arn,
        "region": REGION,
        "root_dir": str(home / "root"),
        "state_dir": str(home / "state"),
        "poll_wait_seconds": 1,
        # Never the real IMDS address: an agent asks IMDS for its lifecycle state when a hook is
        # configured. A closed loopback port answers "not there" at once; tests that need IMDS
        # give a FakeImds.
        "metadata_endpoint": f"http://127.0.0.1:{free_port()}",
    }
    if instance_id:
        config["instance_id"] = instance_id
    return {**config, **overrides}


class AgentProcess:
    def __init__(self, fleet: Fleet, home: Path, instance_id: str | None, **overrides: Any) -> None:
        self.fleet = fleet
        self.home = home
        self.instance_id = instance_id
        #: Set when the agent runs with an instance-role session (`instance_role`): its status key carries it.
        self.role_id = ""
        home.mkdir(parents=True, exist_ok=True)
        self.root = home / "root"
        self.config_path = home / "agent.yml"
        self.log_path = home / "agent.log"
        self.config = agent_config(fleet, home, instance_id, **overrides)
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.process: subprocess.Popen[bytes] | None = None
        self._terminated = False
        self._env: dict[str, str] | None = None

    def command(self, verb: str = "agent") -> list[str]:
        return [sys.executable, "-m", "deployer", verb, "--config", str(self.config_path), "--log-json"]

    def start(self, env: dict[str, str] | None = None) -> AgentProcess:
        """Start (or restart) the agent; a restart keeps the environment (its identity) of the first start."""
        self._terminated = False
        self._env = env if env is not None else self._env
        env = self._env
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
            )
        return self

    def run_once(self, verb: str = "boot") -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(verb), capture_output=True, text=True, timeout=60, check=False)

    def terminate(self) -> None:
        """SIGTERM, once: a second one could land while the interpreter finalises, after our
        handler is gone, and kill a process that was stopping cleanly."""
        if self.process is not None and self.process.poll() is None and not self._terminated:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"agent {self.instance_id} ignored SIGTERM for 15s") from None
        return self.process.returncode

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text().splitlines() if self.log_path.exists() else []:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    @property
    def who(self) -> ReportKey:
        return ReportKey(self.config["stage"], self.config["role"], self.instance_id or "", self.role_id)

    def status(self) -> StatusReport | None:
        """This agent's status report, parsed by the protocol's one parser (None if there is none);
        read with the agent's own credentials where it reports to a bucket of its own (another
        account's fleet)."""
        if self.config["bucket"] == self.fleet.bucket:
            return read_report(self.fleet, self.who)
        env = self._env or {}
        session = boto3.session.Session(
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID", "test"),
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY", "test"),
            aws_session_token=env.get("AWS_SESSION_TOKEN"),
            region_name=self.config["region"],
        )
        s3 = session.client("s3", endpoint_url=self.fleet.endpoint_url)
        found = get_document(s3, self.config["bucket"], self.fleet.layout.status_key(self.who))
        return parse_report(found[0], self.who) if found else None

    def component(self, name: str = "api") -> ComponentStatus:
        status = self.status()
        return status.components.get(name, ComponentStatus()) if status else ComponentStatus()

    def on_seq(self, seq: int, component: str = "api") -> bool:
        status = self.component(component)
        return status.seq == seq and status.state is ComponentState.OK

    def served(self, component: str = "api") -> str:
        return (self.root / "opt" / component / "current" / "index.html").read_text()

    def hook_runs(self, component: str = "api") -> list[str]:
        path = self.root / "opt" / component / HOOK_LOG
        return path.read_text().split() if path.exists() else []

    def queue_url(self, suffix: str = "") -> str:
        """The agent's queue (or, with DLQ_SUFFIX, its DLQ)."""
        name = queue_name(DEFAULT_QUEUE_PREFIX, self.config["stage"], self.config["role"], self.instance_id or "")
        return self.fleet.clients.sqs.get_queue_url(QueueName=name + suffix)["QueueUrl"]


def read_report(fleet: Fleet, who: ReportKey) -> StatusReport | None:
    key = fleet.layout.status_key(who)
    found = get_document(fleet.clients.s3, fleet.bucket, key)
    return parse_report(found[0], who) if found else None


@dataclass(frozen=True)
class InstanceRole:
    """An IAM role in moto whose sessions stand in for EC2 instance-role credentials.

    A session named after the instance id has the `aws:userid` EC2 gives an instance
    (`<role id>:<instance id>`), which is what the agent confines its status key and queues by.
    """

    endpoint_url: str
    arn: str
    role_id: str

    def session_env(self, instance_id: str) -> dict[str, str]:
        sts = boto3.client(
            "sts", region_name=REGION, endpoint_url=self.endpoint_url, aws_access_key_id="x", aws_secret_access_key="x"
        )
        creds = sts.assume_role(RoleArn=self.arn, RoleSessionName=instance_id)["Credentials"]
        return {
            "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
            "AWS_SESSION_TOKEN": creds["SessionToken"],
        }


def fleet_instance_role(fleet: Fleet, name: str = "fleet-instance") -> InstanceRole:
    """The instance role of the test fleet in the emulator's IAM, created on first use."""
    iam = boto3.client("iam", region_name=REGION, endpoint_url=fleet.endpoint_url)
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
    }
    try:
        role = iam.get_role(RoleName=name)["Role"]
    except iam.exceptions.NoSuchEntityException:
        role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    return InstanceRole(fleet.endpoint_url, role["Arn"], role["RoleId"])


@pytest.fixture
def instance_role(fleet: Fleet) -> InstanceRole:
    return fleet_instance_role(fleet)


@pytest.fixture
def start_agent(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(
        instance_id: str | None = None,
        boot: bool = True,
        env: dict[str, str] | None = None,
        role: InstanceRole | bool | None = True,
        **overrides: Any,
    ) -> AgentProcess:
        """Start an agent; like on EC2 it runs as an instance-role session named after its instance
        id (so IAM's `${aws:userid}` confines it and the IAM check can judge its calls), unless
        `role=False`."""
        index = len(started) + 1
        agent = AgentProcess(fleet, tmp_path / f"agent-{index}", instance_id or f"i-e2e{index:013d}", **overrides)
        if role is True:
            role = fleet_instance_role(fleet)
        if isinstance(role, InstanceRole):
            env = {**(env or {}), **role.session_env(agent.instance_id or "")}
            agent.role_id = role.role_id
        started.append(agent.start(env))
        if boot:
            wait_until(lambda: agent.status() is not None or not agent.alive(), f"agent {index} to boot")
            assert agent.alive(), agent.log_path.read_text()
        return agent

    yield start
    for agent in started:  # all at once: each finishes its long poll in parallel
        agent.terminate()
    codes = {}
    for agent in started:
        if agent.process is not None:
            codes[agent.instance_id] = agent.stop()
    # Every agent must stop cleanly on SIGTERM: exit 0, nothing left running.
    assert all(code == 0 for code in codes.values()), codes


def release_template(post: tuple[Hook, ...] = ()) -> Manifest:
    record = Hook(f'echo "$DEPLOYER_DEPLOY_ID" >> "$DEPLOYER_RELEASE_DIR/../../{HOOK_LOG}"')
    return Manifest(
        dest="/opt/api/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(post=(*post, record)),
    )


@pytest.fixture
def publish(fleet: Fleet, tmp_path: Path) -> Callable[..., Deploy]:
    counter = iter(range(1, 10_000))
    publisher = Publisher(fleet.clients, fleet.bucket, fleet.topic_arn, fleet.layout)

    def do(text: str | None = None, component: str = "api", post: tuple[Hook, ...] = ()) -> Deploy:
        n = next(counter)
        build = make_tree(tmp_path / f"build-{n}", {"index.html": text or f"release {n}"})
        artifact = pack_directory(build, tmp_path / f"build-{n}.tar.zst")
        template = release_template(post)
        template = Manifest(**{**template.__dict__, "dest": f"/opt/{component}/current"})
        channel = Channel("prod", "web", component)
        return publisher.publish(channel, artifact, template=template, release_id=f"rel-{component}-{n}").deploy

    return do


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deployer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


# -- a flaky network ----------------------------------------------------------------------------

#: Share of connections the flaky network injures (the issue's floor is 20 %).
FLAKY_RATE = 0.22


@pytest.fixture
def flaky(fleet: Fleet) -> Iterator[FaultProxy]:
    """The emulator behind a network that resets or cleanly closes 22 % of connections, at every
    point of the answer (before, inside the headers, inside the body, inside a chunk)."""
    with FaultProxy.to(fleet.endpoint_url, rule=random_faults(FLAKY_RATE, seed=20261126)) as proxy:
        yield proxy
    injured = proxy.injured / max(1, sum(proxy.counts.values()))
    assert injured >= 0.2 or sum(proxy.counts.values()) < 50, f"the network was not flaky enough: {proxy.counts}"


# -- publishing around the fan-out -------------------------------------------------------


class NoFanout:
    """An SNS client whose Publish does nothing: pointers move, no message is delivered."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def publish(self, **_kwargs: Any) -> dict[str, str]:
        return {"MessageId": "suppressed-by-test"}


class BrokenFanout(NoFanout):
    def publish(self, **_kwargs: Any) -> dict[str, str]:
        raise ConnectionResetError("SNS unreachable (injected)")


def silent_publisher(fleet: Fleet, sns: type[NoFanout] = NoFanout) -> Publisher:
    clients = Clients(s3=fleet.clients.s3, sns=sns(fleet.clients.sns), sqs=fleet.clients.sqs)  # type: ignore[arg-type]
    return Publisher(clients, fleet.bucket, fleet.topic_arn, fleet.layout, FAST_POLICY)


def artifact(tmp_path: Path, name: str, text: str) -> Path:
    build = make_tree(tmp_path / f"build-{name}", {"index.html": text})
    return pack_directory(build, tmp_path / f"{name}.tar.zst").path


def artifact_key_of(fleet: Fleet, deploy: Deploy) -> str:
    """The S3 key of the artifact a deploy's manifest names (content-addressed, shared)."""
    found = get_document(fleet.clients.s3, fleet.bucket, deploy.manifest_key)
    assert found is not None
    src = parse_manifest(found[0]).src or ""
    return src.removeprefix(f"s3://{fleet.bucket}/")


def publish_on(publisher: Publisher, channel: Channel, path: Path, release_id: str, **kwargs: Any) -> Deploy:
    template = release_template(**kwargs)
    template = type(template)(**{**template.__dict__, "dest": f"/opt/{channel.component}/current"})
    return publisher.publish(channel, path, template=template, release_id=release_id).deploy


# -- fleet operations ------------------------------------------------------------------------


def make_asg(endpoint_url: str, name: str, size: int) -> list[str]:
    """An Auto Scaling group of `size` InService instances in moto; their ids, sorted."""
    moto = boto3.client("autoscaling", region_name=REGION, endpoint_url=endpoint_url)
    # One of moto's built-in AMIs (listing them all costs seconds).
    moto.create_launch_configuration(LaunchConfigurationName=name, ImageId="ami-03cf127a", InstanceType="t3.micro")
    moto.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchConfigurationName=name,
        MinSize=size,
        MaxSize=size,
        DesiredCapacity=size,
        AvailabilityZones=["us-east-1a"],
    )
    group = moto.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    return sorted(i["InstanceId"] for i in group["Instances"])


def group_with_hook(
    endpoint_url: str,
    hook: str,
    transition: str,
    heartbeat_timeout: int = 3600,
    default_result: str = "ABANDON",
) -> str:
    """A group `web-asg` of one instance in moto with one lifecycle hook on `autoscaling:<transition>`; its instance."""
    [instance] = make_asg(endpoint_url, "web-asg", 1)
    boto3.client("autoscaling", region_name=REGION, endpoint_url=endpoint_url).put_lifecycle_hook(
        LifecycleHookName=hook,
        AutoScalingGroupName="web-asg",
        LifecycleTransition=f"autoscaling:{transition}",
        HeartbeatTimeout=heartbeat_timeout,
        DefaultResult=default_result,
    )
    return instance


#: Agents in these tests heartbeat every second, so --wait can tell live from lost quickly.
FAST_AGENT = {"heartbeat_interval_seconds": 1}


def template_file(path: Path, *post: str) -> Path:
    """A manifest template for `deployer publish --manifest` with the given post hooks."""
    manifest = Manifest(
        dest="/opt/api/current",
        sync_strategy=SyncStrategy.SYMLINK,
        commands=Commands(post=tuple(Hook(run) for run in post)),
    )
    path.write_text(manifest.to_yaml())
    return path


def publish_args(fleet: Fleet, artifact: Path, *extra: str) -> list[str]:
    return [
        "publish", "--bucket", BUCKET, "--topic-arn", fleet.topic_arn,
        "--stage", "prod", "--role", "web", "--component", "api", "--artifact", str(artifact), *extra,
    ]  # fmt: skip


def kill_hard(agent: AgentProcess) -> None:
    """SIGKILL the agent (an instance dying) and take it out of the fixture's clean-stop check."""
    assert agent.process is not None
    agent.process.send_signal(signal.SIGKILL)
    agent.process.wait(timeout=10)
    agent.process = None


def kill_pid_file(path: Path) -> None:
    """Kill a hook process that recorded its pid (hooks run in their own session and outlive a SIGKILLed agent)."""
    if path.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(path.read_text().strip()), signal.SIGKILL)


# -- archives, good and crafted-malicious --------------------------------------------------


def tar_bytes(add: Callable[[tarfile.TarFile], None], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        add(archive)
    return buffer.getvalue()


def add_file(archive: tarfile.TarFile, name: str, content: bytes = b"x", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = mode
    archive.addfile(info, io.BytesIO(content))


def add_special(archive: tarfile.TarFile, name: str, kind: bytes, linkname: str = "", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    archive.addfile(info)


def release_tarball(files: dict[str, str]) -> bytes:
    def add(archive: tarfile.TarFile) -> None:
        for name, content in files.items():
            add_file(archive, name, content.encode())

    return tar_bytes(add)


def write_release(path: Path, files: dict[str, str]) -> tuple[Path, str]:
    data = release_tarball(files)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()
