"""KV events key salted and adapter blocks as the gateway keys the requests that made them.

vLLM publishes each stored block's extra keys (LoRA name, multimodal ids,
cache salt) untagged. The index must file a salted block under the salted
chain, or a request with another salt (or none) would be matched to blocks
the engine will never hit for it.
"""

from __future__ import annotations

import pytest

from kvcache.keys import chain_hashes, request_extra
from router.index import PrefixIndex
from router.kv_events import EngineBlocks, block_extra
from router.pods import PodId

B = 4
POD = PodId("http://pod-a")
TOKENS = list(range(100, 112))  # three blocks of 4


def stored(hashes, parent, tokens, *, extra_keys=None, lora_name=None, lora_id=None):
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": B,
        "lora_id": lora_id,
        "medium": "GPU",
        "lora_name": lora_name,
        "extra_keys": extra_keys,
    }


@pytest.fixture
def blocks() -> EngineBlocks:
    return EngineBlocks(POD, PrefixIndex(), B)


def test_a_salted_chain_matches_only_its_salt(blocks):
    blocks.apply([stored([11, 12], None, TOKENS[:8], extra_keys=[["tenant-a"], None])])
    blocks.apply([stored([13], 12, TOKENS[8:12])])
    salted = chain_hashes(TOKENS, B, first_extra=request_extra("tenant-a"))
    assert blocks.index.match(salted) == {POD: 3}
    assert blocks.index.match(chain_hashes(TOKENS, B)) == {}
    assert blocks.index.match(chain_hashes(TOKENS, B, first_extra=request_extra("tenant-b"))) == {}


def test_an_adapter_chain_is_keyed_by_its_name(blocks):
    # vLLM puts the adapter's name in every block's keys, and the salt after it in the first.
    event = stored([21, 22, 23], None, TOKENS, extra_keys=[["sql-lora", "s"], ["sql-lora"], ["sql-lora"]], lora_name="sql-lora", lora_id=1)
    blocks.apply([event])
    assert blocks.index.match(chain_hashes(TOKENS, B, first_extra=request_extra("s", "sql-lora"))) == {POD: 3}
    assert blocks.index.match(chain_hashes(TOKENS, B, first_extra=request_extra("s"))) == {}
    assert blocks.stored == 3


def test_multimodal_blocks_are_skipped_from_where_they_start(blocks):
    blocks.apply([stored([31, 32, 33], None, TOKENS, extra_keys=[None, [["img-hash", 0]], None])])
    assert blocks.index.match(chain_hashes(TOKENS, B)) == {POD: 1}
    assert blocks.stored == 1 and blocks.skipped == 2


def test_an_old_engine_naming_no_adapter_is_still_skipped(blocks):
    blocks.apply([stored([41], None, TOKENS[:4], lora_id=3)])
    assert blocks.index.blocks(POD) == 0 and blocks.skipped == 1


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(stored([1], None, TOKENS[:4]), b"", id="plain"),
        pytest.param(stored([1], None, TOKENS[:4], extra_keys=[["s"]]), request_extra("s"), id="salt"),
        pytest.param(stored([1], None, TOKENS[:4], extra_keys=[["l"]], lora_name="l"), request_extra(None, "l"), id="adapter"),
        pytest.param(stored([1], None, TOKENS[:4], extra_keys=[[b"digest"]]), None, id="prompt-embeds"),
        pytest.param(stored([1], None, TOKENS[:4], extra_keys=[["s", "t"]]), None, id="two-strings"),
    ],
)
def test_block_extra_reads_vllms_untagged_keys(event, expected):
    assert block_extra(event, 0) == expected
