"""`deployer doctor`: before the first deploy, ask the real account whether a role can do its job.

The emulator evaluates no IAM, so the first place a missing permission would show is a fleet
that does not boot. Doctor asks IAM's policy simulator (`SimulatePrincipalPolicy`, read-only)
every question the IAM model (`publisher.iam_model`) derives from the calls the role makes:
the action, its dependent actions, the resource ARN and the request context. It prints what
would be denied and the statement of `deployer iam-policy` that grants it, and changes nothing.

The questions are pure (`questions`); the simulator is injected (`Ask`), so the same code runs
against a real account and against the suite's loopback fake.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from publisher.iam import USERID, Audience, Scope, policy_for
from publisher.iam_model import Call, Context, Need, Place, Role, expected_calls, needs

#: The instance role's id is not known before an instance runs; any id shows whether the
#: policy's `${aws:userid}` confinement holds, as long as the question uses it consistently.
EXAMPLE_ROLE_ID = "AROADOCTOREXAMPLE0001"
AUDIENCES = {Role.CI: Audience.CI, Role.INSTANCE: Audience.INSTANCE, Role.GC: Audience.GC, Role.TRUST: Audience.TRUST}
#: What the simulator answers for one question: (allowed, IAM's decision word).
Ask = Callable[[str, str, Context], tuple[bool, str]]


@dataclass(frozen=True)
class Question:
    call: Call
    need: Need
    context: Context


@dataclass(frozen=True)
class Finding:
    question: Question
    allowed: bool
    decision: str
    #: Statements of the generated policy that grant what was denied (the fix).
    fixes: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)


def place_for(scope: Scope, instance_id: str = "i-0123456789abcdef0") -> Place:
    """Where a role works, from the same options `iam-policy` takes."""
    return Place(
        bucket=scope.bucket,
        topic_arn=scope.topic_arn,
        prefix=scope.prefix,
        queue_prefix=scope.queue_prefix,
        stage=scope.stage or "prod",
        role=scope.role or "web",
        instance_id=instance_id,
        userid=f"{EXAMPLE_ROLE_ID}:{instance_id}",
        asg_name=scope.asg_name,
        launch=scope.launch,
        deregister=scope.deregister,
        terminate=scope.terminate,
        protect=scope.protect,
        sign_keys=scope.sign_keys,
        target_groups=scope.target_groups,
        secrets=scope.secrets,
        metrics_namespace=scope.metrics_namespace,
        event_bus=scope.event_bus,
        notify_topics=scope.notify_topics,
        assume_roles=scope.assume_roles,
        external_id=scope.external_id,
    )


def questions(role: Role, place: Place) -> list[Question]:
    """Pure: every distinct IAM question `role`'s calls raise in `place`."""
    found: dict[str, Question] = {}
    for call in expected_calls(role, place):
        for need in needs(call):
            context = dict(need.context)
            if role is Role.INSTANCE:
                context["aws:userid"] = place.userid
            key = json.dumps([need.action, need.resource, sorted(context.items())])
            found.setdefault(key, Question(call, need, context))
    return list(found.values())


def fixes(policy: Mapping[str, Any], need: Need, userid: str) -> tuple[Mapping[str, Any], ...]:
    """The statements of `policy` naming `need`'s action on a resource pattern that covers it."""
    granting = []
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if need.action in actions and any(
            fnmatch.fnmatchcase(need.resource, pattern.replace(USERID, userid)) for pattern in resources
        ):
            granting.append(statement)
    return tuple(granting)


def examine(role: Role, scope: Scope, ask: Ask, instance_id: str = "i-0123456789abcdef0") -> list[Finding]:
    """Ask every question of `role` in `scope`; each denial carries the generated statements that fix it."""
    place = place_for(scope, instance_id)
    policy = policy_for(AUDIENCES[role], scope)
    findings = []
    for question in questions(role, place):
        allowed, decision = ask(question.need.action, question.need.resource, question.context)
        found = () if allowed else fixes(policy, question.need, place.userid)
        findings.append(Finding(question, allowed, decision, found))
    return findings


def report(role: Role, principal: str, findings: list[Finding], flags: str) -> list[str]:
    """Lines for the operator: one per denial with its fix, then the verdict."""
    denied = [f for f in findings if not f.allowed]
    lines = []
    for finding in denied:
        need, call = finding.question.need, finding.question.call
        why = f" — {need.why}" if need.why else ""
        context = f" with {dict(finding.question.context)}" if finding.question.context else ""
        lines.append(
            f"DENIED ({finding.decision}) {need.action} on {need.resource}{context}: "
            f"needed by {call.service} {call.operation}{why}"
        )
        for statement in finding.fixes:
            lines.append(f"  add (from `deployer iam-policy --for {role}{flags}`): {json.dumps(statement)}")
        if not finding.fixes:
            lines.append(
                f"  no statement of `deployer iam-policy --for {role}{flags}` grants it: check the options given"
            )
    verdict = (
        f"{principal}: all {len(findings)} permissions the {role} role needs are allowed"
        if not denied
        else f"{principal}: {len(denied)} of {len(findings)} permissions the {role} role needs would be denied"
    )
    return [*lines, verdict]
