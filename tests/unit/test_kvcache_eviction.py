"""Eviction policies: order of victims, and what each keeps that the other loses."""

from __future__ import annotations

import pytest

from kvcache.errors import ConfigError
from kvcache.eviction import POLICIES, make_policy
from kvcache.keys import BlockKey
from kvcache.tiers.local import LocalTier


def k(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(32, "big"))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_evicts_each_resident_key_once(name: str) -> None:
    policy = make_policy(name, 10_000)
    for i in range(10):
        policy.insert(k(i), 1000)
    policy.hit(k(3))
    policy.remove(k(5))
    victims = [policy.evict() for _ in range(9)]
    assert sorted(victims) == sorted(k(i) for i in range(10) if i != 5)  # type: ignore[type-var]
    assert policy.evict() is None
    assert len(policy) == 0


def test_lru_evicts_the_least_recently_used() -> None:
    policy = make_policy("lru", 0)
    for i in range(3):
        policy.insert(k(i), 1)
    policy.hit(k(0))
    assert [policy.evict() for _ in range(3)] == [k(1), k(2), k(0)]


def test_s3fifo_keeps_a_reused_block_through_a_scan_of_one_time_blocks() -> None:
    """A block read twice survives a long run of blocks never read again; LRU loses it."""
    survivors = {}
    for name in ("lru", "s3fifo"):
        tier = LocalTier(100 * 1000, policy=name, verify_reads=False)
        hot = k(10_000)
        tier.put_frame(hot, b"h" * 1000)
        tier.get_frame(hot)
        for i in range(450):  # 4.5 budgets of one-time blocks; the hot one is read every 1.5
            tier.put_frame(k(i), b"c" * 1000)
            if i % 150 == 149:
                tier.get_frame(hot)
        survivors[name] = hot in tier
    assert survivors == {"lru": False, "s3fifo": True}


def test_lru_keeps_a_fresh_history_that_s3fifo_puts_on_probation() -> None:
    """A chat's history is written once and re-read at the next turn: recency wins."""
    survivors = {}
    for name in ("lru", "s3fifo"):
        tier = LocalTier(100 * 1000, policy=name, verify_reads=False)
        for i in range(95):  # blocks read before: S3-FIFO's main queue
            tier.put_frame(k(i), b"o" * 1000)
            tier.get_frame(k(i))
        history = [k(10_000 + i) for i in range(20)]
        for key in history:
            tier.put_frame(key, b"h" * 1000)
        for i in range(5):
            tier.put_frame(k(20_000 + i), b"c" * 1000)
        survivors[name] = all(key in tier for key in history)
    assert survivors == {"lru": True, "s3fifo": False}


def test_a_ghost_hit_goes_straight_to_the_main_queue() -> None:
    policy = make_policy("s3fifo", 10_000)  # small queue: 1,000 bytes
    policy.insert(k(1), 1000)
    policy.insert(k(2), 1000)
    assert policy.evict() == k(1)  # never read: out of the small queue, into the ghost list
    policy.insert(k(1), 1000)  # back soon: main queue
    policy.insert(k(3), 1000)
    assert policy.evict() == k(2)
    assert policy.evict() == k(3)
    assert policy.evict() == k(1)


def test_the_local_tier_never_exceeds_its_budget() -> None:
    tier = LocalTier(10_000)
    for i in range(100):
        assert tier.put_frame(k(i), bytes(700 + i))
        assert tier.used_bytes <= 10_000
    assert not tier.put_frame(k(1000), bytes(10_001)), "a frame larger than the budget is refused"


def test_an_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        make_policy("clock", 1)
