"""The prefix index: which pods hold which KV blocks, keyed by chained block hash.

A block's hash (`kvcache.keys.chain_hashes`) is the hash of its parent's hash
and its own tokens, so one hash names the whole prefix that ends with that
block. The radix tree over a prompt's blocks is therefore implicit in the
hashes: a node is its chained hash, its parent is the hash it was chained
from, and a dict from hash to node is the whole tree, as vLLM's block pool
keeps `hash -> block`. Matching walks the prompt's own chain, one dict lookup
per block, and stops at the first block nobody holds.

Each node's value is a bit mask of the pods holding it (every pod the index
knows gets one bit), so following a prompt down the tree narrows the set of
pods still matching with one integer `&` per block. Each pod also has an LRU
of its blocks (an `OrderedDict` keyed by chained hash: O(1) touch, evict and
remove, the doubly linked list vLLM's free-block queue is) bounded by the
engine's KV capacity (`num_gpu_blocks`), evicted as vLLM would: when a request
finishes vLLM frees its blocks tail first, so the first block of a prompt is
the last to go. The index therefore forgets what the engine would have dropped.

Every operation is linear in the blocks it is given and memory is linear in
the resident blocks (one dict entry per block, one LRU entry per block and
pod): nothing stores a path.

NOTE: not `pygtrie`. A `pygtrie.Trie` keyed by block paths takes about 2 ms
to create and walk the nodes of a 2,048-block prompt before any residency
bookkeeping (this index inserts and matches it in about 0.5 ms), costs about
320 bytes per node, and removing one node needs its whole path (quadratic to
evict a long prompt block by block). The chained hash already is the path, so
a flat dict gives the same tree for less (`scripts/bench_index.py` measures
both; about 180 bytes per resident block here).

Entries are predicted: the router records a prompt's blocks on the pod it
sends it to. Where engines publish KV events, `router.kv_events` confirms them
with the same `insert` and forgets evicted blocks with `remove_block`.

The index is synchronous and never awaits, so it needs no locks. It is not
shared between gateway replicas.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvcache.keys import BlockHash
from router.pods import PodId


class PrefixIndex:
    """Which pod holds which block prefixes.

    Args:
        default_capacity: blocks a pod is assumed to hold until told otherwise.
    """

    def __init__(self, default_capacity: int = 4096) -> None:
        self._holders: dict[BlockHash, int] = {}
        """Block -> bit mask of the pods holding it (absent when none does)."""
        self._bit: dict[PodId, int] = {}
        self._pod_of_bit: dict[int, PodId] = {}
        self._free_bits: list[int] = []
        self._lru: dict[PodId, OrderedDict[BlockHash, None]] = {}
        """Pod -> its blocks, least recently used first."""
        self._capacity: dict[PodId, int] = {}
        self._default_capacity = default_capacity

    def __len__(self) -> int:
        """Distinct blocks held by at least one pod (the tree's nodes)."""
        return len(self._holders)

    def set_capacity(self, pod: PodId, blocks: int) -> None:
        """Bound `pod` to `blocks` KV blocks, evicting its LRU blocks beyond that."""
        self._capacity[pod] = max(0, blocks)
        self._evict(pod)

    def capacity(self, pod: PodId) -> int:
        """KV blocks `pod` can hold, as reported (or the default until it reports)."""
        return self._capacity.get(pod, self._default_capacity)

    def match(self, hashes: Sequence[BlockHash]) -> dict[PodId, int]:
        """Count, per pod, the leading blocks of `hashes` it holds.

        Args:
            hashes: the prompt's block hash chain.

        Returns:
            Pod -> number of consecutive leading blocks held (pods holding none
            are absent). No side effects: matching does not refresh the LRU.
        """
        matched: dict[PodId, int] = {}
        holders = self._holders
        alive = 0
        depth = 0
        for depth, block in enumerate(hashes):
            still = holders.get(block, 0) if depth == 0 else alive & holders.get(block, 0)
            if still != alive and depth:
                self._record(matched, alive & ~still, depth)
            alive = still
            if not alive:
                return matched
        self._record(matched, alive, depth + 1)
        return matched

    def insert(self, pod: PodId, hashes: Sequence[BlockHash]) -> None:
        """Record that `pod` now holds every block of `hashes`, most recently used.

        Side effects: refreshes the pod's LRU (first block freshest, as vLLM
        frees a request's blocks tail first) and evicts beyond capacity.
        """
        if not hashes:
            return
        bit = self._bit_of(pod)
        lru = self._lru.get(pod)
        if lru is None:
            lru = self._lru[pod] = OrderedDict()
        holders = self._holders
        move = lru.move_to_end
        for block in reversed(hashes):
            holders[block] = holders.get(block, 0) | bit
            lru[block] = None
            move(block)
        self._evict(pod)

    def remove(self, pod: PodId, hashes: Iterable[BlockHash]) -> None:
        """Forget that `pod` holds each block of `hashes` (its other blocks stay)."""
        lru = self._lru.get(pod)
        if not lru:
            return
        bit = self._bit[pod]
        for block in hashes:
            if lru.pop(block, False) is None:
                self._clear(block, bit)

    def remove_block(self, pod: PodId, block: BlockHash) -> bool:
        """Forget that `pod` holds the block whose chained hash is `block` (the engine evicted it).

        Blocks chained from it stay recorded: the engine may still hold them,
        and they match again once the block is back.

        Returns:
            Whether the index believed the pod held it.
        """
        lru = self._lru.get(pod)
        if not lru or lru.pop(block, False) is not None:
            return False
        self._clear(block, self._bit[pod])
        return True

    def holds(self, pod: PodId, block: BlockHash) -> bool:
        """Whether the index believes `pod` holds the block `block` names."""
        lru = self._lru.get(pod)
        return bool(lru) and block in lru

    def drop_pod(self, pod: PodId) -> int:
        """Forget everything `pod` holds (it restarted, died or left). Returns blocks dropped."""
        lru = self._lru.pop(pod, None)
        bit = self._bit.pop(pod, None)
        if bit is not None:
            del self._pod_of_bit[bit]
            self._free_bits.append(bit)
        if not lru or bit is None:
            return 0
        for block in lru:
            self._clear(block, bit)
        return len(lru)

    def occupancy(self, pod: PodId) -> float:
        """Share of `pod`'s KV capacity the index believes holds cached blocks (0..1)."""
        capacity = self.capacity(pod)
        return min(self.blocks(pod) / capacity, 1.0) if capacity else 1.0

    def blocks(self, pod: PodId) -> int:
        """Blocks the index believes `pod` holds."""
        lru = self._lru.get(pod)
        return len(lru) if lru else 0

    def _bit_of(self, pod: PodId) -> int:
        bit = self._bit.get(pod)
        if bit is None:
            # Reuse the bits of dropped pods, so masks stay as small as the fleet.
            bit = self._free_bits.pop() if self._free_bits else 1 << len(self._bit)
            self._bit[pod] = bit
            self._pod_of_bit[bit] = pod
        return bit

    def _record(self, matched: dict[PodId, int], bits: int, depth: int) -> None:
        while bits:
            low = bits & -bits
            matched[self._pod_of_bit[low]] = depth
            bits ^= low

    def _evict(self, pod: PodId) -> None:
        lru = self._lru.get(pod)
        if not lru:
            return
        limit = self.capacity(pod)
        bit = self._bit[pod]
        while len(lru) > limit:
            block, _ = lru.popitem(last=False)
            self._clear(block, bit)

    def _clear(self, block: BlockHash, bit: int) -> None:
        mask = self._holders.get(block, 0) & ~bit
        if mask:
            self._holders[block] = mask
        else:
            self._holders.pop(block, None)
