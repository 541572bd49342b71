"""The benchmark's hit-rate upper bound, on traces small enough to count by hand."""

from __future__ import annotations

import pytest

from kvgate.bench.bound import block_chain, hit_bound

BLOCK = 4


def test_chain_names_whole_prefixes_so_equal_blocks_at_different_depths_differ():
    chain = block_chain([1, 2, 3, 4, 1, 2, 3, 4, 9], BLOCK)

    assert len(chain) == 2  # the ninth token is in no full block
    assert chain[0] != chain[1]
    assert block_chain([1, 2, 3, 4], BLOCK) == chain[:1]
    assert block_chain([0, 2, 3, 4, 1, 2, 3, 4], BLOCK)[1] != chain[1]


def test_hand_counted_trace():
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # blocks A1 A2, 2 tokens left over
    b = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15]  # shares A1 A2, then its own block
    c = [1, 2, 3, 4, 99, 6, 7, 8]  # shares A1 only
    d = [1, 2, 3, 4, 5, 6, 7, 8]  # exactly A1 A2: the last token is recomputed, so A1 only

    bound = hit_bound([a, b, c, d], BLOCK)

    # a: 0 (nothing seen); b: 8; c: 4; d: capped at (8 - 1) // 4 = 1 block = 4.
    assert bound.hit_tokens == 0 + 8 + 4 + 4
    assert bound.prompt_tokens == 10 + 13 + 8 + 8
    assert bound.rate == pytest.approx(16 / 39)


def test_a_conversation_hits_on_its_own_history():
    turn1 = list(range(10))
    turn2 = turn1 + list(range(100, 110))

    bound = hit_bound([turn1, turn2], BLOCK)

    assert bound.hit_tokens == 8  # the two full blocks of turn 1
    assert bound.prompt_tokens == 30


def test_order_matters_first_sight_always_misses():
    short, long = [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9]

    assert hit_bound([short, long], BLOCK).hit_tokens == 4
    assert hit_bound([long, short], BLOCK).hit_tokens == 4
    assert hit_bound([long, long], BLOCK).hit_tokens == 8


@pytest.mark.parametrize(
    ("prompts", "expected"),
    [
        pytest.param([], 0.0, id="empty"),
        pytest.param([[1, 2, 3]], 0.0, id="shorter-than-a-block"),
        pytest.param([[1, 2, 3, 4]] * 3, 0.0, id="one-block-prompts-never-hit"),
        pytest.param([[7] * 9] * 2, 8 / 18, id="repeat"),
    ],
)
def test_edge_cases(prompts, expected):
    assert hit_bound(prompts, BLOCK).rate == pytest.approx(expected)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        hit_bound([[1]], 0)
