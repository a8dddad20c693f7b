"""Secrets a manifest names, read at apply time with the instance role: SSM parameters and
Secrets Manager secrets. Values go back to the caller only; every error names the secret, never
its value (an AWS error message never carries one either).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployer.aws.clients import secretsmanager_client, ssm_client
from deployer.aws.retry import DEFAULT_POLICY, RetryPolicy
from deployer.protocol.errors import AwsError, SecretUnavailable
from deployer.protocol.manifest import SecretRef, SecretSource

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from mypy_boto3_ssm import SSMClient

#: GetParameters takes at most 10 names per call.
#: https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_GetParameters.html
MAX_PARAMETERS_PER_CALL = 10


@dataclass
class SecretReader:
    """Reads the secrets of one manifest; its clients are made on first use (most agents never need them)."""

    region: str | None
    endpoint_url: str | None
    policy: RetryPolicy = DEFAULT_POLICY
    _ssm: SSMClient | None = field(default=None, repr=False)
    _secretsmanager: SecretsManagerClient | None = field(default=None, repr=False)

    def __call__(self, refs: Mapping[str, SecretRef]) -> dict[str, str]:
        """Each variable's value. Raises SecretUnavailable naming what could not be read."""
        values: dict[str, str] = {}
        by_parameter = {ref.name: variable for variable, ref in refs.items() if ref.source is SecretSource.SSM}
        names = sorted(by_parameter)
        for start in range(0, len(names), MAX_PARAMETERS_PER_CALL):
            found = self._parameters(names[start : start + MAX_PARAMETERS_PER_CALL])
            for name, value in found.items():
                values[by_parameter[name]] = value
        for variable, ref in refs.items():
            if ref.source is SecretSource.SECRETS_MANAGER:
                values[variable] = self._secret(ref)
        return values

    def _parameters(self, names: list[str]) -> dict[str, str]:
        if self._ssm is None:
            self._ssm = ssm_client(self.region, self.endpoint_url)
        try:
            found = self.policy.call(self._ssm.get_parameters, Names=names, WithDecryption=True)
        except AwsError as exc:
            raise SecretUnavailable(f"cannot read SSM parameter(s) {', '.join(names)}: {exc.code or exc}") from None
        missing = found.get("InvalidParameters", [])
        if missing:
            raise SecretUnavailable(f"SSM parameter(s) {', '.join(missing)} do not exist")
        return {str(p["Name"]): str(p["Value"]) for p in found["Parameters"]}

    def _secret(self, ref: SecretRef) -> str:
        if self._secretsmanager is None:
            self._secretsmanager = secretsmanager_client(self.region, self.endpoint_url)
        try:
            found: Any = self.policy.call(self._secretsmanager.get_secret_value, SecretId=ref.name)
        except AwsError as exc:
            raise SecretUnavailable(f"cannot read secret {ref.name}: {exc.code or exc}") from None
        text = found.get("SecretString")
        if not isinstance(text, str):
            raise SecretUnavailable(
                f"secret {ref.name} has no SecretString (a binary secret cannot be an environment value)"
            )
        if ref.key is None:
            return text
        try:
            value = json.loads(text)[ref.key]
        except (ValueError, KeyError, TypeError):
            raise SecretUnavailable(f"secret {ref.name} is not a JSON object with the key {ref.key!r}") from None
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise SecretUnavailable(f"secret {ref.name} key {ref.key!r} is not a string or number")
        return str(value)
