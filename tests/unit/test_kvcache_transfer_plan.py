"""The connector's plan: what a request loads, what it saves, and when."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvcache.keys import BlockHash, chain_hashes
from kvcache.transfer_plan import TransferPlanner

BS = 4


class Store:
    """Which block hashes exist, and in which tier; counts lookups."""

    def __init__(self) -> None:
        self.tiers: dict[BlockHash, str] = {}
        self.lookups = 0

    def lookup(self, hashes: Sequence[BlockHash]) -> list[str | None]:
        self.lookups += 1
        return [self.tiers.get(h) for h in hashes]


def planner_with(tokens: list[int], stored: dict[int, str]) -> tuple[TransferPlanner, Store]:
    store = Store()
    hashes = chain_hashes(tokens, BS)
    for index, tier in stored.items():
        store.tiers[hashes[index]] = tier
    return TransferPlanner(block_size=BS, lookup=store.lookup), store


TOKENS = list(range(100, 118))  # 18 tokens: 4 full blocks, the 5th holds the last token


@pytest.mark.parametrize(
    ("stored", "local", "blocks"),
    [
        pytest.param({0: "l2", 1: "l2", 2: "l3", 3: "l2"}, 0, 4, id="all-loadable"),
        pytest.param({0: "l2", 2: "l3"}, 0, 1, id="stops-at-first-gap"),
        pytest.param({1: "l2", 2: "l2"}, 4, 2, id="after-the-local-hit"),
        pytest.param({}, 0, 0, id="nothing-stored"),
    ],
)
def test_a_match_is_the_run_of_stored_blocks_after_the_local_hit(stored: dict[int, str], local: int, blocks: int) -> None:
    planner, _ = planner_with(TOKENS, stored)
    assert planner.match("r", TOKENS, local).blocks == blocks


def test_the_block_holding_the_last_prompt_token_is_never_offered() -> None:
    tokens = list(range(16))  # exactly 4 blocks
    planner, _ = planner_with(tokens, {i: "l2" for i in range(4)})
    assert planner.match("r", tokens, 0).blocks == 3


def test_repeated_asks_do_not_repeat_the_lookup() -> None:
    planner, store = planner_with(TOKENS, {0: "l2"})
    for _ in range(3):
        planner.match("r", TOKENS, 0)
    assert store.lookups == 1


def test_loads_go_to_the_allocated_blocks_and_tiers_are_counted() -> None:
    planner, _ = planner_with(TOKENS, {0: "l1", 1: "l2", 2: "l3"})
    match = planner.match("r", TOKENS, 0)
    planner.allocated("r", TOKENS, [7, 8, 9, 10, 11], match.blocks * BS, num_local_tokens=0)
    assert planner.hit_tiers("r", 3 * BS) == {"l1": BS, "l2": BS, "l3": BS}
    step = planner.step("r", TOKENS, [7, 8, 9, 10, 11], num_computed_after=18)
    assert step is not None
    assert [t.block_id for t in step.loads] == [7, 8, 9]
    assert [t.block_hash for t in step.loads] == chain_hashes(TOKENS, BS)[:3]
    assert [t.block_id for t in step.saves] == [10], "only the block computed here is saved"
    assert planner.step("r", TOKENS, [7, 8, 9, 10, 11], num_computed_after=18) is None, "loads are issued once"


def test_saves_follow_chunked_prefill_and_decode() -> None:
    planner, _ = planner_with(TOKENS, {})
    planner.match("r", TOKENS, 0)
    planner.allocated("r", TOKENS, [1, 2, 3, 4, 5], 0, num_local_tokens=0)
    first = planner.step("r", TOKENS, [1, 2, 3, 4, 5], num_computed_after=6)  # chunk of 6 tokens
    assert first is not None and [t.block_id for t in first.saves] == [1]
    second = planner.step("r", TOKENS, [1, 2, 3, 4, 5], num_computed_after=18)
    assert second is not None and [t.block_id for t in second.saves] == [2, 3, 4]
    grown = TOKENS + [1, 2]  # two generated tokens complete block 5
    third = planner.step("r", grown, [1, 2, 3, 4, 5], num_computed_after=20)
    assert third is not None and [t.block_hash for t in third.saves] == [chain_hashes(grown, BS)[4]]


def test_a_local_hit_is_not_saved_again() -> None:
    planner, _ = planner_with(TOKENS, {})
    planner.match("r", TOKENS, 8)
    planner.allocated("r", TOKENS, [1, 2, 3, 4, 5], 0, num_local_tokens=8)
    step = planner.step("r", TOKENS, [1, 2, 3, 4, 5], num_computed_after=18)
    assert step is not None and [t.block_id for t in step.saves] == [3, 4]


def test_the_salt_separates_chains() -> None:
    salted = TransferPlanner(block_size=BS, lookup=lambda hs: ["l2"] * len(hs))
    seen: list[BlockHash] = []
    salted.match("a", TOKENS, 0, salt=b"tenant-1")
    salted.allocated("a", TOKENS, [1, 2, 3, 4, 5], 4 * BS, num_local_tokens=0, salt=b"tenant-1")
    step = salted.step("a", TOKENS, [1, 2, 3, 4, 5], 18)
    assert step is not None
    seen = [t.block_hash for t in step.loads]
    assert set(seen).isdisjoint(chain_hashes(TOKENS, BS))
    assert seen == chain_hashes(TOKENS, BS, first_extra=b"tenant-1")[:4]


def test_finished_requests_are_forgotten() -> None:
    planner, _ = planner_with(TOKENS, {})
    planner.match("r", TOKENS, 0)
    planner.finished("r")
    assert len(planner) == 0
    assert planner.step("r", TOKENS, [1], 4) is None
