"""The load-cost ratio learned from engines' prefill time and token counters."""

from __future__ import annotations

import random

import pytest

from router.load_cost import MAX_RATIO, MIN_RATIO, LoadCostEstimator
from router.pods import EngineStats, PodId


class FakeEngine:
    """Cumulative counters of one engine whose prefill takes `per_token` s per computed token, `per_load` per loaded one."""

    def __init__(self, per_token: float, per_load: float, overhead: float = 0.002, noise: float = 0.0, seed: int = 0) -> None:
        self.per_token, self.per_load, self.overhead, self.noise = per_token, per_load, overhead, noise
        self.rng = random.Random(seed)
        self.stats = EngineStats()

    def serve(self, computed: int, loaded: int, *, busy: bool = False) -> tuple[EngineStats, EngineStats]:
        seconds = self.overhead + computed * self.per_token + loaded * self.per_load
        seconds *= 1 + self.rng.uniform(-self.noise, self.noise)
        before = self.stats
        self.stats = EngineStats(
            running=1 if busy else 0,
            computed_tokens=before.computed_tokens + computed,
            external_hits=before.external_hits + loaded,
            prefill_seconds=before.prefill_seconds + seconds,
            prefill_requests=before.prefill_requests + 1,
        )
        return before, self.stats


def test_before_any_figure_the_ratio_is_the_prior():
    assert LoadCostEstimator(0.1).ratio == 0.1
    assert LoadCostEstimator(50.0).ratio == MAX_RATIO
    assert LoadCostEstimator(0.0).ratio == MIN_RATIO


@pytest.mark.parametrize(
    ("true_ratio", "noise"),
    [
        pytest.param(0.1, 0.0, id="cpu-l2-exact"),
        pytest.param(0.1, 0.2, id="cpu-l2-noisy"),
        pytest.param(0.4, 0.2, id="slow-network"),
        pytest.param(0.03, 0.1, id="fast-local-tier"),
    ],
)
def test_the_ratio_converges_to_the_engines_own(true_ratio, noise):
    engine = FakeEngine(per_token=4e-4, per_load=4e-4 * true_ratio, noise=noise, seed=1)
    estimator = LoadCostEstimator(prior_ratio=0.5)
    rng = random.Random(2)
    for _ in range(300):
        computed, loaded = rng.choice([(3000, 0), (200, 2800), (1000, 1000), (64, 0), (100, 3900)])
        estimator.observe(PodId("a"), *engine.serve(computed, loaded))

    assert estimator.ratio == pytest.approx(true_ratio, rel=0.25, abs=0.02)


def test_without_any_load_the_ratio_stays_near_the_prior():
    engine = FakeEngine(per_token=4e-4, per_load=0.0)
    estimator = LoadCostEstimator(prior_ratio=0.1)
    for computed in [3000, 500, 1200] * 20:
        estimator.observe(PodId("a"), *engine.serve(computed, 0))

    assert estimator.ratio == pytest.approx(0.1, rel=0.2)


def test_a_window_on_a_busy_engine_waits_for_enough_prefills():
    engine = FakeEngine(per_token=4e-4, per_load=4e-5)
    estimator = LoadCostEstimator(window_requests=4)
    for _ in range(3):
        estimator.observe(PodId("a"), *engine.serve(1000, 1000, busy=True))
    assert estimator.observations == 0, "the engine never idled and fewer than 4 prefills finished"
    estimator.observe(PodId("a"), *engine.serve(1000, 1000, busy=True))
    assert estimator.observations == 1


def test_counters_going_backwards_discard_the_open_window():
    engine = FakeEngine(per_token=4e-4, per_load=4e-5)
    estimator = LoadCostEstimator(window_requests=2)
    estimator.observe(PodId("a"), *engine.serve(1000, 0, busy=True))
    restarted = EngineStats(running=1)
    estimator.observe(PodId("a"), engine.stats, restarted)
    engine.stats = restarted
    estimator.observe(PodId("a"), *engine.serve(1000, 0, busy=True))

    assert estimator.observations == 0


def test_windows_are_per_pod_and_the_fit_is_pooled():
    a, b = FakeEngine(4e-4, 4e-5, seed=1), FakeEngine(4e-4, 4e-5, seed=2)
    estimator = LoadCostEstimator(prior_ratio=0.5)
    for _ in range(100):
        estimator.observe(PodId("a"), *a.serve(3000, 0))
        estimator.observe(PodId("a"), *a.serve(500, 0))
        estimator.observe(PodId("b"), *b.serve(100, 2900))

    assert estimator.observations == 300
    assert estimator.ratio == pytest.approx(0.1, rel=0.2)


def test_a_per_request_overhead_prices_loads_higher_never_lower():
    # A loaded machine: 11.5 s to compute 2,500 tokens, 0.3 s of overhead per request, loads nearly free.
    engine = FakeEngine(per_token=4.5e-3, per_load=1e-4, overhead=0.3, noise=0.1, seed=3)
    estimator = LoadCostEstimator(prior_ratio=0.1)
    for _ in range(40):
        for computed, loaded in [(2500, 0), (68, 2432), (300, 900)]:
            estimator.observe(PodId("a"), *engine.serve(computed, loaded))

    assert 1e-4 / 4.5e-3 < estimator.ratio < 0.15
