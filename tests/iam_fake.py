"""FAKE: IAM's `SimulatePrincipalPolicy` on loopback, answered by the suite's independent evaluator.

Neither moto nor LocalStack implements the policy simulator, and `deployer doctor` needs it.
This fake speaks IAM's query protocol (form-encoded request, XML answer, IAM's error shape) and
decides each question with `tests/iameval.py` over the identity policies a test attached to
the principal, as the real simulator does for a role: identity policies only (a KMS key is
given its default key policy, which lets IAM decide). It answers nothing else: any other
action is refused and recorded, so a test can prove doctor changed nothing.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from xml.sax.saxutils import escape

from publisher.iam_model import default_key_policy
from tests import iameval
from tests.support import loopback_server

NAMESPACE = "https://iam.amazonaws.com/doc/2010-05-08/"  # IAM's XML namespace: a name, never contacted
DECISIONS = {
    iameval.ALLOWED: "allowed",
    iameval.IMPLICITLY_DENIED: "implicitDeny",
    iameval.EXPLICITLY_DENIED: "explicitDeny",
    iameval.ERROR: "implicitDeny",
}


@dataclass
class FakeSimulator:
    """Principal ARN → its identity policies; every action asked for is recorded in `actions`."""

    policies: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)
    url: str = ""

    def answer(self, form: Mapping[str, str]) -> tuple[int, str]:
        action = form.get("Action", "")
        self.actions.append(action)
        if action != "SimulatePrincipalPolicy":
            return 400, error("InvalidAction", f"the fake IAM answers SimulatePrincipalPolicy only, not {action}")
        principal = form["PolicySourceArn"]
        if principal not in self.policies:
            return 404, error("NoSuchEntity", f"The role with name {principal.rsplit('/', 1)[-1]} cannot be found.")
        actions = members(form, "ActionNames")
        resources = members(form, "ResourceArns") or ["*"]
        context: dict[str, str | list[str]] = {"aws:PrincipalArn": principal}
        for index in range(1, 100):
            name = form.get(f"ContextEntries.member.{index}.ContextKeyName")
            if name is None:
                break
            values = members(form, f"ContextEntries.member.{index}.ContextKeyValues")
            kind = form.get(f"ContextEntries.member.{index}.ContextKeyType", "string")
            context[name] = values if kind.endswith("List") else values[0]
        requests = [
            iameval.Request(
                f"{a}|{r}",
                principal,
                tuple(self.policies[principal]),
                default_key_policy("aws", principal.split(":")[4]) if a.startswith("kms:") else None,
                a,
                r,
                context,
            )
            for a in actions
            for r in resources
        ]
        results = "".join(
            "<member>"
            f"<EvalActionName>{escape(d.id.split('|')[0])}</EvalActionName>"
            f"<EvalResourceName>{escape(d.id.split('|', 1)[1])}</EvalResourceName>"
            f"<EvalDecision>{DECISIONS[d.decision]}</EvalDecision>"
            "<MatchedStatements/><MissingContextValues/>"
            "</member>"
            for d in iameval.evaluate(requests)
        )
        return 200, (
            f'<SimulatePrincipalPolicyResponse xmlns="{NAMESPACE}"><SimulatePrincipalPolicyResult>'
            f"<IsTruncated>false</IsTruncated><EvaluationResults>{results}</EvaluationResults>"
            "</SimulatePrincipalPolicyResult><ResponseMetadata><RequestId>fake-iam</RequestId></ResponseMetadata>"
            "</SimulatePrincipalPolicyResponse>"
        )


def members(form: Mapping[str, str], name: str) -> list[str]:
    found: list[str] = []
    for index in range(1, 1000):
        value = form.get(f"{name}.member.{index}")
        if value is None:
            return found
        found.append(value)
    return found


def error(code: str, message: str) -> str:
    return (
        f'<ErrorResponse xmlns="{NAMESPACE}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{escape(message)}</Message></Error><RequestId>fake-iam</RequestId></ErrorResponse>"
    )


@contextmanager
def serve_simulator() -> Iterator[FakeSimulator]:
    fake = FakeSimulator()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0)).decode()
            form = {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}
            status, xml = fake.answer(form)
            data = xml.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with loopback_server(Handler) as url:
        fake.url = url
        yield fake
