"""What an agent measures: CloudWatch EMF documents and the node_exporter textfile, pure."""

from __future__ import annotations

from deployer.agent.metrics import NAMESPACE, Metrics, emf_document, prometheus_text


def test_an_emf_document_declares_each_metric_and_carries_its_value_beside_the_dimensions() -> None:
    doc = emf_document(
        {"Stage": "prod", "Role": "web", "Component": "api"},
        {"ApplyDuration": (1.5, "Seconds"), "DownloadBytes": (2048, "Bytes")},
        now_ms=1_765_000_000_000,
    )
    assert doc == {
        "_aws": {
            "Timestamp": 1_765_000_000_000,
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [["Stage", "Role", "Component"]],
                    "Metrics": [
                        {"Name": "ApplyDuration", "Unit": "Seconds"},
                        {"Name": "DownloadBytes", "Unit": "Bytes"},
                    ],
                }
            ],
        },
        "Stage": "prod",
        "Role": "web",
        "Component": "api",
        "ApplyDuration": 1.5,
        "DownloadBytes": 2048,
    }


def test_the_textfile_counts_applies_by_outcome_and_escapes_its_labels() -> None:
    metrics = Metrics("prod", 'we"b')
    metrics.applied("api", "applied", 1.25, 4096)
    metrics.applied("api", "failed", 0.5, 0)
    metrics.applied("api", "applied", 0.75, 0)
    text = prometheus_text(metrics)
    assert 'deployer_applies_total{stage="prod",role="we\\"b",component="api",outcome="applied"} 2' in text
    assert 'deployer_applies_total{stage="prod",role="we\\"b",component="api",outcome="failed"} 1' in text
    assert 'deployer_download_bytes_total{stage="prod",role="we\\"b",component="api"} 4096' in text
    assert 'deployer_apply_duration_seconds{stage="prod",role="we\\"b",component="api"} 0.750' in text
    assert "deployer_boot_to_converged_seconds" not in text
    metrics.converged()
    assert "# TYPE deployer_boot_to_converged_seconds gauge" in prometheus_text(metrics)
    assert text.endswith("\n")
