"""The one exception tree. Everything the deployer raises on purpose derives from DeployerError.

The intermediate bases say what happens next, so that question is answered once, by type
(docs/design.md, "Errors and what happens next"):

- `RejectedInput`: the input can never succeed, however often it is retried. The deploy is
  recorded `rejected`, its message goes to the DLQ at once, reconcile never tries it again.
- `InfrastructureError`: the network or AWS failed, not the release. The call was already
  retried by the one retry policy; the deploy is retried later and the failure is never
  counted against the release.
- `ReleaseFailed`: the release itself failed on this machine (a hook, the health check, the
  activation). The previous release stays (or is re-activated); the deploy is retried with
  backoff and each failure counts, up to `max_receive_count`, then the DLQ.
- `Interrupted`: a shutdown was requested while waiting; nothing is decided about the
  release, the message is handed back and the restarted agent resumes.
"""

from __future__ import annotations


class DeployerError(Exception):
    """Raised when the deployer cannot do what it was asked; the root of every deployer error."""


class ConfigError(DeployerError):
    """Raised when configuration (file, flags or environment) is missing or invalid."""


class IdentityError(DeployerError):
    """Raised when the instance identity cannot be determined."""


# -- input that can never succeed ------------------------------------------------------------


class RejectedInput(DeployerError):
    """Raised when input can never succeed, however often it is retried (reject, dead-letter)."""


class InvalidMessage(RejectedInput):
    """Raised when a pointer or deploy message is not a valid protocol document."""


class Unauthentic(RejectedInput):
    """Raised when a deploy is not, byte for byte, what CI wrote to its channel's history: forged or replayed."""


class InvalidTrust(RejectedInput):
    """Raised when a trust document is malformed, or a trust update is not signed by the keys of
    the version already held: it is refused, and the trust held stays in force."""


class InvalidReport(DeployerError):
    """Raised when a status report is not a valid report document (readers show it as unreadable)."""


class ManifestError(RejectedInput):
    """Raised when a manifest cannot be parsed or fails validation."""


class ArtifactError(RejectedInput):
    """Raised when an artifact is unsafe, corrupt or does not match its checksum."""


# -- the network or AWS failed, not the release ----------------------------------------------


class InfrastructureError(DeployerError):
    """Raised when the network or AWS failed, not the release: retried later, never counted against it."""


class FetchError(InfrastructureError):
    """Raised when a manifest or artifact cannot be downloaded."""


class TransientFetchError(FetchError):
    """Raised when a download failed in a way that may succeed on an immediate retry (5xx, reset, timeout)."""


class IncompleteAnswer(InfrastructureError):
    """Raised when an answer arrived cut short (fewer bytes than announced, an empty body, a field
    the call always returns missing): the network's doing, retried like a reset."""


class AwsError(InfrastructureError):
    """Raised when an AWS call failed for a reason retrying will not fix, or its retries ran out.

    `code` is AWS's error code ("" for a transport failure) and `status` the HTTP status (0 if none).
    """

    def __init__(self, message: str, *, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class PreconditionFailed(AwsError):
    """Raised when a conditional S3 write lost a race (HTTP 412 or 409); the caller re-reads and retries."""


class QueueMissing(InfrastructureError):
    """Raised when this instance's queue no longer exists (gc after a missed heartbeat, an
    operator, a script): the agent re-creates queue, DLQ and subscription, then reconciles."""


class LockBusy(InfrastructureError):
    """Raised when another apply held this machine's apply lock for longer than we wait: the
    machine was busy, which says nothing about the release (retried later, never counted)."""


class TrafficUnavailable(InfrastructureError):
    """Raised when the load balancer could not be told to stop (or resume) sending this instance
    requests: a target group that does not exist, a deregistration that never took effect. The
    release was not touched and the instance is registered again; retried later, never counted.
    The message starts with its report code (`target_group_not_found`, `traffic_drain_timeout`)."""


class SecretUnavailable(InfrastructureError):
    """Raised when a secret a manifest names cannot be read (missing, denied, throttled): the
    release was not touched, and the message names the secret, never a value. Retried later."""


# -- the release failed on this machine ------------------------------------------------------


class ReleaseFailed(DeployerError):
    """Raised when the release itself failed on this machine: rolled back, retried with backoff, counted."""


class HookFailed(ReleaseFailed):
    """Raised when a hook command exits non-zero or times out."""

    def __init__(self, message: str, output_tail: str = "") -> None:
        super().__init__(message)
        self.output_tail = output_tail


class HealthCheckFailed(HookFailed):
    """Raised when a release's health check still fails after its last retry."""


class TargetUnhealthy(HealthCheckFailed):
    """Raised when the new release, registered again, is not `healthy` by the load balancer's own
    checks in time: rolled back like any failed health check, and counted. The message starts
    with its report code (`register_unhealthy`)."""


class ActivationFailed(ReleaseFailed):
    """Raised when a verified release cannot be put in place (dest in the way, rsync failed)."""


# -- waiting ---------------------------------------------------------------------------------


class Interrupted(DeployerError):
    """Raised when a shutdown was requested during a wait; nothing is decided about the release."""


# -- the CI side -----------------------------------------------------------------------------


class PublishError(DeployerError):
    """Raised when a release cannot be published."""


class ReleaseConflict(PublishError):
    """Raised when a release id already exists in S3 with different content."""
