"""Which blocks a request loads from the store and which it saves, step by step.

The scheduler side of the vLLM connector decides this; the worker side only
copies. Kept free of vLLM imports so it can be tested on its own.

- `match`: how many prompt tokens beyond the engine's own prefix hit can be
  loaded: the longest run of consecutive blocks the store holds, starting at
  the first block the engine lacks, and never the block holding the prompt's
  last token (the engine must compute at least one token). Cached per
  request and start, so vLLM may ask repeatedly without new lookups.
- `allocated`: once vLLM has given the request its blocks, the matched blocks
  become loads into those block ids.
- `step`: per scheduled step, the pending loads and the saves of blocks that
  become full this step (computed here, not loaded and not a local hit).

Block hashes are `kvcache.keys` chains over the token ids (with the cache
salt in the first block), independent of vLLM's own hashing and hash seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvcache.keys import ROOT_HASH, BlockHash, hash_block

#: Given block hashes, the tier holding each (or None), in order.
Lookup = Callable[[Sequence[BlockHash]], Sequence[str | None]]


@dataclass(frozen=True, slots=True)
class BlockTransfer:
    """One block to copy: engine block id and the block's chained hash."""

    block_id: int
    block_hash: BlockHash


@dataclass(frozen=True, slots=True)
class RequestTransfers:
    """A request's copies in one step: loads before the forward, saves after."""

    req_id: str
    loads: tuple[BlockTransfer, ...] = ()
    saves: tuple[BlockTransfer, ...] = ()


@dataclass(frozen=True, slots=True)
class Match:
    """Blocks found in the store for a request.

    Attributes:
        start_block: index of the first block the engine lacked.
        tiers: tier name of each matched block, from `start_block` on.
    """

    start_block: int
    tiers: tuple[str, ...]

    @property
    def blocks(self) -> int:
        return len(self.tiers)


@dataclass(slots=True)
class _Tracked:
    salt: bytes
    hashes: list[BlockHash] = field(default_factory=list)
    match: Match | None = None
    pending_loads: tuple[BlockTransfer, ...] = ()
    saved_upto: int = 0


class TransferPlanner:
    """Plans loads and saves for the requests of one engine.

    Args:
        block_size: tokens per block.
        lookup: which tier holds each block (the connector's store query).
    """

    def __init__(self, *, block_size: int, lookup: Lookup) -> None:
        self._block_size = block_size
        self._lookup = lookup
        self._requests: dict[str, _Tracked] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def _tracked(self, req_id: str, salt: bytes) -> _Tracked:
        tracked = self._requests.get(req_id)
        if tracked is None:
            tracked = self._requests[req_id] = _Tracked(salt)
        return tracked

    def _hashes(self, tracked: _Tracked, token_ids: Sequence[int], blocks: int) -> list[BlockHash]:
        size = self._block_size
        hashes = tracked.hashes
        parent = hashes[-1] if hashes else ROOT_HASH
        for index in range(len(hashes), blocks):
            chunk = token_ids[index * size : (index + 1) * size]
            parent = hash_block(parent, chunk, tracked.salt if index == 0 else b"")
            hashes.append(parent)
        return hashes[:blocks]

    def match(self, req_id: str, token_ids: Sequence[int], num_computed_tokens: int, *, salt: bytes = b"") -> Match:
        """Blocks loadable beyond the engine's own hit.

        Args:
            req_id: the request.
            token_ids: its prompt token ids.
            num_computed_tokens: tokens the engine already has (block-aligned).
            salt: cache salt folded into the first block.

        Returns:
            The match (possibly of zero blocks). Calls `lookup` once per
            request and start position.
        """
        tracked = self._tracked(req_id, salt)
        start = num_computed_tokens // self._block_size
        if tracked.match is not None and tracked.match.start_block == start:
            return tracked.match
        limit = (len(token_ids) - 1) // self._block_size
        tiers: list[str] = []
        if start < limit:
            hashes = self._hashes(tracked, token_ids, limit)
            for tier in self._lookup(hashes[start:limit]):
                if tier is None:
                    break
                tiers.append(tier)
        tracked.match = Match(start, tuple(tiers))
        return tracked.match

    def last_match(self, req_id: str) -> Match | None:
        """The match `match` last returned for the request (no lookup)."""
        tracked = self._requests.get(req_id)
        return None if tracked is None else tracked.match

    def allocated(
        self,
        req_id: str,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        num_external_tokens: int,
        *,
        num_local_tokens: int,
        salt: bytes = b"",
    ) -> None:
        """Record the blocks vLLM gave the request and what it will load.

        Args:
            req_id: the request.
            token_ids: its token ids so far.
            block_ids: all its engine block ids, in order.
            num_external_tokens: tokens vLLM agreed to load (0: none).
            num_local_tokens: tokens the engine had itself (block-aligned).
            salt: cache salt folded into the first block.
        """
        tracked = self._tracked(req_id, salt)
        start = num_local_tokens // self._block_size
        count = num_external_tokens // self._block_size
        loads: tuple[BlockTransfer, ...] = ()
        if count:
            hashes = self._hashes(tracked, token_ids, start + count)
            loads = tuple(BlockTransfer(block_ids[i], hashes[i]) for i in range(start, start + count))
        tracked.pending_loads = loads
        # Blocks the engine had or loads are stored already: save only what it computes.
        tracked.saved_upto = max(tracked.saved_upto, start + count)

    def hit_tiers(self, req_id: str, num_external_tokens: int) -> dict[str, int]:
        """Tokens per tier among the `num_external_tokens` vLLM will load."""
        tracked = self._requests.get(req_id)
        if tracked is None or tracked.match is None:
            return {}
        counts: dict[str, int] = {}
        blocks = num_external_tokens // self._block_size
        for tier in tracked.match.tiers[:blocks]:
            counts[tier] = counts.get(tier, 0) + self._block_size
        return counts

    def step(
        self, req_id: str, token_ids: Sequence[int], block_ids: Sequence[int], num_computed_after: int
    ) -> RequestTransfers | None:
        """The copies of one scheduled step of a request.

        Args:
            req_id: the request.
            token_ids: all its token ids known now.
            block_ids: all its engine block ids, in order.
            num_computed_after: tokens whose KV exists once this step ran.

        Returns:
            Loads not yet issued and blocks that become full this step, or
            None if there is nothing to copy.
        """
        tracked = self._requests.get(req_id)
        if tracked is None:
            return None
        loads, tracked.pending_loads = tracked.pending_loads, ()
        full = min(num_computed_after, len(token_ids)) // self._block_size
        full = min(full, len(block_ids))
        saves: tuple[BlockTransfer, ...] = ()
        if full > tracked.saved_upto:
            hashes = self._hashes(tracked, token_ids, full)
            saves = tuple(BlockTransfer(block_ids[i], hashes[i]) for i in range(tracked.saved_upto, full))
            tracked.saved_upto = full
        if not loads and not saves:
            return None
        return RequestTransfers(req_id, loads, saves)

    def finished(self, req_id: str) -> None:
        """Forget a request."""
        self._requests.pop(req_id, None)
