"""Block keys: chained hashes of token blocks, in a namespace.

A block hash names the whole prefix that ends with that block: it is the hash of
the parent block's hash, the block's token ids and any extra keys (salt, LoRA
name). Two prompts share a block hash exactly when they share every token up to
the end of that block. The gateway's prefix index and the KV store both speak
this vocabulary; neither depends on a process's hash seed.

A `Namespace` says which engines may share stored KV: same model, dtype, block
size, KV layout and tensor-parallel rank. A `BlockKey` is the namespace digest
followed by the block hash, so blocks of incompatible engines never collide.

Not here: vLLM's own block hashes (sha256 over a pickle), which the engine
computes for itself and publishes in its KV events.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

#: A stored block's name: 16 bytes of namespace digest, then the block hash.
BlockKey = NewType("BlockKey", bytes)

#: Parent of the first block of every chain.
ROOT_HASH = BlockHash(b"\x00" * 16)

_DIGEST_SIZE = 16
_TOKEN_BYTES = 8
_EXTRA_TAG = b"\x00extra\x00"


def _pack(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian int64s, whatever the host's byte order.

    NOTE: struct.pack, not array("q", ...): it is twice as fast on a list of
    ints, and this runs on every request the gateway routes.
    """
    return struct.pack(f"<{len(token_ids)}q", *token_ids)


def hash_block(parent: BlockHash, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Hash one block given its parent's hash.

    Args:
        parent: hash of the previous block, or `ROOT_HASH` for the first.
        token_ids: the block's token ids (a full block).
        extra: extra keys folded into this block only (e.g. a cache salt).

    Returns:
        A 16-byte digest naming the prefix up to and including this block.
    """
    h = hashlib.blake2b(parent, digest_size=_DIGEST_SIZE)
    h.update(_pack(token_ids))
    if extra:
        h.update(_EXTRA_TAG)
        h.update(extra)
    return BlockHash(h.digest())


def chain_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    first_extra: bytes = b"",
) -> list[BlockHash]:
    """Hash every full block of `token_ids` into a chain.

    Args:
        token_ids: the prompt's token ids.
        block_size: tokens per block; a trailing partial block is not hashed.
        first_extra: extra keys folded into the first block only, so that two
            salts (or adapters) never share any block.

    Returns:
        One hash per full block, in order; empty when the prompt is shorter
        than one block.

    Raises:
        ValueError: if `block_size` is not positive.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    # Pack once and hash slices of the packed bytes: per-block packing costs
    # more than the hashing itself.
    packed = memoryview(_pack(token_ids))
    stride = block_size * _TOKEN_BYTES
    hashes: list[BlockHash] = []
    parent = ROOT_HASH
    for index in range(len(token_ids) // block_size):
        h = hashlib.blake2b(parent, digest_size=_DIGEST_SIZE)
        h.update(packed[index * stride : (index + 1) * stride])
        if index == 0 and first_extra:
            h.update(_EXTRA_TAG)
            h.update(first_extra)
        parent = BlockHash(h.digest())
        hashes.append(parent)
    return hashes


def request_extra(cache_salt: str | None = None, lora_name: str | None = None) -> bytes:
    """The extra keys of a request's first block: its cache salt and LoRA adapter.

    vLLM folds the salt into the first block's hash and the adapter's name
    into every block's; with chained hashes, folding both into the first block
    is enough to keep two salts (or adapters) from sharing any block. The
    gateway's prefix index and the KV connector both key requests with this,
    so a prefix the router matches is one the connector can find.

    Args:
        cache_salt: the request's `cache_salt`, or None.
        lora_name: the LoRA adapter the request runs under, or None for the
            base model.

    Returns:
        Bytes for `chain_hashes(first_extra=...)`; empty when neither is set.
    """
    parts = []
    if cache_salt:
        parts.append(f"salt={cache_salt}")
    if lora_name:
        parts.append(f"lora={lora_name}")
    return "\x00".join(parts).encode()


_NAMESPACE_DIGEST_SIZE = 16
#: Length of every `BlockKey` made by `Namespace.key`.
KEY_SIZE = _NAMESPACE_DIGEST_SIZE + _DIGEST_SIZE


@dataclass(frozen=True, slots=True)
class Namespace:
    """What must match for two engines to share stored KV blocks.

    Attributes:
        model: model identity (a name or a weights digest; the path is a poor
            choice when machines lay models out differently).
        dtype: KV cache element type, e.g. ``"float32"``.
        block_size: tokens per block.
        kv_layout: a description of one block's bytes: backend, page shape,
            number of layers. Two engines whose pages differ never share.
        tp_rank: tensor-parallel rank whose shard of the heads the block holds.
        tp_size: tensor-parallel world size.
    """

    model: str
    dtype: str
    block_size: int
    kv_layout: str
    tp_rank: int = 0
    tp_size: int = 1

    def digest(self) -> bytes:
        """A 16-byte digest of every field, stable across processes and hosts."""
        text = "\x1f".join(
            (
                "kvgate-ns-v1",
                self.model,
                self.dtype,
                str(self.block_size),
                self.kv_layout,
                str(self.tp_rank),
                str(self.tp_size),
            )
        )
        return hashlib.blake2b(text.encode(), digest_size=_NAMESPACE_DIGEST_SIZE).digest()

    def key(self, block_hash: BlockHash) -> BlockKey:
        """The stored name of one block of this namespace."""
        return BlockKey(self.digest() + block_hash)

    def keys(self, block_hashes: Sequence[BlockHash]) -> list[BlockKey]:
        """`key` for each hash, computing the digest once."""
        prefix = self.digest()
        return [BlockKey(prefix + h) for h in block_hashes]
