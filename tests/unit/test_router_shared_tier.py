"""The router's belief of what the shared KV cache holds, and how its accuracy is counted."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from kvcache.keys import chain_hashes
from router.errors import StartupError
from router.pods import EngineStats, Pod, PodId
from router.settings import Settings
from router.shared_tier import DECISIONS, EVENTS, FEED_MASKS, SharedTier, TierMetrics
from router.startup import check_settings

BLOCK = 4


def hashes(seed: int, blocks: int) -> list:
    return chain_hashes([seed * 1000 + i for i in range(blocks * BLOCK)], BLOCK)


def always(pod: Pod) -> bool:
    return True


@pytest.mark.parametrize(
    ("feed", "confirmed", "predicted", "expected"),
    [
        pytest.param("events", 6, 0, 6, id="events-count-confirmed"),
        pytest.param("events", 0, 6, 0, id="events-ignore-predicted"),
        pytest.param("decisions", 0, 6, 6, id="decisions-count-predicted"),
        pytest.param("decisions", 6, 0, 0, id="decisions-ignore-confirmed"),
        pytest.param("both", 3, 6, 6, id="both-count-either"),
    ],
)
def test_the_feed_chooses_which_sources_count(feed, confirmed, predicted, expected):
    chain = hashes(1, 8)
    tier = SharedTier(feed=feed)
    tier.confirm(chain[:confirmed])
    tier.predict(chain[:predicted])

    assert tier.run(chain, 0, 8) == expected


def test_a_run_stops_at_the_first_block_not_held():
    chain = hashes(1, 8)
    tier = SharedTier()
    tier.confirm(chain[:3] + chain[4:])

    assert tier.run(chain, 0, 8) == 3
    assert tier.run(chain, 4, 8) == 4
    assert tier.run(chain, 4, 6) == 2


def test_the_belief_forgets_the_least_recently_stored_blocks_beyond_its_capacity():
    old, new = hashes(1, 4), hashes(2, 4)
    tier = SharedTier(capacity_blocks=6)
    tier.confirm(old)
    tier.confirm(new)

    assert len(tier) == 6
    assert tier.run(old, 0, 4) == 0, "the oldest blocks went first"
    assert tier.run(new, 0, 4) == 4


def test_storing_a_block_again_refreshes_it():
    old, new = hashes(1, 2), hashes(2, 4)
    tier = SharedTier(capacity_blocks=6)
    tier.confirm(old)
    tier.confirm(new[:2])
    tier.confirm(old)  # stored again by another engine
    tier.confirm(new[2:])

    assert tier.run(old, 0, 2) == 2


@pytest.mark.parametrize(
    ("prompt_tokens", "start", "expected"),
    [
        pytest.param(8 * BLOCK + 1, 0, 8, id="every-full-block"),
        pytest.param(8 * BLOCK, 0, 7, id="not-the-block-of-the-last-token"),
        pytest.param(8 * BLOCK + 1, 5, 3, id="after-the-gpu-hit"),
        pytest.param(8 * BLOCK + 1, 8, 0, id="gpu-holds-all"),
        pytest.param(2, 0, 0, id="shorter-than-a-block"),
    ],
)
def test_a_request_loads_the_held_blocks_after_the_gpu_hit_but_not_the_last_tokens_block(prompt_tokens, start, expected):
    chain = hashes(1, 8)
    tier = SharedTier()
    tier.confirm(chain)

    match = tier.match(chain[: prompt_tokens // BLOCK], prompt_tokens, BLOCK, 0.1, always)

    assert match.loadable(start) == expected


def test_the_floor_is_the_least_work_of_a_pod_holding_nothing():
    chain = hashes(1, 8)
    tier = SharedTier()
    tier.confirm(chain[:5])
    prompt = 8 * BLOCK + 1

    assert tier.match(chain, prompt, BLOCK, 0.1, always).floor(prompt) == pytest.approx(prompt - 0.9 * 5 * BLOCK)
    assert tier.match(chain, prompt, BLOCK, 3.0, always).floor(prompt) == prompt, "never above a prefill"


def test_the_metrics_count_each_feeds_prediction_and_the_engines_loads():
    registry = CollectorRegistry()
    metrics = TierMetrics(registry)
    chain = hashes(1, 8)
    tier = SharedTier()
    tier.confirm(chain[:2])
    tier.predict(chain[:6])
    prompt = 8 * BLOCK + 1
    match = tier.match(chain, prompt, BLOCK, 0.1, always)

    metrics.routed(PodId("p"), match, 1, prompt - BLOCK)
    metrics.scraped(PodId("p"), EngineStats(external_hits=10.0), EngineStats(external_hits=30.0))

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    assert value("kvgate_shared_tier_predicted_tokens_total", pod="p", feed="events") == 1 * BLOCK
    assert value("kvgate_shared_tier_predicted_tokens_total", pod="p", feed="decisions") == 5 * BLOCK
    assert value("kvgate_shared_tier_predicted_tokens_total", pod="p", feed="both") == 5 * BLOCK
    assert value("kvgate_shared_tier_loaded_tokens_total", pod="p") == 20.0


def test_feed_masks_are_distinct_bits():
    assert FEED_MASKS == {"events": EVENTS, "decisions": DECISIONS, "both": EVENTS | DECISIONS}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        pytest.param("mode", "sometimes", "shared_tier.mode", id="unknown-mode"),
        pytest.param("feed", "gossip", "shared_tier.feed", id="unknown-feed"),
        pytest.param("capacity_blocks", -1, "shared_tier.capacity_blocks", id="negative-capacity"),
        pytest.param("load_ratio_prior", 0.0, "shared_tier.load_ratio_prior", id="free-loads"),
    ],
)
def test_start_up_refuses_shared_tier_settings_that_cannot_work(name, value, message):
    settings = Settings()
    setattr(settings.shared_tier, name, value)

    with pytest.raises(StartupError, match=message):
        check_settings(settings)


def test_the_belief_refuses_a_feed_or_mode_it_does_not_know():
    from router.settings import SettingsError
    from router.shared_tier import SharedCacheUse

    with pytest.raises(SettingsError, match="shared_tier.feed"):
        SharedTier(16, "rumours")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="shared_tier.mode"):
        SharedCacheUse("sometimes")  # type: ignore[arg-type]
