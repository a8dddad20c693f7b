from __future__ import annotations

import pytest

from deployer.agent.identity import resolve_instance_id
from deployer.aws.retry import RetryPolicy
from deployer.protocol.errors import IdentityError

NO_WAIT = RetryPolicy(max_attempts=2, base_seconds=0.01, cap_seconds=0.01, deadline_seconds=2)


def test_a_configured_instance_id_wins_and_imds_is_not_asked(closed_port: int) -> None:
    assert resolve_instance_id("i-configured", f"http://127.0.0.1:{closed_port}") == "i-configured"


def test_imdsv2_is_asked_with_a_session_token(fake_imds: str) -> None:
    assert resolve_instance_id(None, fake_imds, NO_WAIT) == "i-0fakeimds000001"


def test_unreachable_metadata_is_a_clear_error(closed_port: int) -> None:
    with pytest.raises(IdentityError, match="cannot reach instance metadata"):
        resolve_instance_id(None, f"http://127.0.0.1:{closed_port}", NO_WAIT)


def test_an_unsafe_instance_id_is_refused() -> None:
    with pytest.raises(IdentityError, match="must be 1-40"):
        resolve_instance_id("i-../../etc", "http://127.0.0.1:1")
