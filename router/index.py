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
        self._lru: dict[PodId, OrderedDict[BlockHash, bool]] = {}
        """Pod -> its blocks, least recently used first, each flagged once a
        request routed to the pod found it there (reused)."""
        self._reused: dict[PodId, int] = {}
        """Pod -> how many of its blocks are flagged reused."""
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

    def insert(self, pod: PodId, hashes: Sequence[BlockHash], *, reused: int = 0) -> None:
        """Record that `pod` now holds every block of `hashes`, most recently used.

        Args:
            pod: the pod.
            hashes: the prompt's block hash chain.
            reused: how many leading blocks of `hashes` a request routed to
                `pod` found there (the router's match); they are flagged as
                reused (`reused_share`). Confirmations that are no new request
                (KV events, other replicas' placements) pass 0 and leave flags
                as they are.

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
        keep = lru.setdefault
        hits = min(max(reused, 0), len(hashes))
        for block in reversed(hashes[hits:]):
            holders[block] = holders.get(block, 0) | bit
            keep(block, False)
            move(block)
        if hits:
            flagged = 0
            for block in reversed(hashes[:hits]):
                holders[block] = holders.get(block, 0) | bit
                if not lru.get(block, False):
                    flagged += 1
                lru[block] = True
                move(block)
            self._reused[pod] = self._reused.get(pod, 0) + flagged
        self._evict(pod)

    def remove(self, pod: PodId, hashes: Iterable[BlockHash]) -> None:
        """Forget that `pod` holds each block of `hashes` (its other blocks stay)."""
        lru = self._lru.get(pod)
        if not lru:
            return
        bit = self._bit[pod]
        for block in hashes:
            flag = lru.pop(block, None)
            if flag is not None:
                self._forget(pod, block, bit, flag)

    def remove_block(self, pod: PodId, block: BlockHash) -> bool:
        """Forget that `pod` holds the block whose chained hash is `block` (the engine evicted it).

        Blocks chained from it stay recorded: the engine may still hold them,
        and they match again once the block is back.

        Returns:
            Whether the index believed the pod held it.
        """
        lru = self._lru.get(pod)
        flag = lru.pop(block, None) if lru else None
        if flag is None:
            return False
        self._forget(pod, block, self._bit[pod], flag)
        return True

    def holds(self, pod: PodId, block: BlockHash) -> bool:
        """Whether the index believes `pod` holds the block `block` names."""
        lru = self._lru.get(pod)
        return bool(lru) and block in lru

    def remove_pod(self, pod: PodId) -> int:
        """`pod` left the table: forget what it holds and its capacity. Returns blocks dropped."""
        self._capacity.pop(pod, None)
        return self.drop_pod(pod)

    def drop_pod(self, pod: PodId) -> int:
        """Forget everything `pod` holds (it restarted, died or left). Returns blocks dropped."""
        lru = self._lru.pop(pod, None)
        self._reused.pop(pod, None)
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

    def reused_share(self, pod: PodId) -> float:
        """Share of `pod`'s KV capacity holding blocks a request came back for there (0..1).

        A block is counted from the first time a request routed to the pod
        finds it there until the pod evicts it: the part of the cache that
        has proved worth keeping, as opposed to blocks of prompts nobody has
        sent again (one-off prompts, first turns).
        """
        capacity = self.capacity(pod)
        return min(self._reused.get(pod, 0) / capacity, 1.0) if capacity else 1.0

    def eviction_price(self, pod: PodId) -> float:
        """What caching one more block on `pod` costs later, in blocks (0..2): `occupancy + reused_share`.

        The occupancy term is the block a full pod must evict (Preble's
        eviction cost); the reused term weighs how likely the evicted blocks
        are ones requests still come back for, so prompts that share nothing
        gather on pods whose caches hold other such prompts and leave the pods
        holding reused prefixes alone. O(1).
        """
        return self.occupancy(pod) + self.reused_share(pod)

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
            block, flag = lru.popitem(last=False)
            self._forget(pod, block, bit, flag)

    def _forget(self, pod: PodId, block: BlockHash, bit: int, flag: bool) -> None:
        """Bookkeeping for a block `pod` no longer holds (already out of its LRU)."""
        if flag:
            self._reused[pod] -= 1
        self._clear(block, bit)

    def _clear(self, block: BlockHash, bit: int) -> None:
        mask = self._holders.get(block, 0) & ~bit
        if mask:
            self._holders[block] = mask
        else:
            self._holders.pop(block, None)
