"""The prefix index: which pod holds which leading blocks, forgotten as the engine's KV capacity would."""

from __future__ import annotations

import tracemalloc

import pytest

from kvcache.keys import chain_hashes
from router.index import PrefixIndex
from router.pods import PodId

A, B, C = PodId("http://pod-a:8000"), PodId("http://pod-b:8000"), PodId("http://pod-c:8000")


def chain(text: str):
    """One block per character, so 'ABCD' is a four-block prompt and 'ABXY' shares its first two."""
    return chain_hashes([ord(ch) for ch in text], 1)


def test_empty_index_matches_nothing():
    assert PrefixIndex().match(chain("ABCD")) == {}
    assert PrefixIndex().match([]) == {}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("ABCD", {A: 4}, id="whole-prompt"),
        pytest.param("ABCDEF", {A: 4}, id="longer-prompt"),
        pytest.param("AB", {A: 2}, id="shorter-prompt"),
        pytest.param("ABXY", {A: 2}, id="diverges-after-two"),
        pytest.param("AXCD", {A: 1}, id="diverges-after-one"),
        pytest.param("XBCD", {}, id="diverges-at-first"),
        pytest.param("", {}, id="empty-prompt"),
    ],
)
def test_match_counts_leading_blocks_up_to_divergence(query, expected):
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))

    assert index.match(chain(query)) == expected


def test_several_pods_are_matched_independently():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))
    index.insert(B, chain("ABEF"))
    index.insert(C, chain("XYZ"))

    assert index.match(chain("ABCD")) == {A: 4, B: 2}
    assert index.match(chain("ABEF")) == {A: 2, B: 4}
    assert index.match(chain("XY")) == {C: 2}


def test_only_consecutive_leading_blocks_count():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))
    index.insert(B, chain("ABCD"))
    index.remove(A, chain("AB"))  # A still holds blocks 3 and 4, but not 1 and 2

    assert index.match(chain("ABCD")) == {B: 4}
    assert index.blocks(A) == 2


def test_capacity_evicts_the_tail_blocks_of_a_prompt_first():
    index = PrefixIndex()
    index.set_capacity(A, 4)
    index.insert(A, chain("ABCD"))
    index.insert(A, chain("XYZ"))  # 7 blocks for 4 slots: D, C, B go, as vLLM frees tail first

    assert index.blocks(A) == 4
    assert index.match(chain("ABCD")) == {A: 1}
    assert index.match(chain("XYZ")) == {A: 3}


def test_capacity_evicts_the_least_recently_used_prompt_first():
    index = PrefixIndex()
    index.set_capacity(A, 6)
    index.insert(A, chain("ABC"))
    index.insert(A, chain("XYZ"))
    index.insert(A, chain("ABC"))  # used again: XYZ is now the older prompt
    index.insert(A, chain("MN"))

    assert index.match(chain("ABC")) == {A: 3}
    assert index.match(chain("XYZ")) == {A: 1}
    assert index.match(chain("MN")) == {A: 2}


def test_match_does_not_refresh_recency():
    index = PrefixIndex()
    index.set_capacity(A, 6)
    index.insert(A, chain("ABC"))
    index.insert(A, chain("XYZ"))
    before = index.match(chain("ABC"))  # unlike an insert, a lookup is not a use
    index.insert(A, chain("MN"))

    assert before == {A: 3}
    assert index.match(chain("ABC")) == {A: 1}
    assert index.match(chain("XYZ")) == {A: 3}


def test_match_of_an_unknown_prompt_changes_nothing():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))

    index.match(chain("ABXY"))
    index.match(chain("QRST"))

    assert index.blocks(A) == 4
    assert index.match(chain("QRST")) == {}
    assert index.match(chain("ABCD")) == {A: 4}


def test_a_shared_prefix_is_counted_once_per_pod():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))
    index.insert(A, chain("ABEF"))

    assert index.blocks(A) == 6  # A, AB, ABC, ABCD, ABE, ABEF: A and AB once


def test_shrinking_capacity_evicts_at_once_and_only_on_that_pod():
    index = PrefixIndex()
    index.insert(A, chain("ABCDEF"))
    index.insert(B, chain("ABCDEF"))

    index.set_capacity(A, 2)

    assert index.capacity(A) == 2
    assert index.blocks(A) == 2
    assert index.match(chain("ABCDEF")) == {A: 2, B: 6}

    index.set_capacity(A, 0)

    assert index.blocks(A) == 0
    assert index.match(chain("ABCDEF")) == {B: 6}


def test_capacity_applies_to_later_inserts():
    index = PrefixIndex(default_capacity=3)
    assert index.capacity(A) == 3

    index.insert(A, chain("ABCDE"))

    assert index.match(chain("ABCDE")) == {A: 3}


def test_drop_pod_forgets_everything_it_held_and_nothing_else():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))
    index.insert(A, chain("XY"))
    index.insert(B, chain("ABCD"))

    assert index.drop_pod(A) == 6
    assert index.blocks(A) == 0
    assert index.match(chain("ABCD")) == {B: 4}
    assert index.match(chain("XY")) == {}
    assert index.drop_pod(A) == 0
    assert index.drop_pod(C) == 0


def test_a_restarted_pod_keeps_its_capacity_and_a_removed_one_forgets_it():
    index = PrefixIndex(default_capacity=100)
    index.set_capacity(A, 8)
    index.set_capacity(B, 8)
    index.insert(A, chain("ABCD"))
    index.insert(B, chain("ABCD"))

    index.drop_pod(A)  # restarted: same engine, same KV cache size
    assert index.remove_pod(B) == 4  # left the table

    assert index.capacity(A) == 8
    assert index.capacity(B) == 100
    assert index.match(chain("ABCD")) == {}


def test_a_dropped_pod_can_be_filled_again():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))
    index.drop_pod(A)

    index.insert(A, chain("AB"))

    assert index.match(chain("ABCD")) == {A: 2}


def test_remove_forgets_the_chain_on_one_pod():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))
    index.insert(B, chain("ABCD"))

    index.remove(A, chain("ABCD"))
    index.remove(C, chain("ABCD"))  # a pod the index never saw

    assert index.blocks(A) == 0
    assert index.match(chain("ABCD")) == {B: 4}


def test_remove_forgets_every_block_the_chain_names_including_shared_ones():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))
    index.insert(A, chain("ABEF"))

    # A and AB are named by the removed chain too, so ABCD loses its leading blocks.
    index.remove(A, chain("ABEF"))

    assert index.match(chain("ABCD")) == {}
    assert index.blocks(A) == 2  # ABC and ABCD remain, unreachable until AB comes back
    index.insert(A, chain("AB"))
    assert index.match(chain("ABCD")) == {A: 4}


def test_remove_block_forgets_one_block_by_its_chained_hash():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))
    blocks = chain("ABCD")

    assert index.remove_block(A, blocks[3]) is True
    assert index.remove_block(A, blocks[3]) is False  # already gone
    assert index.remove_block(B, blocks[0]) is False  # never held
    assert index.match(blocks) == {A: 3}
    assert index.remove_block(A, blocks[1]) is True
    assert index.match(blocks) == {A: 1}
    assert index.holds(A, blocks[2]) and not index.holds(A, blocks[1])


def test_blocks_shared_by_pods_are_one_node_until_the_last_holder_goes():
    index = PrefixIndex()
    index.insert(A, chain("ABCD"))
    index.insert(B, chain("ABXY"))

    assert len(index) == 6  # A, AB shared; ABC, ABCD, ABX, ABXY
    index.drop_pod(A)
    assert len(index) == 4
    index.drop_pod(B)
    assert len(index) == 0


def test_many_pods_and_reused_slots_keep_their_own_blocks():
    index = PrefixIndex()
    pods = [PodId(f"http://pod-{i}:8000") for i in range(100)]  # more pods than a machine word has bits
    for i, pod in enumerate(pods):
        index.insert(pod, chain("AB" + "CDEFGHIJ"[: i % 8]))
    for pod in pods[::2]:
        index.drop_pod(pod)
    newcomer = PodId("http://pod-new:8000")
    index.insert(newcomer, chain("Q"))  # takes a dropped pod's place in the masks

    matched = index.match(chain("ABCDEFGHIJ"))
    assert matched == {pod: 2 + i % 8 for i, pod in enumerate(pods) if i % 2}
    assert index.match(chain("QR")) == {newcomer: 1}


@pytest.mark.parametrize("blocks", [1_000])
def test_memory_is_linear_in_blocks_not_in_blocks_squared(blocks):
    """A prompt of n blocks stores n entries, not n prefixes of up to n hashes (n^2/2)."""

    def stored_bytes(n: int) -> int:
        hashes = chain_hashes(list(range(n)), 1)  # made before measuring: the caller owns them
        index = PrefixIndex(default_capacity=n)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            index.insert(A, hashes)
            index.insert(B, hashes[: n // 2])
            assert index.match(hashes) == {A: n, B: n // 2}
            stored = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert index.blocks(A) == n and index.blocks(B) == n // 2
        return stored

    small, large = stored_bytes(blocks), stored_bytes(4 * blocks)

    assert large < 6 * small, f"{blocks} blocks take {small} bytes, 4x as many take {large}"
    assert large / (4 * blocks) < 1_000  # bytes per block (two pods hold half of them)


# -- what an eviction costs: the share of blocks requests came back for -------------------------


def test_blocks_count_as_reused_once_a_routed_request_finds_them():
    index = PrefixIndex(default_capacity=10)
    index.insert(A, chain("ABCDEFGH"))  # first request, or a KV event
    assert index.reused_share(A) == 0.0
    assert index.eviction_price(A) == pytest.approx(0.8)

    index.insert(A, chain("ABCDXY"), reused=4)  # the next request found ABCD there
    assert index.reused_share(A) == pytest.approx(0.4)
    assert index.eviction_price(A) == pytest.approx(1.0 + 0.4)  # 10 blocks held, 4 of them reused

    index.insert(A, chain("ABCDXY"), reused=6)  # reuses count blocks, not requests
    index.insert(A, chain("ABCD"))  # a confirmation changes no flag
    assert index.reused_share(A) == pytest.approx(0.6)
    assert index.reused_share(B) == 0.0 and index.eviction_price(B) == 0.0


def test_reused_blocks_stop_counting_when_evicted_removed_or_dropped():
    index = PrefixIndex(default_capacity=4)
    index.insert(A, chain("ABCD"))
    index.insert(A, chain("ABCD"), reused=4)
    assert index.reused_share(A) == 1.0

    assert index.remove_block(A, chain("ABCD")[3]) is True
    assert index.reused_share(A) == pytest.approx(0.75)
    index.remove(A, chain("A"))
    assert index.reused_share(A) == pytest.approx(0.5)
    index.insert(A, chain("WXYZ"))  # evicts B and C, the two left
    assert index.reused_share(A) == 0.0 and index.blocks(A) == 4
    assert index.match(chain("WXYZ")) == {A: 4}

    index.insert(A, chain("WXYZ"), reused=4)
    index.drop_pod(A)
    assert index.reused_share(A) == 0.0
    index.insert(A, chain("WX"))
    assert index.reused_share(A) == 0.0  # a pod that comes back starts clean


def test_a_reuse_count_never_exceeds_the_capacity():
    index = PrefixIndex(default_capacity=4)
    index.insert(A, chain("ABCDEFGH"), reused=8)

    assert index.blocks(A) == 4 and index.reused_share(A) == 1.0
    index.set_capacity(A, 2)
    assert index.reused_share(A) == 1.0 and index.blocks(A) == 2
