"""Instance identity from IMDSv2, behind a configurable endpoint (tests fake it on 127.0.0.1)."""

from __future__ import annotations

import urllib.error
import urllib.request

from deployer.aws.retry import RetryPolicy
from deployer.protocol.errors import IdentityError
from deployer.protocol.names import INSTANCE_ID_PATTERN, ZONE_PATTERN

#: IMDSv2 session token lifetime; we only need it for one lookup.
TOKEN_TTL_SECONDS = 60
#: IMDS answers in milliseconds on EC2; anything slower means we are not on EC2.
IMDS_TIMEOUT_SECONDS = 2.0
IMDS_POLICY = RetryPolicy(max_attempts=3, base_seconds=0.2, cap_seconds=1.0, deadline_seconds=10.0)


def resolve_instance_id(configured: str | None, endpoint: str, policy: RetryPolicy = IMDS_POLICY) -> str:
    """The configured id if set, else IMDSv2's instance-id."""
    if configured:
        instance_id = configured
    else:
        try:
            instance_id = policy.call(_imds_instance_id, endpoint.rstrip("/"))
        except OSError as exc:  # URLError, refused, timeout: IMDS is not there
            raise IdentityError(
                f"cannot reach instance metadata at {endpoint} ({exc}); set instance_id in the config"
            ) from None
    if not INSTANCE_ID_PATTERN.match(instance_id):
        raise IdentityError(f"instance id {instance_id!r} must be 1-40 letters, digits, '-' or '_'")
    return instance_id


def resolve_zone(configured: str | None, instance_id: str | None, endpoint: str) -> str | None:
    """The configured zone if set; else, when the instance id also comes from IMDS (on EC2),
    IMDSv2's `placement/availability-zone`. None when nobody says: the instance then joins the
    last of a rollout's zonal waves. A configured instance id means "not EC2's", so IMDS is not asked."""
    if configured:
        return configured
    if instance_id:
        return None
    try:
        found = imds_get(endpoint, "placement/availability-zone")
    except OSError:  # HTTPError is one: IMDS unreachable or refusing
        return None
    return found if found and ZONE_PATTERN.match(found) else None


def _imds_instance_id(endpoint: str) -> str:
    try:
        found = imds_get(endpoint, "instance-id")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise
        raise IdentityError(
            f"instance metadata at {endpoint} answered HTTP {exc.code}; set instance_id in the config"
        ) from None
    if found is None:
        raise IdentityError(f"instance metadata at {endpoint} has no instance-id; set instance_id in the config")
    return found


def imds_get(endpoint: str, path: str) -> str | None:
    """One IMDSv2 lookup (a token PUT, then the GET of `meta-data/<path>`); None for a 404 (not
    there, as `autoscaling/target-lifecycle-state` outside Auto Scaling). Other HTTP errors and
    network failures raise (OSError, HTTPError)."""
    endpoint = endpoint.rstrip("/")
    token_request = urllib.request.Request(
        f"{endpoint}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
    )
    with urllib.request.urlopen(token_request, timeout=IMDS_TIMEOUT_SECONDS) as response:
        token = response.read().decode()
    request = urllib.request.Request(f"{endpoint}/latest/meta-data/{path}", headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(request, timeout=IMDS_TIMEOUT_SECONDS) as response:
            return str(response.read().decode().strip())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
