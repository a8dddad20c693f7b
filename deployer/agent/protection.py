"""Scale-in protection while a deploy runs (opt-in: `scale_in_protection`).

An apply cut by scale-in is crash-safe, but it is still work lost and a report that says
`applying` for an instance that is gone. With `scale_in_protection: true` the agent sets
`ProtectedFromScaleIn` on its instance before an apply starts and clears it once the apply
ended, whatever the outcome. It is never left on by a crash: `protection.json` in the state
directory is written (fsync'd) before the protection is set and removed after it is cleared, and
the next start clears a protection the marker says this agent set. A protection an operator set
by hand is never touched: without the marker, nothing is cleared.

Failures to set or clear are logged and never fail a deploy: without protection an instance is
exactly as exposed to scale-in as it was before this option.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from deployer.apply.fsutil import write_atomic
from deployer.aws.autoscaling import find_asg, set_protection
from deployer.aws.retry import RetryPolicy

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient

log = structlog.get_logger(__name__)

MARKER_NAME = "protection.json"


@dataclass
class ScaleInProtection:
    autoscaling: AutoScalingClient
    instance_id: str
    state_dir: Path
    policy: RetryPolicy
    asg_name: str | None = None

    @property
    def marker(self) -> Path:
        return self.state_dir / MARKER_NAME

    @contextmanager
    def during_apply(self) -> Iterator[None]:
        """Protected for the block (best effort); cleared after it, whatever happened in it."""
        protected = self._set(True)
        try:
            yield
        finally:
            if protected:
                self._set(False)

    def recover(self) -> None:
        """At start: clear a protection a killed agent left on (the marker says it set it)."""
        if self.marker.exists():
            log.warning("scale_in_protection_left_on", next="clearing it: the apply it guarded is over")
            self._set(False)

    def _set(self, protected: bool) -> bool:
        try:
            group = self.asg_name or find_asg(self.autoscaling, self.instance_id, self.policy)
            if group is None:
                log.warning("scale_in_protection_no_group", next="applying without protection")
                return False
            self.asg_name = group
            if protected:
                write_atomic(self.marker, json.dumps({"asg": group, "instance_id": self.instance_id}).encode())
            set_protection(
                self.autoscaling, asg=group, instance_id=self.instance_id, protected=protected, policy=self.policy
            )
        except Exception as exc:  # noqa: BLE001 - protection is a convenience, never a reason to fail a deploy
            log.warning(
                "scale_in_protection_failed",
                protected=protected,
                error=f"{type(exc).__name__}: {exc}",
                next="applying without protection" if protected else "cleared at the next apply or start",
            )
            return False
        if not protected:
            self.marker.unlink(missing_ok=True)
        log.info("scale_in_protection", protected=protected, asg=group)
        return True
