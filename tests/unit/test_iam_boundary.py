"""The trust boundary decided by an independent IAM evaluator, not by reading statements.

Every call below goes through the product's IAM model (`publisher.iam_model.needs`) and is
decided by `tests/iameval.py` (iam-simulate over the service authorization reference) under
the identity policy `deployer iam-policy` prints for the caller and the resource policies the
product sets: the queue and DLQ policies the agent writes, the topic policy `init` writes, the
bucket policy. A call is denied when any of its IAM requests is.

- Each role's own calls (`expected_calls`, what `deployer doctor` asks a real account) are all allowed.
- Instance A's attempts on instance B, and an instance's (or a narrowed CI's) attempts on what
  only CI may write, are all denied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import pytest

from deployer.agent.queue import REDRIVE_DENY_ALL, dlq_policy, queue_policy, redrive_allow_only
from deployer.protocol.names import DLQ_SUFFIX, OWNER_TAG, queue_name
from publisher.iam import Audience, Scope, policy_for
from publisher.iam_model import Call, Place, Role, default_key_policy, expected_calls, needs
from tests import iameval
from tests.iam_check import request_context

ACCOUNT = "123456789012"
REGION = "us-east-1"
TOPIC = f"arn:aws:sns:{REGION}:{ACCOUNT}:deployer"
BUCKET = "fleet-deploys"
ROLE_ID = "AROAFLEETINSTANCE0001"
CI_ROLE = f"arn:aws:iam::{ACCOUNT}:role/deployer-ci"


@dataclass(frozen=True)
class Principal:
    role: Role
    arn: str
    userid: str
    scope: Scope

    @property
    def policy(self) -> Mapping[str, Any]:
        audience = {Role.CI: Audience.CI, Role.INSTANCE: Audience.INSTANCE, Role.GC: Audience.GC}
        return policy_for(audience.get(self.role, Audience.TRUST), self.scope)


def instance(instance_id: str) -> Principal:
    scope = Scope(
        BUCKET,
        TOPIC,
        stage="prod",
        role="web",
        deregister=True,
        asg_name="web-asg",
        lifecycle=True,
        terminate=True,
        protect=True,
        target_groups=("arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef",),
    )
    return Principal(
        Role.INSTANCE,
        f"arn:aws:sts::{ACCOUNT}:assumed-role/fleet-instance/{instance_id}",
        f"{ROLE_ID}:{instance_id}",
        scope,
    )


A, B = instance("i-0aaaaaaaaaaaaaaa1"), instance("i-0bbbbbbbbbbbbbbb2")
CI = Principal(
    Role.CI, f"arn:aws:sts::{ACCOUNT}:assumed-role/deployer-ci/job", "AROACIEXAMPLE0000001:job", Scope(BUCKET, TOPIC)
)
CI_DEV = replace(CI, scope=Scope(BUCKET, TOPIC, stage="dev"))
CHAT = f"arn:aws:sns:{REGION}:{ACCOUNT}:deploys-chat"
CI_NEWS = replace(CI, scope=Scope(BUCKET, TOPIC, event_bus="default", notify_topics=(CHAT,)))
#: A target in another account (`publish --targets`): its CI role, and the external id its trust asks for.
TARGET_ROLE, EXTERNAL_ID = "arn:aws:iam::222222222222:role/deployer-ci", "fleet-1"
CI_TARGETS = replace(CI, scope=Scope(BUCKET, TOPIC, assume_roles=(TARGET_ROLE,), external_id=EXTERNAL_ID))
GC = Principal(
    Role.GC, f"arn:aws:sts::{ACCOUNT}:assumed-role/deployer-gc/gc", "AROAGCEXAMPLE0000001:gc", Scope(BUCKET, TOPIC)
)
TRUST_HOLDER = Principal(
    Role.TRUST,
    f"arn:aws:sts::{ACCOUNT}:assumed-role/deployer-trust/holder",
    "AROATRUSTEXAMPLE0001:holder",
    Scope(BUCKET, TOPIC, sign_keys=("kms:1234abcd-12ab-34cd-56ef-1234567890ab",)),
)


def queue(owner: Principal, dlq: bool = False) -> str:
    name = queue_name("deployer", "prod", "web", owner.userid.split(":")[1]) + (DLQ_SUFFIX if dlq else "")
    return f"http://127.0.0.1:4566/{ACCOUNT}/{name}"  # only its path is read: account and name


def queue_arn(owner: Principal, dlq: bool = False) -> str:
    return f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue(owner, dlq).rsplit('/', 1)[1]}"


def resource_policy(call: Call) -> Mapping[str, Any] | None:
    """What the product sets on the target: the agent's queue/DLQ policies, init's topic policy, the bucket policy."""
    scope = Scope(BUCKET, TOPIC, publishers=(CI_ROLE,))
    if call.service == "sqs":
        url = str(call.params.get("QueueUrl", ""))
        for owner in (A, B):
            if url == queue(owner):
                return dict(json.loads(queue_policy(queue_arn(owner), TOPIC)))
            if url == queue(owner, dlq=True):
                return dict(json.loads(dlq_policy(queue_arn(owner, dlq=True), owner.userid)))
        return None
    if call.service == "sns":
        return policy_for(Audience.TOPIC, scope)
    if call.service == "s3":
        return policy_for(Audience.BUCKET, scope)
    if call.service == "kms":
        return default_key_policy("aws", ACCOUNT)
    if call.service == "sts":
        return policy_for(Audience.TARGET_TRUST, replace(scope, publishers=(CI_ROLE,), external_id=EXTERNAL_ID))
    return None


def call(service: str, operation: str, owner: Principal | None = None, **params: Any) -> Call:
    """A call on a resource owned by `owner` (its queues carry `owner`'s tag)."""
    tags = {OWNER_TAG: owner.userid} if owner else {}
    return Call(service, operation, params, REGION, ACCOUNT, resource_tags=tags)


def s3(operation: str, key: str, **params: Any) -> Call:
    return call("s3", operation, Bucket=BUCKET, Key=f"deployer/{key}", **params)


def decide(attempts: list[tuple[str, Principal, Call]]) -> dict[str, list[iameval.Decision]]:
    requests, labels = [], {}
    for label, who, attempt in attempts:
        for index, need in enumerate(needs(attempt)):
            request_id = f"{label}#{index}"
            principal = who.arn
            requests.append(
                iameval.Request(
                    request_id,
                    principal,
                    (who.policy,),
                    resource_policy(attempt),
                    need.action,
                    need.resource,
                    request_context(need, who.userid, principal),
                    iameval.account_in(need.resource),
                )
            )
            labels[request_id] = label
    decided: dict[str, list[iameval.Decision]] = {label: [] for label, _, _ in attempts}
    for decision in iameval.evaluate(requests):
        decided[labels[decision.id]].append(decision)
    return decided


@pytest.fixture(autouse=True)
def evaluator() -> None:
    reason = iameval.available()
    if reason is not None:
        pytest.skip(reason)


def place(who: Principal, **overrides: Any) -> Place:
    return Place(
        bucket=BUCKET,
        topic_arn=TOPIC,
        instance_id=who.userid.split(":")[1],
        userid=who.userid,
        asg_name="web-asg",
        launch=True,
        terminate=True,
        protect=True,
        deregister=True,
        sign_keys=who.scope.sign_keys,
        target_groups=who.scope.target_groups,
        event_bus=who.scope.event_bus,
        notify_topics=who.scope.notify_topics,
        assume_roles=who.scope.assume_roles,
        external_id=who.scope.external_id,
        **overrides,
    )


@pytest.mark.parametrize(
    "who",
    [A, CI, CI_NEWS, CI_TARGETS, GC, TRUST_HOLDER],
    ids=["instance", "ci", "ci-events-notify", "ci-targets", "gc", "trust"],
)
def test_every_call_a_role_makes_is_allowed_by_the_policy_generated_for_it(who: Principal) -> None:
    attempts = [(f"{c.service}:{c.operation}:{i}", who, c) for i, c in enumerate(expected_calls(who.role, place(who)))]
    decided = decide(attempts)
    denied = {label: [(d.decision, d.explain, d.errors) for d in ds if not d.allowed] for label, ds in decided.items()}
    assert {label: found for label, found in denied.items() if found} == {}


def test_an_instance_may_tag_on_create_only_a_queue_that_has_no_owner_or_is_its_own() -> None:
    name = queue(A).rsplit("/", 1)[1]
    own_new = call("sqs", "CreateQueue", QueueName=name, tags={OWNER_TAG: A.userid})
    retag_foreign = call("sqs", "TagQueue", B, QueueUrl=queue(B), Tags={OWNER_TAG: A.userid})
    create_over_foreign = call(
        "sqs", "CreateQueue", B, QueueName=queue(B).rsplit("/", 1)[1], tags={OWNER_TAG: A.userid}
    )
    decided = decide([("own", A, own_new), ("retag", A, retag_foreign), ("over", A, create_over_foreign)])
    assert all(d.allowed for d in decided["own"])
    assert not all(d.allowed for d in decided["retag"])
    assert not all(d.allowed for d in decided["over"])


#: What instance A (or a pipeline narrowed to `dev`, or gc) must never be able to do.
CROSS_OWNER_AND_CI_ONLY: list[tuple[str, Principal, Call]] = [
    ("A re-tags B's queue as its own", A, call("sqs", "TagQueue", B, QueueUrl=queue(B), Tags={OWNER_TAG: A.userid})),
    (
        "A re-tags B's DLQ as its own",
        A,
        call("sqs", "TagQueue", B, QueueUrl=queue(B, True), Tags={OWNER_TAG: A.userid}),
    ),
    (
        "A creates B's existing queue tagged as its own",
        A,
        call("sqs", "CreateQueue", B, QueueName=queue(B).rsplit("/", 1)[1], tags={OWNER_TAG: A.userid}),
    ),
    ("A receives from B's queue", A, call("sqs", "ReceiveMessage", B, QueueUrl=queue(B))),
    ("A deletes B's messages", A, call("sqs", "DeleteMessage", B, QueueUrl=queue(B))),
    ("A hides B's messages", A, call("sqs", "ChangeMessageVisibility", B, QueueUrl=queue(B))),
    ("A rewrites B's queue attributes", A, call("sqs", "SetQueueAttributes", B, QueueUrl=queue(B))),
    ("A rewrites B's DLQ attributes", A, call("sqs", "SetQueueAttributes", B, QueueUrl=queue(B, True))),
    ("A reads B's queue attributes", A, call("sqs", "GetQueueAttributes", B, QueueUrl=queue(B))),
    ("A deletes B's queue", A, call("sqs", "DeleteQueue", B, QueueUrl=queue(B))),
    ("A looks up B's queue", A, call("sqs", "GetQueueUrl", B, QueueName=queue(B).rsplit("/", 1)[1])),
    ("A sends to B's DLQ", A, call("sqs", "SendMessage", B, QueueUrl=queue(B, True))),
    ("A sends to B's queue", A, call("sqs", "SendMessage", B, QueueUrl=queue(B))),
    ("A sends a deploy straight into its own queue", A, call("sqs", "SendMessage", A, QueueUrl=queue(A))),
    (
        "A subscribes B's DLQ",
        A,
        call("sns", "Subscribe", TopicArn=TOPIC, Protocol="sqs", Endpoint=queue_arn(B, True)),
    ),
    (
        "A subscribes its own DLQ",
        A,
        call("sns", "Subscribe", TopicArn=TOPIC, Protocol="sqs", Endpoint=queue_arn(A, True)),
    ),
    (
        "A subscribes an HTTPS endpoint",
        A,
        call("sns", "Subscribe", TopicArn=TOPIC, Protocol="https", Endpoint="https://attacker.example/"),
    ),
    (
        "A subscribes another role's queue",
        A,
        call(
            "sns",
            "Subscribe",
            TopicArn=TOPIC,
            Protocol="sqs",
            Endpoint=f"arn:aws:sqs:{REGION}:{ACCOUNT}:deployer--prod--admin--i-0ccc",
        ),
    ),
    ("A writes B's status report", A, s3("PutObject", f"status/prod/web/{B.userid}.json")),
    ("A deletes B's status report", A, s3("DeleteObject", f"status/prod/web/{B.userid}.json")),
    ("A reads B's status report", A, s3("GetObject", f"status/prod/web/{B.userid}.json")),
    ("A moves a pointer", A, s3("PutObject", "channels/prod/web/api/latest.json", IfMatch='"e"')),
    ("A writes a history entry", A, s3("PutObject", "channels/prod/web/api/history/9.json", IfNoneMatch="*")),
    ("A writes a rollout cursor", A, s3("PutObject", "channels/prod/web/api/rollouts/d.json", IfNoneMatch="*")),
    ("A stores a trust version", A, s3("PutObject", "trust/3.json", IfNoneMatch="*")),
    ("A overwrites an artifact", A, s3("PutObject", "artifacts/sha256/" + "0" * 64)),
    ("A writes a release manifest", A, s3("PutObject", "releases/api/r1/manifest.yml", IfNoneMatch="*")),
    ("A condemns a release", A, s3("PutObject", "releases/api/r1/condemned.json", IfNoneMatch="*")),
    ("A pardons a condemned release", A, s3("DeleteObject", "releases/api/r1/condemned.json")),
    ("A reads another stage's pointer", A, s3("GetObject", "channels/staging/web/api/latest.json")),
    ("A lists every status report", A, call("s3", "ListObjectsV2", Bucket=BUCKET, Prefix="deployer/status/")),
    ("A lists the whole bucket", A, call("s3", "ListObjectsV2", Bucket=BUCKET)),
    ("A publishes a deploy", A, call("sns", "Publish", TopicArn=TOPIC)),
    ("A signs with a KMS key", A, call("kms", "Sign", KeyId="1234abcd-12ab-34cd-56ef-1234567890ab")),
    (
        "A completes another group's lifecycle action",
        A,
        call("autoscaling", "CompleteLifecycleAction", AutoScalingGroupName="admin-asg"),
    ),
    (
        "A heartbeats another group's lifecycle action",
        A,
        call("autoscaling", "RecordLifecycleActionHeartbeat", AutoScalingGroupName="admin-asg"),
    ),
    (
        "A takes the targets of a group it does not serve in out of service",
        A,
        call(
            "elbv2",
            "DeregisterTargets",
            TargetGroupArn=f"arn:aws:elasticloadbalancing:{REGION}:{ACCOUNT}:targetgroup/admin/0123456789abcdef",
        ),
    ),
    (
        "A reads a secret no manifest of its fleet names",
        A,
        call("ssm", "GetParameters", Names=["/admin/root_password"], WithDecryption=True),
    ),
    (
        "A reads another fleet's Secrets Manager secret",
        A,
        call("secretsmanager", "GetSecretValue", SecretId="admin/api"),
    ),
    (
        "a dev pipeline moves a prod pointer",
        CI_DEV,
        s3("PutObject", "channels/prod/web/api/latest.json", IfMatch='"e"'),
    ),
    ("a pipeline writes a status report", CI, s3("PutObject", f"status/prod/web/{A.userid}.json")),
    ("a pipeline receives an instance's deploys", CI, call("sqs", "ReceiveMessage", A, QueueUrl=queue(A))),
    ("a pipeline stores a trust version", CI, s3("PutObject", "trust/3.json", IfNoneMatch="*")),
    ("a pipeline writes a pointer unconditionally", CI, s3("PutObject", "channels/prod/web/api/latest.json")),
    ("gc moves a pointer", GC, s3("PutObject", "channels/prod/web/api/latest.json", IfMatch='"e"')),
    # PutMetricData takes no resource: the namespace condition is all that confines it.
    ("a pipeline puts metrics into another namespace", CI, call("cloudwatch", "PutMetricData", Namespace="Billing")),
    ("gc puts metrics into an AWS service's namespace", GC, call("cloudwatch", "PutMetricData", Namespace="AWS/EC2")),
    ("an instance puts the fleet's gauges", A, call("cloudwatch", "PutMetricData", Namespace="Deployer")),
    ("a trust key holder moves a pointer", TRUST_HOLDER, s3("PutObject", "channels/prod/web/api/latest.json")),
    # Instance events: an object under the writer's own name, written once; no bus at all.
    (
        "A tells a failure in B's name",
        A,
        s3("PutObject", f"events/instance-deploy-failed/prod/web/d1/{B.userid}.json", IfNoneMatch="*"),
    ),
    ("A rewrites an event it told", A, s3("PutObject", f"events/instance-deploy-failed/prod/web/d1/{A.userid}.json")),
    (
        "A sends an event to the bus",
        A,
        call("events", "PutEvents", Entries=[{"Source": "deployer", "DetailType": "Rollout Succeeded"}]),
    ),
    (
        "a pipeline without --event-bus sends an event",
        CI,
        call("events", "PutEvents", Entries=[{"Source": "deployer", "DetailType": "Wave Started"}]),
    ),
    (
        "a pipeline poses as S3 on the bus",
        CI_NEWS,
        call("events", "PutEvents", Entries=[{"Source": "aws.s3", "DetailType": "Object Created"}]),
    ),
    (
        "a pipeline sends to another bus",
        CI_NEWS,
        call(
            "events",
            "PutEvents",
            Entries=[{"Source": "deployer", "DetailType": "Wave Started", "EventBusName": "billing"}],
        ),
    ),
    (
        "a pipeline tells a topic it was not given",
        CI_NEWS,
        call("sns", "Publish", TopicArn=f"arn:aws:sns:{REGION}:{ACCOUNT}:billing-alerts"),
    ),
    # Targets in other accounts: only the roles given, only with the external id, only by CI.
    (
        "a pipeline assumes a target role it was not given",
        CI,
        call("sts", "AssumeRole", RoleArn=TARGET_ROLE, ExternalId=EXTERNAL_ID),
    ),
    (
        "a pipeline assumes the target role without its external id",
        CI_TARGETS,
        call("sts", "AssumeRole", RoleArn=TARGET_ROLE),
    ),
    (
        "a pipeline assumes it with another external id",
        CI_TARGETS,
        call("sts", "AssumeRole", RoleArn=TARGET_ROLE, ExternalId="guess"),
    ),
    (
        "an instance assumes the target CI role",
        A,
        call("sts", "AssumeRole", RoleArn=TARGET_ROLE, ExternalId=EXTERNAL_ID),
    ),
]


def test_every_cross_owner_and_ci_only_attempt_is_denied() -> None:
    assert len(CROSS_OWNER_AND_CI_ONLY) >= 25
    decided = decide(CROSS_OWNER_AND_CI_ONLY)
    allowed = [label for label, decisions in decided.items() if all(d.allowed for d in decisions)]
    assert allowed == []
    # Denied by IAM's rules, not refused as a malformed question (the evaluator's "Error").
    malformed = {label: [d.errors for d in ds if d.decision == iameval.ERROR] for label, ds in decided.items()}
    assert {label: errors for label, errors in malformed.items() if errors} == {}


def redrive_admits(dead_letter_redrive_allow: str, source_queue_arn: str) -> bool:
    """SQS's rule for naming a queue as dead-letter target (RedriveAllowPolicy), as the API reference states it."""
    policy = json.loads(dead_letter_redrive_allow)
    permission = policy["redrivePermission"]
    return permission == "allowAll" or (permission == "byQueue" and source_queue_arn in policy["sourceQueueArns"])


def test_no_instance_can_redrive_its_own_queue_into_another_instances_queue_or_dlq() -> None:
    """IAM lets A set its own queue's RedrivePolicy to anything; SQS then checks the target's
    RedriveAllowPolicy, which the agent sets: its DLQ admits only its own queue, its queue nobody."""
    assert not redrive_admits(redrive_allow_only(queue_arn(B)), queue_arn(A))
    assert not redrive_admits(REDRIVE_DENY_ALL, queue_arn(A))
    assert redrive_admits(redrive_allow_only(queue_arn(A)), queue_arn(A))


def test_every_generated_policy_uses_only_condition_keys_and_resources_its_actions_support() -> None:
    target_role = f"arn:aws:iam::{ACCOUNT}:role/deployer-ci-eu"
    scopes = [
        Scope(BUCKET, TOPIC),
        Scope(BUCKET, TOPIC, stage="prod", role="web", deregister=True, asg_name="web-asg"),
        Scope(
            BUCKET,
            TOPIC,
            lifecycle=True,
            publishers=(CI_ROLE,),
            sign_keys=("kms:1234abcd",),
            event_bus="default",
            assume_roles=(target_role,),
            external_id="fleet-1",
        ),
    ]
    identity = (Audience.CI, Audience.INSTANCE, Audience.GC, Audience.TRUST)
    policies = [
        (f"{audience}/{index}", policy_for(audience, scope), "identity" if audience in identity else "resource")
        for index, scope in enumerate(scopes)
        for audience in Audience
        if audience is not Audience.TARGET_TRUST or scope.publishers  # a role's trust names who assumes it
    ]
    policies.append(("queue", json.loads(queue_policy(queue_arn(A), TOPIC)), "resource"))
    policies.append(("dlq", json.loads(dlq_policy(queue_arn(A, True), A.userid)), "resource"))
    assert iameval.lint(policies) == []
