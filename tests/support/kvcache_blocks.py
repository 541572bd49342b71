"""Deterministic blocks for kvcache tests: keys in a test namespace and frames."""

from __future__ import annotations

import random

from kvcache.framing import encode
from kvcache.keys import ROOT_HASH, BlockKey, Namespace, hash_block

NAMESPACE = Namespace(model="test-model", dtype="float32", block_size=16, kv_layout="test")


def key(index: int, namespace: Namespace = NAMESPACE) -> BlockKey:
    """The key of test block `index` (a one-block chain of distinct tokens)."""
    return namespace.key(hash_block(ROOT_HASH, [index] * namespace.block_size))


def payload(index: int, size: int) -> bytes:
    """`size` pseudo-random bytes determined by `index`."""
    return random.Random(index).randbytes(size)


def frame(index: int, size: int = 64 << 10) -> bytearray:
    """A sealed frame of test block `index` with a `size`-byte payload."""
    return encode(key(index), payload(index, size))
