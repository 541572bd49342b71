"""The modelled engine caches of a placement replay: vLLM's block pool order, on a run's own timeline."""

from __future__ import annotations

from kvgate.bench.lru_replay import Placed, cache_aware, partitioned, pinned, replay

BS = 4  # tokens per block


def req(user: str, chain: tuple[int, ...], engine: int, sent: float, done: float, *, extra: int = 1) -> Placed:
    """A prompt of `len(chain)` full blocks plus `extra` tokens, generating one token."""
    return Placed(user, chain, len(chain) * BS + extra, 1, engine, sent, done)


def test_a_prefix_hits_on_the_engine_that_computed_it_and_only_there():
    first = req("a", (1, 2, 3), 0, 0.0, 1.0)
    same = req("a", (1, 2, 9), 0, 2.0, 3.0)
    other = req("a", (1, 2, 9), 1, 2.0, 3.0)

    assert replay([first, same], engines=2, kv_blocks=20, block_size=BS).hit_tokens == 2 * BS
    assert replay([first, other], engines=2, kv_blocks=20, block_size=BS).hit_tokens == 0


def test_the_last_token_is_always_computed():
    exact = Placed("a", (1, 2), 2 * BS, 1, 0, 0.0, 1.0)  # the prompt is exactly two blocks

    result = replay([exact, exact], engines=1, kv_blocks=20, block_size=BS)

    assert result.hit_tokens == 1 * BS


def test_the_least_recently_freed_blocks_are_evicted_first():
    # 6 usable blocks; every request takes 3 (2 prompt blocks, 1 for the rest).
    a = req("a", (1, 2), 0, 0.0, 1.0)
    b = req("b", (3, 4), 0, 2.0, 3.0)
    c = req("c", (5, 6), 0, 4.0, 5.0)  # evicts a's
    a_again = req("a", (1, 2), 0, 6.0, 7.0)
    b_again = req("b", (3, 4), 0, 6.0, 7.0)

    without_a = replay([a, b, c, b_again], engines=1, kv_blocks=7, block_size=BS)
    with_a = replay([a, b, c, a_again], engines=1, kv_blocks=7, block_size=BS)

    assert without_a.hit_tokens == 2 * BS  # b's prefix survived c
    assert with_a.hit_tokens == 0  # a's did not


def test_a_request_s_last_blocks_go_first():
    # 5 usable blocks: a holds 4 (3 prompt, 1 more); then b needs 2 and finds 1 never used, so evicts one of a's.
    a = req("a", (1, 2, 3), 0, 0.0, 1.0)
    b = req("b", (), 0, 2.0, 3.0, extra=5)  # 2 blocks, nothing cached
    a_again = req("a", (1, 2, 3), 0, 4.0, 5.0)

    result = replay([a, b, a_again], engines=1, kv_blocks=6, block_size=BS)

    assert result.hit_tokens == 3 * BS  # the evicted block was a's partial one, not its prefix


def test_blocks_in_use_are_never_evicted_and_a_short_pool_is_counted():
    long_running = req("a", (1, 2), 0, 0.0, 10.0)
    crowding = req("b", (3, 4, 5, 6), 0, 1.0, 2.0)  # needs 5, finds 3 free
    again = req("c", (1, 2), 0, 3.0, 4.0)

    result = replay([long_running, crowding, again], engines=1, kv_blocks=7, block_size=BS)

    assert result.overcommitted == 1
    assert result.hit_tokens == 2 * BS


def test_pinned_keeps_each_user_on_its_first_engine():
    requests = [req("a", (1,), 2, 0.0, 1.0), req("b", (2,), 0, 0.5, 1.0), req("a", (1,), 1, 2.0, 3.0)]

    assert [r.engine for r in pinned(requests)] == [2, 0, 2]


def test_cache_aware_follows_a_long_match_and_sends_the_rest_to_the_least_routed_engine():
    requests = [
        req("a", (1, 2, 3, 4), 0, 0.0, 1.0),  # nothing routed yet: engine 0
        req("b", (5, 6), 0, 1.0, 2.0),  # no match: the engine with fewer blocks routed, 1
        req("a", (1, 2, 3, 9), 0, 2.0, 3.0),  # 3 of 4 blocks match on 0
        req("c", (1, 7, 8, 10), 0, 3.0, 4.0),  # 1 of 4 on 0: not enough; 1 has fewer blocks
    ]

    assert [r.engine for r in cache_aware(requests, engines=2)] == [0, 1, 0, 1]


def test_partitioned_puts_users_sending_once_with_the_busiest_and_deals_the_rest():
    requests = [
        req("hot", (1,), 2, 0.0, 1.0),
        req("once-a", (2,), 1, 0.5, 1.0),
        req("warm", (3,), 0, 1.0, 2.0),
        req("hot", (1,), 1, 1.5, 2.0),
        req("cool", (4,), 0, 2.0, 3.0),
        req("warm", (3,), 0, 2.5, 3.0),
        req("hot", (1,), 0, 3.0, 4.0),
        req("cool", (4,), 0, 3.5, 4.0),
        req("rare", (5,), 0, 4.0, 5.0),
        req("rare", (5,), 0, 4.5, 5.0),
    ]

    engines = [r.engine for r in partitioned(requests, engines=3)]

    # hot (3 requests) and once-a on 0; cool, rare, warm (2 each, in name order) dealt over 1, 2, 1.
    assert engines == [0, 0, 1, 0, 1, 1, 0, 1, 2, 2]


def test_partitioned_keeps_prompts_sent_once_away_from_rare_prefixes_in_the_model():
    """The churn of one-offs evicts a rarely sent prefix that shares an engine with it, not one kept apart."""
    rare_first = req("rare", (1, 2), 0, 0.0, 1.0)
    churn = [req(f"once-{k}", (10 + 2 * k, 11 + 2 * k), 0, 1.0 + k, 1.5 + k) for k in range(3)]
    hot = [req("hot", (90, 91), 0, 0.2 + k, 0.4 + k) for k in range(5)]
    rare_again = req("rare", (1, 2), 0, 6.0, 7.0)
    requests = [rare_first, *churn, *hot, rare_again]

    together = replay(requests, engines=2, kv_blocks=9, block_size=BS)
    apart = replay(partitioned(requests, engines=2), engines=2, kv_blocks=9, block_size=BS)

    assert together.hit_tokens == 4 * 2 * BS  # the hot prefix hits every time, touched more often than churned out
    assert apart.hit_tokens == together.hit_tokens + 2 * BS  # and now the rare prefix's second request hits too
