"""A botocore client plugin that records every AWS call the product makes, for the IAM check.

moto evaluates no IAM, so the suite records what the product calls and has an independent
evaluator decide it (`tests/iam_check.py`). botocore loads client plugins named in
`BOTOCORE_EXPERIMENTAL__PLUGINS` into every client it creates, in every process: the pytest
workers, the agents and the CLI subprocesses inherit the variable, so no product code knows
about this. Stdlib only: it is imported into agents, whose loaded modules a test checks.

Each call is attributed to the role that would make it on AWS from the product modules on its
stack (`role_of`); a call with no product module on its stack is the test harness arranging or
inspecting the emulator, and is not recorded. A thread inherits the frames of the code that
started it, so s3transfer's workers and the fleet readers' pool count for their caller.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Where the records go (a directory; one file per process). Set by tests/conftest.py.
RECORDS_ENV = "DEPLOYER_TEST_IAM_RECORDS"
#: botocore's client plugin variable and this module's entry in it.
PLUGINS_ENV = "BOTOCORE_EXPERIMENTAL__PLUGINS"
PLUGIN = "deployer_iam_record=tests.iam_record"

#: Parameters the IAM model reads; bodies and payloads are never recorded.
KEPT_PARAMS = frozenset(
    {
        "Bucket",
        "Key",
        "Prefix",
        "IfNoneMatch",
        "IfMatch",
        "QueueUrl",
        "QueueName",
        "tags",
        "Tags",
        "TopicArn",
        "Protocol",
        "Endpoint",
        "SubscriptionArn",
        "Name",
        "KeyId",
        "AutoScalingGroupName",
        "AutoScalingGroupNames",
        "LifecycleHookName",
        "InstanceId",
        "InstanceIds",
        "AlarmNames",
        "TargetGroupArn",
        "Names",
        "SecretId",
        "TargetGroupArns",
        "PolicySourceArn",
        "RoleArn",
        "ExternalId",
        "Attributes",
        "AttributeName",
        "AttributeValue",
        "Namespace",
    }
)

#: (module, function or "") → role. Checked from the innermost product frame outwards; the
#: first match decides. Shared adapters (deployer.aws, deployer.protocol) decide nothing.
STRONG: tuple[tuple[str, str, str], ...] = (
    ("deployer.agent", "", "instance"),
    ("deployer.apply", "", "instance"),
    ("deployer.cli.instance", "", "instance"),
    ("publisher.infra", "", "operator"),
    ("publisher.doctor", "", "operator"),
    ("publisher.gc", "", "gc"),
    ("publisher.publish", "", "ci"),
    ("publisher.rollback", "", "ci"),
    ("publisher.rollout", "", "ci"),
    ("publisher.notify", "", "ci"),
    ("publisher.targets", "", "ci"),
    ("publisher.wait", "", "ci"),
    ("publisher.history", "", "ci"),
    ("publisher.fleet", "", "ci"),
    ("publisher.page", "", "ci"),
    ("deployer.cli.fleet", "status", "ci"),
    ("deployer.cli.fleet", "gc_instances", "gc"),
    ("deployer.cli.fleet", "gc_releases", "gc"),
    ("deployer.cli.fleet", "doctor", "operator"),
    ("publisher.trust_update", "", "trust"),
    # Timestamps are signed with the deploy keys and written beside the pointers: CI's work.
    ("publisher.freshness", "", "ci"),
    ("deployer.cli.keys", "trust_refresh", "ci"),
    ("deployer.cli.keys", "", "trust"),
    ("deployer.cli.ci", "init", "operator"),
    ("deployer.cli.ci", "", "ci"),
    ("deployer.cli.rollouts", "", "ci"),
    ("deployer.local.demo", "", "ci"),
)
#: Consulted when no strong rule matched: library modules called directly by a test.
WEAK: tuple[tuple[str, str, str], ...] = (
    ("publisher.retention", "", "gc"),
    ("publisher.signing", "", "ci"),
    ("deployer.aws.registration", "", "gc"),
)

Frame = tuple[str, str]  # (module, function)
_inherited = threading.local()
_lock = threading.Lock()
#: GetCallerIdentity's answer, by the access key that asked: who a later call with that key is.
_callers: dict[str, dict[str, str]] = {}
_config: dict[str, dict[str, Any] | None] = {}


def role_of(frames: Iterable[Frame]) -> str | None:
    """Pure: the role for a call made under `frames` (innermost first); None for the harness.

    A call whose nearest caller outside the libraries is a test module is the harness, even
    inside a product callback (a test's hook that plays an instance in the middle of gc).
    """
    listed = list(frames)
    nearest = next((m for m, _ in listed if m.split(".", 1)[0] in ("tests", "deployer", "publisher")), "")
    if nearest.startswith("tests."):
        return None
    for rules in (STRONG, WEAK):
        for module, function in listed:
            for prefix, name, role in rules:
                if (module == prefix or module.startswith(prefix + ".")) and (not name or name == function):
                    return role
    return None


def _frames() -> list[Frame]:
    found: list[Frame] = []
    frame = sys._getframe(2)
    while frame is not None:
        found.append((str(frame.f_globals.get("__name__", "")), frame.f_code.co_name))
        frame = frame.f_back  # type: ignore[assignment]
    return found + list(getattr(_inherited, "frames", []))


def _patch_threads() -> None:
    """Threads remember the frames of whoever started them (once per process)."""
    if getattr(threading.Thread, "_deployer_iam_record", False):
        return
    original_start = threading.Thread.start
    original_run = threading.Thread.run

    def start(self: threading.Thread) -> None:
        self._deployer_frames = _frames()  # type: ignore[attr-defined]
        original_start(self)

    def run(self: threading.Thread) -> None:
        _inherited.frames = getattr(self, "_deployer_frames", [])
        original_run(self)

    threading.Thread.start = start  # type: ignore[method-assign]
    threading.Thread.run = run  # type: ignore[method-assign]
    threading.Thread._deployer_iam_record = True  # type: ignore[attr-defined]


#: Of a PutEvents entry, what IAM sees (its condition keys and the bus); never the detail.
KEPT_ENTRY_FIELDS = ("Source", "DetailType", "EventBusName")


def _kept(params: Mapping[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for name, value in params.items():
        if name in KEPT_PARAMS:
            kept[name] = value if isinstance(value, str | int | bool | list | dict) else str(value)
    if isinstance(params.get("Entries"), list):
        kept["Entries"] = [{k: e[k] for k in KEPT_ENTRY_FIELDS if k in e} for e in params["Entries"]]
    return kept


def _agent_scope() -> dict[str, Any] | None:
    """The agent config named by `--config` in argv (what iam-policy would have been run with)."""
    if "scope" not in _config:
        _config["scope"] = _read_agent_config()
    return _config["scope"]


def _read_agent_config() -> dict[str, Any] | None:
    argv = sys.argv
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return None
    try:
        import yaml

        loaded = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    except (OSError, ValueError, ImportError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _command() -> str:
    """The `deployer` subcommand this process runs ("apply", "agent", …), "" if it is not the CLI."""
    argv = sys.argv
    if argv and argv[0].endswith(("deployer/__main__.py", "/deployer")):
        return next((arg for arg in argv[1:] if not arg.startswith("-")), "")
    return ""


def _write(record: dict[str, Any]) -> None:
    directory = os.environ.get(RECORDS_ENV)
    if not directory:
        return
    line = json.dumps(record, default=str) + "\n"
    with _lock, open(Path(directory) / f"calls-{os.getpid()}.jsonl", "a") as out:
        out.write(line)


class _ClientRecorder:
    """The event handlers registered on one client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.service = client.meta.service_model.service_name
        self.region = client.meta.region_name

    def access_key(self) -> str:
        credentials = getattr(self.client._request_signer, "_credentials", None)
        return str(getattr(credentials, "access_key", "") or "")

    def before(self, params: Mapping[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        role = role_of(_frames())
        if role is None:
            return
        record = {
            "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
            "role": role,
            "service": self.service,
            "operation": model.name,
            "region": self.region,
            "params": _kept(params),
            "caller": dict(_callers.get(self.access_key(), {})),
            "scope": _agent_scope() if role == "instance" else None,
            "command": _command(),
            "time": time.time(),
        }
        if context.get("is_presign_request"):
            _write({**record, "status": 0})
        else:
            context["deployer_iam_record"] = record

    def after(self, http_response: Any, parsed: Mapping[str, Any], context: dict[str, Any], **_: Any) -> None:
        record = context.pop("deployer_iam_record", None)
        if record is None:
            return
        record["error"] = str(parsed.get("Error", {}).get("Code", "")) if http_response.status_code >= 300 else ""
        if record["operation"] == "GetCallerIdentity" and http_response.status_code == 200:
            caller = {"UserId": str(parsed.get("UserId", "")), "Arn": str(parsed.get("Arn", ""))}
            with _lock:
                _callers[self.access_key()] = caller
            record["caller"] = caller
        if record["operation"] == "AssumeRole" and http_response.status_code == 200 and record["role"] == "ci":
            # CI in a target's account (`publish --targets`): every later call with these
            # credentials is that account's CI role's, judged there.
            user = parsed.get("AssumedRoleUser", {})
            with _lock:
                _callers[str(parsed.get("Credentials", {}).get("AccessKeyId", ""))] = {
                    "UserId": str(user.get("AssumedRoleId", "")),
                    "Arn": str(user.get("Arn", "")),
                    "Account": str(record["params"].get("RoleArn", "")).split(":")[4],
                }
        _write({**record, "status": http_response.status_code})

    def failed(self, context: dict[str, Any], **_: Any) -> None:
        record = context.pop("deployer_iam_record", None)
        if record is not None:
            _write({**record, "status": 0})


def initialize_client_plugin(client: Any) -> None:
    """botocore's entry point: called for every client created while the plugin variable is set."""
    if not os.environ.get(RECORDS_ENV):
        return
    _patch_threads()
    recorder = _ClientRecorder(client)
    client.meta.events.register("before-parameter-build", recorder.before)
    client.meta.events.register("after-call", recorder.after)
    client.meta.events.register("after-call-error", recorder.failed)
