"""Block keys: a namespace keeps incompatible engines apart, and keys are seed-independent."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvcache.keys import KEY_SIZE, Namespace, chain_hashes

BASE = Namespace(model="m", dtype="float32", block_size=16, kv_layout="cpu:6x[2,16,128]", tp_rank=0, tp_size=1)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(Namespace("m2", "float32", 16, BASE.kv_layout), id="model"),
        pytest.param(Namespace("m", "bfloat16", 16, BASE.kv_layout), id="dtype"),
        pytest.param(Namespace("m", "float32", 32, BASE.kv_layout), id="block-size"),
        pytest.param(Namespace("m", "float32", 16, "cpu:6x[4,16,64]"), id="layout"),
        pytest.param(Namespace("m", "float32", 16, BASE.kv_layout, tp_rank=1, tp_size=2), id="tp-rank"),
    ],
)
def test_any_namespace_field_changes_every_key(other: Namespace) -> None:
    hashes = chain_hashes(list(range(64)), 16)
    assert set(BASE.keys(hashes)).isdisjoint(other.keys(hashes))


def test_a_key_is_the_namespace_digest_then_the_block_hash() -> None:
    (first,) = chain_hashes(list(range(16)), 16)
    key = BASE.key(first)
    assert len(key) == KEY_SIZE
    assert key == BASE.digest() + first


def test_keys_do_not_depend_on_the_hash_seed() -> None:
    code = (
        "from kvcache.keys import Namespace, chain_hashes;"
        "print(Namespace('m','f',4,'l').keys(chain_hashes(list(range(8)),4))[1].hex())"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True, text=True,
                       check=True).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
