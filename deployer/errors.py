"""The one exception tree. Everything the deployer raises on purpose derives from DeployerError."""

from __future__ import annotations


class DeployerError(Exception):
    """Raised when the deployer cannot do what it was asked; the root of every deployer error."""


class ConfigError(DeployerError):
    """Raised when configuration (file, flags or environment) is missing or invalid."""


class InvalidMessage(DeployerError):
    """Raised when a pointer or deploy message is not a valid protocol document."""


class ManifestError(DeployerError):
    """Raised when a manifest cannot be parsed or fails validation."""


class ArtifactError(DeployerError):
    """Raised when an artifact is unsafe, corrupt or does not match its checksum."""


class FetchError(DeployerError):
    """Raised when a manifest or artifact cannot be downloaded."""


class HookFailed(DeployerError):
    """Raised when a hook command exits non-zero or times out."""

    def __init__(self, message: str, output_tail: str = "") -> None:
        super().__init__(message)
        self.output_tail = output_tail


class HealthCheckFailed(HookFailed):
    """Raised when a release's health check still fails after its last retry."""


class AwsError(DeployerError):
    """Raised when an AWS call fails for a reason retrying will not fix (or retries ran out)."""


class PublishError(DeployerError):
    """Raised when a release cannot be published."""


class ReleaseConflict(PublishError):
    """Raised when a release id already exists in S3 with different content."""


class IdentityError(DeployerError):
    """Raised when the instance identity cannot be determined."""


class LockBusy(DeployerError):
    """Raised when another apply already holds this machine's apply lock."""
