"""A pod that leaves the table takes its metric series with it (pods come and go under new names)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from router.metrics import GatewayMetrics
from router.outliers import Outliers, Verdict
from router.pods import PodSet
from router.settings import OutlierSettings
from router.shared_tier import TierMetrics


def pod_lines(registry: CollectorRegistry, pod: str) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if f'pod="{pod}"' in line]


def test_a_gone_pods_series_are_dropped_and_the_others_kept():
    pods = PodSet(["http://a", "http://b"])
    metrics = GatewayMetrics()
    outliers = Outliers(pods, OutlierSettings(), metrics.registry)
    tiers = TierMetrics(metrics.registry)
    for pod in ("http://a", "http://b"):
        metrics.record_decision(pod=pod, policy="kv-aware", seconds=1e-4, matched_tokens=16, prompt_tokens=32, in_flight=1)
        metrics.record_outcome(pod, "kv-aware", 200)
        metrics.record_outcome(pod, "kv-aware", 503)
        metrics.retries.labels(pod).inc()
        outliers.report(pods.get(pod), Verdict.BROKEN)
        tiers.predicted.labels(pod, "events").inc(5)
        tiers.loaded.labels(pod).inc(5)
    assert pod_lines(metrics.registry, "http://a")

    metrics.forget_pod("http://a")
    outliers.forget("http://a")
    tiers.forget("http://a")
    pods.remove("http://a")

    assert pod_lines(metrics.registry, "http://a") == []
    kept = "\n".join(pod_lines(metrics.registry, "http://b"))
    for name in ("kvgate_requests_total", "kvgate_pod_in_flight", "kvgate_upstream_retries_total", "kvgate_pod_verdicts_total",
                 "kvgate_shared_tier_predicted_tokens_total", "kvgate_shared_tier_loaded_tokens_total"):
        assert name in kept
    # A pod coming back under the same name starts its series afresh.
    metrics.record_outcome("http://a", "kv-aware", 200)
    assert any("kvgate_requests_total" in line and " 1.0" in line for line in pod_lines(metrics.registry, "http://a"))
