"""The prefix index: a radix tree over KV blocks recording which pods hold each prefix.

Keys are paths of chained block hashes (`kvcache.keys.chain_hashes`), so a node
at depth d names the first d blocks of a prompt, and a pod "holds" a node when
the engine has that block in its KV cache. The tree is a `pygtrie.Trie`; each
node's value maps pod -> True. Each pod also has an LRU of its nodes bounded
by the engine's KV capacity (`num_gpu_blocks`), evicted as vLLM would: when a
request finishes vLLM frees its blocks tail first, so the first block of a
prompt is the last to go. The index therefore forgets what the engine would
have dropped.

Entries are predicted: the router records a prompt's blocks on the pod it
sends it to. Where engines publish KV events, `router.kv_events` confirms them
with the same `insert` and forgets evicted blocks with `remove_block`.

The index is synchronous and never awaits, so it needs no locks. It is not
shared between gateway replicas.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import pygtrie

from kvcache.keys import BlockHash
from router.pods import PodId

Path = tuple[BlockHash, ...]


class PrefixIndex:
    """Which pod holds which block prefixes.

    Args:
        default_capacity: blocks a pod is assumed to hold until told otherwise.
    """

    def __init__(self, default_capacity: int = 4096) -> None:
        self._trie: pygtrie.Trie = pygtrie.Trie()
        self._lru: dict[PodId, OrderedDict[Path, None]] = {}
        self._capacity: dict[PodId, int] = {}
        self._default_capacity = default_capacity

    def set_capacity(self, pod: PodId, blocks: int) -> None:
        """Bound `pod` to `blocks` KV blocks, evicting its LRU blocks beyond that."""
        self._capacity[pod] = max(0, blocks)
        self._evict(pod)

    def capacity(self, pod: PodId) -> int:
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
        if not hashes:
            return matched
        alive: set[PodId] | None = None
        try:
            # walk_towards yields the root first, so the index is the depth.
            for depth, step in enumerate(self._trie.walk_towards(tuple(hashes))):
                if depth == 0:
                    continue
                holders = step.get()
                if not holders:
                    break
                alive = set(holders) if alive is None else alive.intersection(holders)
                if not alive:
                    break
                for pod in alive:
                    matched[pod] = depth
        except KeyError:
            pass  # the path leaves the tree: nothing deeper is held anywhere
        return matched

    def insert(self, pod: PodId, hashes: Sequence[BlockHash]) -> None:
        """Record that `pod` now holds every block of `hashes`, most recently used.

        Side effects: refreshes the pod's LRU (first block freshest, as vLLM
        frees a request's blocks tail first) and evicts beyond capacity.
        """
        if not hashes:
            return
        path = tuple(hashes)
        lru = self._lru.setdefault(pod, OrderedDict())
        self._trie.setdefault(path, {})  # creates every node on the way
        prefixes: list[Path] = []
        for depth, step in enumerate(self._trie.walk_towards(path)):
            if depth == 0:
                continue
            holders = step.get()
            if holders is None:
                holders = step.value = {}
            holders[pod] = True
            prefixes.append(path[:depth])
        for prefix in reversed(prefixes):
            lru[prefix] = None
            lru.move_to_end(prefix)
        self._evict(pod)

    def remove(self, pod: PodId, hashes: Sequence[BlockHash]) -> None:
        """Forget that `pod` holds the blocks whose chain ends at each of `hashes`' prefixes."""
        path = tuple(hashes)
        lru = self._lru.get(pod)
        if lru is None:
            return
        for depth in range(len(path), 0, -1):
            prefix = path[:depth]
            if prefix in lru:
                del lru[prefix]
                self._drop_holder(pod, prefix)

    def remove_block(self, pod: PodId, path: Sequence[BlockHash]) -> bool:
        """Forget that `pod` holds the one block ending `path` (the engine evicted it).

        Returns:
            Whether the index believed the pod held it.
        """
        prefix = tuple(path)
        lru = self._lru.get(pod)
        if not lru or prefix not in lru:
            return False
        del lru[prefix]
        self._drop_holder(pod, prefix)
        return True

    def drop_pod(self, pod: PodId) -> int:
        """Forget everything `pod` holds (it restarted, died or left). Returns blocks dropped."""
        lru = self._lru.pop(pod, None)
        if not lru:
            return 0
        for prefix in lru:
            self._drop_holder(pod, prefix)
        return len(lru)

    def occupancy(self, pod: PodId) -> float:
        """Share of `pod`'s KV capacity the index believes holds cached blocks (0..1)."""
        capacity = self.capacity(pod)
        return min(self.blocks(pod) / capacity, 1.0) if capacity else 1.0

    def blocks(self, pod: PodId) -> int:
        """Blocks the index believes `pod` holds."""
        lru = self._lru.get(pod)
        return len(lru) if lru else 0

    def _evict(self, pod: PodId) -> None:
        lru = self._lru.get(pod)
        if not lru:
            return
        limit = self.capacity(pod)
        while len(lru) > limit:
            prefix, _ = lru.popitem(last=False)
            self._drop_holder(pod, prefix)

    def _drop_holder(self, pod: PodId, prefix: Path) -> None:
        holders = self._trie.get(prefix)
        if holders is None:
            return
        holders.pop(pod, None)
        if not holders:
            # pygtrie prunes the emptied branch; nodes with children stay.
            del self._trie[prefix]
