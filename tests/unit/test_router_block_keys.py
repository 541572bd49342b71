"""Block keys as the router uses them: chained, prefix-sharing, salted and stable across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcache.keys import ROOT_HASH, chain_hashes, hash_block

BLOCK = 16
REPO_ROOT = Path(__file__).resolve().parents[2]


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_chain_equals_hash_block_applied_block_by_block():
    ids = tokens(3 * BLOCK)
    expected = []
    parent = ROOT_HASH
    for k in range(3):
        parent = hash_block(parent, ids[k * BLOCK : (k + 1) * BLOCK], b"salt" if k == 0 else b"")
        expected.append(parent)

    assert chain_hashes(ids, BLOCK, first_extra=b"salt") == expected


def test_every_hash_is_sixteen_bytes_and_distinct():
    hashes = chain_hashes(tokens(8 * BLOCK), BLOCK)

    assert len(hashes) == 8
    assert all(len(h) == 16 for h in hashes)
    assert len(set(hashes)) == 8


def test_shared_prefix_gives_shared_leading_hashes():
    shared = tokens(3 * BLOCK)
    a = chain_hashes(shared + tokens(2 * BLOCK, start=1000), BLOCK)
    b = chain_hashes(shared + tokens(2 * BLOCK, start=2000), BLOCK)

    assert a[:3] == b[:3]
    assert all(x != y for x, y in zip(a[3:], b[3:]))


def test_a_prefix_of_the_prompt_hashes_to_a_prefix_of_the_chain():
    ids = tokens(5 * BLOCK)

    assert chain_hashes(ids[: 2 * BLOCK], BLOCK) == chain_hashes(ids, BLOCK)[:2]


@pytest.mark.parametrize(
    "changed_block",
    [
        pytest.param(0, id="first-block"),
        pytest.param(2, id="middle-block"),
        pytest.param(4, id="last-block"),
    ],
)
@pytest.mark.parametrize("offset", [pytest.param(0, id="block-start"), pytest.param(BLOCK - 1, id="block-end")])
def test_a_difference_in_block_k_changes_hashes_from_k_on_only(changed_block, offset):
    ids = tokens(5 * BLOCK)
    changed = list(ids)
    changed[changed_block * BLOCK + offset] += 100_000

    before, after = chain_hashes(ids, BLOCK), chain_hashes(changed, BLOCK)

    assert before[:changed_block] == after[:changed_block]
    assert all(x != y for x, y in zip(before[changed_block:], after[changed_block:]))


def test_same_tokens_in_a_later_block_hash_differently_than_in_the_first():
    # The parent is part of the hash: block content alone does not name a block.
    block = tokens(BLOCK)

    hashes = chain_hashes(block + block, BLOCK)

    assert hashes[0] != hashes[1]


@pytest.mark.parametrize(
    ("length", "full_blocks"),
    [
        pytest.param(0, 0, id="empty"),
        pytest.param(BLOCK - 1, 0, id="shorter-than-a-block"),
        pytest.param(BLOCK, 1, id="exactly-one-block"),
        pytest.param(2 * BLOCK + 1, 2, id="one-token-over"),
        pytest.param(3 * BLOCK - 1, 2, id="one-token-short"),
    ],
)
def test_a_partial_trailing_block_is_ignored(length, full_blocks):
    ids = tokens(length)

    hashes = chain_hashes(ids, BLOCK)

    assert len(hashes) == full_blocks
    assert hashes == chain_hashes(ids[: full_blocks * BLOCK], BLOCK)


def test_first_extra_separates_salts_in_every_block():
    ids = tokens(4 * BLOCK)
    plain = chain_hashes(ids, BLOCK)
    salt_a = chain_hashes(ids, BLOCK, first_extra=b"tenant-a")
    salt_b = chain_hashes(ids, BLOCK, first_extra=b"tenant-b")

    for k in range(4):
        assert len({plain[k], salt_a[k], salt_b[k]}) == 3, f"block {k} shared across salts"
    assert chain_hashes(ids, BLOCK, first_extra=b"tenant-a") == salt_a


def test_hash_block_extra_changes_the_hash():
    block = tokens(BLOCK)

    assert hash_block(ROOT_HASH, block) != hash_block(ROOT_HASH, block, b"lora-1")
    assert hash_block(ROOT_HASH, block, b"lora-1") != hash_block(ROOT_HASH, block, b"lora-2")


_PROBE = "from kvcache.keys import chain_hashes; print(','.join(h.hex() for h in chain_hashes(list(range(40)), 16, first_extra=b'salt')))"

# Pinned so a change to the hashing scheme (which would orphan every stored block) is a visible decision.
_PINNED = ["04ab9bfe40e82206ed9435af3b09304b", "93a24c5767dd3bb423df141fafffe7e8"]


def test_hashes_are_stable_across_processes_and_pinned():
    here = [h.hex() for h in chain_hashes(list(range(40)), 16, first_extra=b"salt")]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}

    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, env=env, cwd=REPO_ROOT, timeout=30
    )

    assert out.stdout.strip().split(",") == here
    assert here == _PINNED


@pytest.mark.parametrize("block_size", [pytest.param(0, id="zero"), pytest.param(-16, id="negative")])
def test_non_positive_block_size_is_refused(block_size):
    with pytest.raises(ValueError, match="block_size"):
        chain_hashes(tokens(32), block_size)
