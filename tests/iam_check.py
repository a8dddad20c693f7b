"""The IAM check of the whole suite: every call the product made, decided as a real account would.

`tests/iam_record.py` records each AWS call the product makes while the tests run, in every
process. At the end of the session (`pytest_sessionfinish` in tests/support.py) this module turns each record into the
IAM requests the model derives (`publisher.iam_model.needs`), under the identity policy
`deployer iam-policy` prints for the caller's role and the resource policies the product sets
itself (the queue and DLQ policies it was seen setting, the topic policy, the bucket policy),
and has the independent evaluator (`tests/iameval.py`) decide them all in one batch.

It fails the run when a call is missing from the model, or when a role's own call would be
denied. Calls there is no permission to judge are counted apart: `operator` calls (`init` and
`doctor` run with an administrator's rights), calls to a bucket, topic or queue that does not
exist (a test of a mistyped name), and an agent without an instance-role session (the
emulator's default credentials have no `<role id>:<instance id>` to confine it by).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deployer.protocol.layout import ARTIFACTS, CHANNELS, FLEET, RELEASES, STATUS, TRUST
from deployer.protocol.names import DEFAULT_METRICS_NAMESPACE, DEFAULT_PREFIX, DEFAULT_QUEUE_PREFIX
from publisher.iam import Audience, Scope, policy_for
from publisher.iam_model import OPERATIONS, Call, Need, Role, UnknownOperation, default_key_policy, needs, operations
from tests import iameval

ACCOUNT = "123456789012"
REGION = "us-east-1"
#: The principals the roles run as (EC2 instances come with their own, recorded, identity).
#: `{account}` is the deployment's (moto's 123456789012, LocalStack's 000000000000).
SESSIONS: dict[Role, tuple[str, str]] = {
    Role.CI: ("arn:aws:sts::{account}:assumed-role/deployer-ci/ci-job", "AROACIEXAMPLE00000001:ci-job"),
    Role.GC: ("arn:aws:sts::{account}:assumed-role/deployer-gc/gc-job", "AROAGCEXAMPLE00000001:gc-job"),
    Role.TRUST: ("arn:aws:sts::{account}:assumed-role/deployer-trust/holder", "AROATRUSTEXAMPLE00001:holder"),
}
AUDIENCE = {Role.CI: Audience.CI, Role.GC: Audience.GC, Role.TRUST: Audience.TRUST, Role.INSTANCE: Audience.INSTANCE}
#: The first key segment after the prefix; what comes before it is the deployment's prefix.
TOP_SEGMENTS = (RELEASES, ARTIFACTS, CHANNELS, STATUS, TRUST, FLEET)


#: Errors that say the target does not exist: the call named a bucket, topic or queue outside
#: the deployment (a test of a mistyped name). AWS answers a caller with no rights there 403
#: instead; either way nothing is done, so there is no permission to judge.
NOT_THERE = frozenset(
    {"NoSuchBucket", "NotFound", "NotFoundException", "QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"}
)


@dataclass(frozen=True)
class Record:
    test: str
    role: Role
    call: Call
    status: int
    caller: Mapping[str, str]
    scope: Mapping[str, Any] | None
    time: float
    error: str = ""
    #: The deployment's account (its topic's), which every role of the test works in.
    account: str = ACCOUNT
    #: The `deployer` subcommand of the process that made the call ("" in the test process).
    command: str = ""


@dataclass
class Findings:
    """What the check found: coverage per role and every failure, with the test that made the call."""

    evaluated: dict[Role, set[tuple[str, str]]] = field(default_factory=lambda: defaultdict(set))
    requests: Counter[Role] = field(default_factory=Counter)
    not_evaluated: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seen: dict[Role, set[tuple[str, str]]] = field(default_factory=lambda: defaultdict(set))
    #: Tests whose agents ran without an instance-role session (their calls are not judged).
    unconfined: set[str] = field(default_factory=set)

    def lines(self) -> list[str]:
        lines = []
        for role in sorted(self.evaluated):
            ops = sorted(f"{s}:{o}" for s, o in self.evaluated[role])
            verdict = "" if self.failures else f", all allowed: {', '.join(ops)}"
            lines.append(
                f"IAM check: {role}: {len(ops)} distinct operations, {self.requests[role]} requests evaluated{verdict}"
            )
        for why, count in sorted(self.not_evaluated.items()):
            lines.append(f"IAM check: not evaluated ({why}): {count} calls")
        if self.unconfined:
            files = sorted({test.split("::")[0] for test in self.unconfined})
            lines.append(f"IAM check: agents without an instance-role session ran in: {', '.join(files)}")
        return lines + [f"IAM check FAILED: {failure}" for failure in self.failures]


def load(directory: Path) -> tuple[list[Record], list[str]]:
    """Every record written under `directory`, oldest first, and the calls the model does not know."""
    records, unknown = [], []
    for path in sorted(directory.glob("calls-*.jsonl")):
        for line in path.read_text().splitlines():
            raw = json.loads(line)
            params = raw["params"]
            # A call that names no account (a bucket, a queue by name) is in its deployment's: `_in_account`.
            call = Call(raw["service"], raw["operation"], params, raw["region"] or REGION, _account(params) or "")
            if (call.service, call.operation) not in OPERATIONS:
                unknown.append(f"{raw['test']}: {UnknownOperation.__name__}: {call.service} {call.operation}")
                continue
            records.append(
                Record(
                    raw["test"],
                    Role(raw["role"]),
                    call,
                    raw["status"],
                    raw["caller"],
                    raw["scope"],
                    raw["time"],
                    raw.get("error", ""),
                    command=raw.get("command", ""),
                )
            )
    records.sort(key=lambda r: r.time)
    return records, unknown


def _account(params: Mapping[str, Any]) -> str | None:
    for name in ("TopicArn", "SubscriptionArn", "Endpoint"):
        value = params.get(name)
        if isinstance(value, str) and value.startswith("arn:"):
            return value.split(":")[4]
    url = params.get("QueueUrl")
    if isinstance(url, str):
        parts = url.rstrip("/").split("/")
        return parts[-2] if len(parts) >= 2 and parts[-2].isdigit() else None
    return None


def _prefix(key: str) -> str | None:
    parts = key.split("/")
    for index, part in enumerate(parts):
        if part in TOP_SEGMENTS:
            return "/".join(parts[:index])
    return None


class World:
    """What the account holds while one test runs: queue tags and policies, the topic's policy.

    Rebuilt from the records themselves, in time order, the way AWS would hold them: a queue
    keeps the owner tag of its first creation (a CreateQueue of an existing queue with another
    tag does not re-tag it on AWS, nor on LocalStack; moto re-tags), and the latest policy set.
    """

    def __init__(self) -> None:
        self.queue_tags: dict[str, dict[str, str]] = {}
        self.queue_policies: dict[str, Mapping[str, Any]] = {}
        self.topic_policies: dict[str, Mapping[str, Any]] = {}
        #: Buckets the emulator said do not exist (a HEAD's 404 has no error code to tell).
        self.missing_buckets: set[str] = set()

    def learn(self, call: Call, record: Record) -> None:
        status = record.status
        if record.error == "NoSuchBucket" or (call.operation == "HeadBucket" and status == 404):
            self.missing_buckets.add(str(call.params["Bucket"]))
        if status and not 200 <= status < 300:
            return
        self.missing_buckets.discard(str(call.params.get("Bucket")))
        if (call.service, call.operation) == ("sqs", "CreateQueue"):
            self.queue_tags.setdefault(str(call.params["QueueName"]), dict(call.params.get("tags") or {}))
        elif (call.service, call.operation) == ("sqs", "SetQueueAttributes"):
            policy = (call.params.get("Attributes") or {}).get("Policy")
            if policy:
                self.queue_policies[_queue_name(call)] = json.loads(policy)
        elif (call.service, call.operation) == ("sns", "SetTopicAttributes") and call.params.get("AttributeName") == (
            "Policy"
        ):
            self.topic_policies[str(call.params["TopicArn"])] = json.loads(call.params["AttributeValue"])

    def tags(self, call: Call) -> dict[str, str]:
        if call.service != "sqs":
            return {}
        return self.queue_tags.get(_queue_name(call), {})

    def resource_policy(self, call: Call, scope: Scope, need: Need) -> Mapping[str, Any] | None:
        """The resource policy AWS evaluates for `need` of `call` (a KMS key's own, whatever service
        asked for it: SSM decrypting a SecureString needs the key's policy to let IAM decide)."""
        if need.resource.startswith(f"arn:{call.partition}:kms:"):
            return default_key_policy(call.partition, call.account)
        if call.service == "sqs":
            return self.queue_policies.get(_queue_name(call))
        if call.service == "sns" and "TopicArn" in call.params:
            return self.topic_policies.get(str(call.params["TopicArn"])) or policy_for(Audience.TOPIC, scope)
        if call.service == "s3":
            return policy_for(Audience.BUCKET, scope)
        if call.service == "kms":
            return default_key_policy(call.partition, call.account)
        if call.service == "sts" and call.operation == "AssumeRole":
            # The target role's trust, as `iam-policy --for target-trust` prints it for this CI role.
            ci_role = SESSIONS[Role.CI][0].format(account=call.account)
            ci_role = ci_role.replace(":sts::", ":iam::").replace(":assumed-role/", ":role/").rsplit("/", 1)[0]
            trusting = replace(scope, publishers=(ci_role,), external_id=call.params.get("ExternalId"))
            return {**policy_for(Audience.TARGET_TRUST, trusting)}
        return None


def _queue_name(call: Call) -> str:
    return str(call.params.get("QueueName") or str(call.params.get("QueueUrl", "")).rstrip("/").rsplit("/", 1)[-1])


def scope_of(record: Record, test_records: Iterable[Record], topic_arn: str) -> Scope:
    """The `iam-policy` options an operator would have used for this record's role in its test."""
    if record.role is Role.INSTANCE and record.scope:
        config = record.scope
        return Scope(
            bucket=config["bucket"],
            topic_arn=config["topic_arn"],
            prefix=config.get("prefix", DEFAULT_PREFIX),
            queue_prefix=config.get("queue_prefix", DEFAULT_QUEUE_PREFIX),
            stage=config["stage"],
            role=config["role"],
            asg_name=config.get("lifecycle_asg_name"),
            lifecycle=bool(config.get("lifecycle_hook_name")),
            deregister=bool(config.get("deregister_on_shutdown")),
            terminate=bool(config.get("terminate_hook_name")),
            protect=bool(config.get("scale_in_protection")),
            target_groups=_target_groups(config.get("target_group_arns")),
            # What the operator would pass as --secrets: the ones this test's instances read.
            secrets=_secrets_read(test_records, topic_arn.split(":")[4]),
        )
    bucket, prefix, keys, namespace, bus, notified, assumed = "", None, set(), None, None, set(), set()
    for other in test_records:
        if other.role is not record.role:
            continue
        bucket = bucket or str(other.call.params.get("Bucket", ""))
        # What the operator would pass as --event-bus and --notify: the bus and the other topics it told.
        entries = other.call.params.get("Entries") or []
        bus = bus or next((str(e["EventBusName"]) for e in entries if e.get("EventBusName")), None)
        told = other.call.params.get("TopicArn")
        if other.call.operation == "Publish" and told and told != topic_arn:
            notified.add(str(told))
        # What the operator would pass as --metrics-namespace: the one this role put metrics into.
        namespace = namespace or other.call.params.get("Namespace")
        key = other.call.params.get("Key") or other.call.params.get("Prefix")
        prefix = prefix if prefix is not None else (_prefix(str(key)) if key else None)
        if other.call.service == "kms" and "KeyId" in other.call.params:
            keys.add(f"kms:{other.call.params['KeyId']}")
        if other.call.operation == "AssumeRole":
            assumed.add(str(other.call.params["RoleArn"]))
    return Scope(
        bucket=bucket or "unknown-bucket",
        topic_arn=topic_arn,
        prefix=DEFAULT_PREFIX if prefix is None else prefix,
        sign_keys=tuple(sorted(keys)),
        metrics_namespace=str(namespace or DEFAULT_METRICS_NAMESPACE),
        event_bus=bus,
        notify_topics=tuple(sorted(notified)),
        assume_roles=tuple(sorted(assumed)),
    )


def _secrets_read(records: Iterable[Record], account: str) -> tuple[str, ...]:
    """The ARNs of the secrets the instances of a test read (SSM parameters, Secrets Manager secrets)."""
    from publisher.iam_model import parameter_arn, secret_arn

    found: set[str] = set()
    for other in records:
        call = _in_account(other, account).call
        if other.role is Role.INSTANCE and call.service == "ssm":
            found.update(parameter_arn(call, str(name)) for name in call.params.get("Names") or [])
        elif other.role is Role.INSTANCE and call.service == "secretsmanager" and "SecretId" in call.params:
            found.add(secret_arn(call))
    return tuple(sorted(found))


def _target_groups(value: object) -> tuple[str, ...]:
    """An agent config's `target_group_arns` as `iam-policy --target-group` values."""
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _topic(records: Iterable[Record], account: str | None = None) -> str:
    """The test's topic (the first one named), or the first one in `account`."""
    for record in records:
        arn = record.call.params.get("TopicArn")
        if isinstance(arn, str) and (account is None or arn.split(":")[4] == account):
            return arn
        if record.scope and "topic_arn" in record.scope:
            return str(record.scope["topic_arn"])
    return f"arn:aws:sns:{REGION}:{ACCOUNT}:deployer-test"


#: An instance process that never asked who it is (`deployer apply`, which touches nothing of its
#: own): judged as an instance-role session, since no call of its depends on the owner.
ONE_SHOT = (
    "arn:aws:sts::{account}:assumed-role/fleet-instance/i-0oneshot00000000",
    "AROAFLEETINSTANCE0001:i-0oneshot00000000",
)


def _principal(record: Record) -> tuple[str, str] | None:
    """(session ARN, aws:userid) the call runs as; None for an agent that has no instance-role session."""
    if record.role is not Role.INSTANCE:
        arn, userid = SESSIONS[record.role]
        return arn.format(account=record.account), userid
    arn, userid = record.caller.get("Arn", ""), record.caller.get("UserId", "")
    if not arn and record.command == "apply":
        return ONE_SHOT[0].format(account=record.account), ONE_SHOT[1]
    return (arn, userid) if ":assumed-role/" in arn and ":" in userid else None


def request_context(need: Need, userid: str, arn: str) -> dict[str, str | list[str]]:
    role_arn = arn.replace(":sts::", ":iam::").replace(":assumed-role/", ":role/").rsplit("/", 1)[0]
    context: dict[str, str | list[str]] = {"aws:userid": userid, "aws:PrincipalArn": role_arn}
    for key, value in need.context.items():
        context[key] = list(value) if isinstance(value, tuple) else value
    return context


def _skipped(record: Record, world: World) -> str | None:
    """Why a record is not judged, or None."""
    if record.error in NOT_THERE or record.call.params.get("Bucket") in world.missing_buckets:
        return "the target does not exist: a mistyped name, refused either way"
    if record.role is Role.OPERATOR:
        return "operator: init and doctor run with an administrator's rights"
    if _principal(record) is None:
        return "agent without an instance-role session"
    return None


@dataclass
class Batch:
    """The distinct IAM requests of the run, each traced back to the call that raised it."""

    requests: list[iameval.Request] = field(default_factory=list)
    about: dict[str, tuple[Record, Need]] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)

    def add(self, record: Record, need: Need, identity: Mapping[str, Any], resource: Mapping[str, Any] | None) -> bool:
        principal = _principal(record)
        assert principal is not None
        context = request_context(need, principal[1], principal[0])
        key = json.dumps([record.role, principal, identity, resource, need.action, need.resource, context])
        if key in self.keys:
            return False
        self.keys.add(key)
        request_id = str(len(self.requests))
        self.requests.append(
            iameval.Request(
                request_id,
                principal[0],
                (identity,),
                resource,
                need.action,
                need.resource,
                context,
                iameval.account_in(need.resource),
            )
        )
        self.about[request_id] = (record, need)
        return True


def _account_of(record: Record, default: str) -> str:
    """The account a call was made in: its caller's (an agent's instance-role session, CI's session
    in a target's account under `publish --targets`), else the test's deployment's."""
    if record.caller.get("Account"):
        return record.caller["Account"]
    arn = record.caller.get("Arn", "")
    return arn.split(":")[4] if arn.count(":") >= 5 and arn.split(":")[4] else default


def _scope_in(record: Record, test_records: list[Record], topic_arn: str, account: str) -> Scope:
    """The record's scope, built from its account's own calls: in another account, with that
    account's topic too (a target's CI role there is granted that target's bucket and topic, not
    the first one's, and CI at home the first one's, whichever target's bucket was named first)."""
    default = topic_arn.split(":")[4]
    local = [r for r in test_records if _account_of(r, default) == account]
    return scope_of(record, local, topic_arn if account == default else _topic(local, account))


def _home(records: list[Record]) -> list[Record]:
    """The records of the test's own deployment: not those CI made in a target's account as the
    role it assumed there. `publish --targets` stores to its targets in parallel, so a target's
    topic may be named before the test's own."""
    assumed = {
        (arn.split(":")[4], arn.rsplit("/", 1)[-1])
        for r in records
        if r.role is Role.CI and r.call.operation == "AssumeRole" and (arn := str(r.call.params.get("RoleArn", "")))
    }
    return [r for r in records if _session_role(r) not in assumed]


def _session_role(record: Record) -> tuple[str, str] | None:
    """The (account, role name) of the assumed-role session a call was made as, if it was."""
    parts = record.caller.get("Arn", "").split(":", 5)  # arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION
    if len(parts) == 6 and parts[5].startswith("assumed-role/"):
        return parts[4], parts[5].split("/")[1]
    return None


def _in_account(record: Record, account: str) -> Record:
    """`record` in its deployment's account (moto's 123456789012, LocalStack's 000000000000); a
    call that names a queue without its URL is in that account too."""
    record = replace(record, account=account)
    return record if record.call.account else replace(record, call=replace(record.call, account=account))


def check(directory: Path) -> Findings:
    records, unknown = load(directory)
    outcome, batch = Findings(failures=list(unknown)), Batch()
    by_test: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_test[record.test].append(record)
    for test_records in by_test.values():
        world, topic_arn = World(), _topic(_home(test_records))
        account = topic_arn.split(":")[4]
        for listed in test_records:
            here = _account_of(listed, account)
            record = _in_account(listed, here)
            scope = _scope_in(record, test_records, topic_arn, here)
            call = replace(record.call, resource_tags=world.tags(record.call), missing=record.status == 404)
            world.learn(call, record)
            outcome.seen[record.role].add((call.service, call.operation))
            skipped = _skipped(record, world)
            if skipped is not None:
                outcome.not_evaluated[skipped] += 1
                if record.role is Role.INSTANCE and _principal(record) is None:
                    outcome.unconfined.add(record.test)
                continue
            identity = policy_for(AUDIENCE[record.role], scope)
            outcome.evaluated[record.role].add((call.service, call.operation))
            for need in needs(call):
                if batch.add(record, need, identity, world.resource_policy(call, scope, need)):
                    outcome.requests[record.role] += 1
    for decision in iameval.evaluate(batch.requests) if batch.requests else []:
        record, need = batch.about[decision.id]
        if not decision.allowed:
            why = f" ({need.why})" if need.why else ""
            outcome.failures.append(
                f"{record.test}: {record.role} {record.call.service}:{record.call.operation} needs {need.action} on "
                f"{need.resource}{why} with {dict(need.context)}: {decision.decision} {decision.explain} "
                f"{' '.join(decision.errors)}".rstrip()
            )
    return outcome


def unlisted(outcome: Findings) -> list[str]:
    """Operations a role was seen making that `expected_calls` (what doctor asks about) does not list."""
    from publisher.iam_model import Place, expected_calls

    places = [
        Place(
            bucket="b",
            topic_arn=f"arn:aws:sns:{REGION}:{ACCOUNT}:t",
            userid="AROAEXAMPLE:i-0123456789abcdef0",
            asg_name=group,
            launch=True,
            deregister=True,
            terminate=True,
            protect=True,
            sign_keys=("kms:k",),
            target_groups=(f"arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:targetgroup/web/0", "auto"),
            secrets=(
                f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/prod/db",
                f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:prod/api-AbCdEf",
            ),
            event_bus="default",
            notify_topics=(f"arn:aws:sns:{REGION}:{ACCOUNT}:chat",),
            assume_roles=("arn:aws:iam::222222222222:role/deployer-ci",),
            external_id="x-1",
        )
        for group in ("web", None)
    ]
    missing = []
    for role, seen in outcome.seen.items():
        listed = set().union(*(operations(expected_calls(role, place)) for place in places))
        missing += [f"{role} {s}:{o}" for s, o in sorted(seen - listed)]
    return missing
