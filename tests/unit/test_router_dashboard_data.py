"""The live page's rates: computed from consecutive samples, with gaps where a pod was absent."""

from __future__ import annotations

import pytest

from router.dashboard.data import RATE_SPAN, _series
from router.dashboard.samples import PodSample, Sample


def pod(queries: float, hits: float, *, external: float = 0.0, predicted: float = 0.0, routed: float = 0.0) -> PodSample:
    return PodSample(
        prefix_queries=queries, prefix_hits=hits, external_queries=queries - hits, external_hits=external,
        cached_by_source={"device": hits, "p2p": external}, predicted=predicted, routed=routed,
        in_flight=0, running=0, waiting=0, healthy=True,
    )


def test_rates_hit_rates_and_tiers_over_the_span():
    samples = [
        Sample(100.0 + i, {"a": pod(100 * i, 60 * i, external=10 * i, predicted=50 * i, routed=100 * i)}, 0)
        for i in range(RATE_SPAN + 2)
    ]
    series = _series(samples)
    assert series["t"] == [s.at for s in samples[1:]]
    # Per second: 60 local hits + 10 external = 70 from cache, 30 computed, whatever the span.
    assert series["saved_tokens_per_s"] == pytest.approx([70.0] * (len(samples) - 1))
    assert series["computed_tokens_per_s"] == pytest.approx([30.0] * (len(samples) - 1))
    assert series["fleet_hit_rate"] == pytest.approx([0.6] * (len(samples) - 1))
    assert series["predicted_hit_rate"] == pytest.approx([0.5] * (len(samples) - 1))
    assert series["cached_tokens_per_s_by_tier"]["GPU"] == pytest.approx([60.0] * (len(samples) - 1))
    assert series["cached_tokens_per_s_by_tier"]["L2"] == pytest.approx([10.0] * (len(samples) - 1))


def test_a_pod_that_joins_late_has_gaps_then_its_own_rate():
    samples = [
        Sample(0.0, {"a": pod(0, 0)}, 0),
        Sample(1.0, {"a": pod(10, 5)}, 0),
        Sample(2.0, {"a": pod(20, 10), "b": pod(0, 0)}, 0),
        Sample(3.0, {"a": pod(30, 15), "b": pod(4, 1)}, 0),
    ]
    by_pod = _series(samples)["hit_rate_by_pod"]
    assert by_pod["a"] == pytest.approx([0.5, 0.5, 0.5])
    # Absent, then first seen (no rate yet), then its rate since it was first seen.
    assert by_pod["b"] == [None, None, 0.25]
    assert len(by_pod["b"]) == len(_series(samples)["t"])
