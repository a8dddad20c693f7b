"""IAM's policy simulator, read-only: would this principal be allowed this action on this resource?

`SimulatePrincipalPolicy` evaluates the identity policies attached to a role or user (and the
account's SCPs and boundaries) against one request context; it changes nothing in the account.
It cannot take an assumed-role session as the caller, so an EC2 instance's `aws:userid` is
given as a context entry, as is every other key the request would carry.
https://docs.aws.amazon.com/IAM/latest/APIReference/API_SimulatePrincipalPolicy.html
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy

if TYPE_CHECKING:
    from mypy_boto3_iam import IAMClient
    from mypy_boto3_sts import STSClient

#: SimulatePrincipalPolicy's answers; anything but "allowed" is a denial.
ALLOWED = "allowed"


@dataclass(frozen=True)
class Simulated:
    action: str
    resource: str
    decision: str  # "allowed", "implicitDeny" or "explicitDeny"
    #: The statements that decided (policy ids), as IAM names them.
    matched: tuple[str, ...]

    @property
    def allowed(self) -> bool:
        return self.decision == ALLOWED


def context_entries(context: Mapping[str, str | tuple[str, ...]]) -> list[dict[str, Any]]:
    """A request context as SimulatePrincipalPolicy's ContextEntries (lists as `stringList`)."""
    return [
        {
            "ContextKeyName": key,
            "ContextKeyValues": list(value) if isinstance(value, tuple) else [value],
            "ContextKeyType": "stringList" if isinstance(value, tuple) else "string",
        }
        for key, value in sorted(context.items())
    ]


def simulate(
    iam: IAMClient,
    principal_arn: str,
    action: str,
    resource: str,
    context: Mapping[str, str | tuple[str, ...]],
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Simulated:
    """One question to the simulator: `action` on `resource` with `context`, as `principal_arn`."""
    answer = policy.call(
        iam.simulate_principal_policy,
        PolicySourceArn=principal_arn,
        ActionNames=[action],
        ResourceArns=[resource],
        ContextEntries=context_entries(context),
    )
    [result] = [r for r in answer["EvaluationResults"] if r["EvalActionName"] == action] or [
        {"EvalActionName": action, "EvalDecision": "implicitDeny", "MatchedStatements": []}
    ]
    matched = tuple(str(m.get("SourcePolicyId", "")) for m in result.get("MatchedStatements", []))
    return Simulated(action, resource, str(result["EvalDecision"]), matched)


def caller_principal(sts: STSClient, policy: RetryPolicy = DEFAULT_POLICY) -> str:
    """The role (or user) behind the caller's credentials: an assumed-role session names its role."""
    arn = str(policy.call(sts.get_caller_identity)["Arn"])
    if ":assumed-role/" in arn:
        partition_service, _, path = arn.partition(":assumed-role/")
        role = path.rsplit("/", 1)[0]
        return partition_service.replace(":sts:", ":iam:") + f":role/{role}"
    return arn
