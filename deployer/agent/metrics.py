"""What an agent measures, without an API call: CloudWatch Embedded Metric Format lines in its
JSON log (the CloudWatch agent ships them as metrics), and optionally a Prometheus
node_exporter textfile (`metrics_textfile`), rewritten atomically after each change.

Per component: how long each apply took, how many bytes it downloaded, how many applies ended in
each outcome; per instance: how long from the agent's start to converged at boot. Rendering is
pure (`emf_document`, `prometheus_text`); `Metrics` keeps the counts and writes.
https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html
https://github.com/prometheus/node_exporter#textfile-collector
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from deployer.apply.fsutil import write_atomic

log = structlog.get_logger(__name__)

#: The CloudWatch namespace of every metric the agent emits.
NAMESPACE = "Deployer"
#: EMF allows at most 100 metrics per document and 30 dimensions per set; we use 4 and 3.
DIMENSIONS = ("Stage", "Role", "Component")


def emf_document(dimensions: Mapping[str, str], values: Mapping[str, tuple[float, str]], now_ms: int) -> dict[str, Any]:
    """One EMF root node: `values` is metric name → (value, unit). Pure."""
    return {
        "_aws": {
            "Timestamp": now_ms,
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [[name for name in DIMENSIONS if name in dimensions]],
                    "Metrics": [{"Name": name, "Unit": unit} for name, (_value, unit) in values.items()],
                }
            ],
        },
        **dimensions,
        **{name: value for name, (value, _unit) in values.items()},
    }


@dataclass
class Metrics:
    """The agent's counts; each change is logged as EMF and written to the textfile, if configured."""

    stage: str
    role: str
    textfile: Path | None = None
    started: float = field(default_factory=time.monotonic)
    applies: Counter[tuple[str, str]] = field(default_factory=Counter)
    downloaded: Counter[str] = field(default_factory=Counter)
    last_duration: dict[str, float] = field(default_factory=dict)
    boot_to_converged: float | None = None

    def applied(self, component: str, outcome: str, duration_s: float, downloaded_bytes: int) -> None:
        self.applies[(component, outcome)] += 1
        self.downloaded[component] += downloaded_bytes
        self.last_duration[component] = duration_s
        values = {
            "ApplyDuration": (round(duration_s, 3), "Seconds"),
            "DownloadBytes": (downloaded_bytes, "Bytes"),
            "ApplyFailures": (1 if outcome in ("failed", "unavailable") else 0, "Count"),
            "ApplyRejections": (1 if outcome in ("rejected", "unauthentic") else 0, "Count"),
        }
        self._emit({"Stage": self.stage, "Role": self.role, "Component": component}, values)

    def converged(self) -> None:
        """Boot replay is over: how long the instance took from the agent's start."""
        self.boot_to_converged = time.monotonic() - self.started
        values = {"BootToConverged": (round(self.boot_to_converged, 3), "Seconds")}
        self._emit({"Stage": self.stage, "Role": self.role}, values)

    def _emit(self, dimensions: dict[str, str], values: dict[str, tuple[float, str]]) -> None:
        log.info("metrics", **emf_document(dimensions, values, int(time.time() * 1000)))
        if self.textfile is not None:
            try:
                write_atomic(self.textfile, prometheus_text(self).encode())
            except OSError as exc:  # a metrics file must never fail a deploy
                log.warning(
                    "metrics_textfile_failed",
                    path=str(self.textfile),
                    error=str(exc),
                    next="rewritten at the next change",
                )


def prometheus_text(metrics: Metrics) -> str:
    """The textfile collector's format: HELP, TYPE and samples, labels escaped. Pure."""
    base = f'stage="{_label(metrics.stage)}",role="{_label(metrics.role)}"'
    lines = [
        "# HELP deployer_applies_total Applies this agent finished, by component and outcome.",
        "# TYPE deployer_applies_total counter",
        *(
            f'deployer_applies_total{{{base},component="{_label(c)}",outcome="{_label(o)}"}} {n}'
            for (c, o), n in sorted(metrics.applies.items())
        ),
        "# HELP deployer_download_bytes_total Artifact bytes this agent downloaded, by component.",
        "# TYPE deployer_download_bytes_total counter",
        *(
            f'deployer_download_bytes_total{{{base},component="{_label(c)}"}} {n}'
            for c, n in sorted(metrics.downloaded.items())
        ),
        "# HELP deployer_apply_duration_seconds How long the last apply of each component took.",
        "# TYPE deployer_apply_duration_seconds gauge",
        *(
            f'deployer_apply_duration_seconds{{{base},component="{_label(c)}"}} {s:.3f}'
            for c, s in sorted(metrics.last_duration.items())
        ),
    ]
    if metrics.boot_to_converged is not None:
        lines += [
            "# HELP deployer_boot_to_converged_seconds From the agent's start to converged at boot.",
            "# TYPE deployer_boot_to_converged_seconds gauge",
            f"deployer_boot_to_converged_seconds{{{base}}} {metrics.boot_to_converged:.3f}",
        ]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
