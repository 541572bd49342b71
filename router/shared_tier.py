"""The shared KV tier as the router believes it: which prompt blocks the engines can load instead of computing.

Engines that run kvgate's tiered connector (`kvcache.vllm_connector`) save
every block they compute (not the ones they hit or load) to their L1 and,
behind the request, to the shared L2 nodes and L3, keyed by the same chained
hashes (`kvcache.keys`) the gateway hashes prompts with. Before computing a
prompt, an engine asks the store for the blocks beyond its own GPU hit and
loads the longest run of them, never the block holding the prompt's last
token. So a block any such engine computed is, until the shared tier evicts
it, loadable by every such engine.

`SharedTier` keeps that belief: a flat LRU of chained block hashes (the prefix
index's shape, `router.index`), bounded by `capacity_blocks`, fed from two
sources, each block remembering which fed it:

- `confirm`: the engines' KV events (`BlockStored`, `router.kv_events`): the
  engine holds the block now, so it computed or loaded it, so the store has it.
- `predict`: routing decisions: the pod the router picked is about to compute
  the prompt's blocks, and its connector will save them.

Which sources count when pricing is `router.settings.SharedTierSettings.feed`.
GPU evictions (`BlockRemoved`) are ignored on purpose: the shared tier
outlives the GPU.

`TierMatch` is one request's view: for a pod whose GPU holds the first `start`
blocks, how many more it can load, and what the whole uncached rest costs in
prefill-token units (loaded tokens at the learned ratio, `router.load_cost`,
the rest at one). `TierMetrics` counts, per pod, the tokens the belief
predicted each routed request would load (under every feed, so one run
compares them) next to the external hits the engine reports.

Not here: asking the cache nodes what they hold (the router speaks only the
key and event vocabulary of `kvcache`, never its protocol), each engine's own
L1 (priced like the shared tiers: loadable, at the same ratio, by every pod),
and the cost itself (`router.policies.kv_aware`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvcache.keys import BlockHash
from router.metrics import drop_series
from router.pods import EngineStats, Pod, PodId
from router.settings import SettingsError

Feed = Literal["events", "decisions", "both"]
Mode = Literal["auto", "on", "off"]

#: Which source fed a block (bit flags of a block's entry).
EVENTS = 1
DECISIONS = 2
FEED_MASKS: dict[str, int] = {"events": EVENTS, "decisions": DECISIONS, "both": EVENTS | DECISIONS}


class SharedTier:
    """Which blocks the shared KV cache holds, as the router believes.

    Args:
        capacity_blocks: blocks remembered at most (least recently stored go first).
        feed: which sources `TierMatch` counts.
    """

    def __init__(self, capacity_blocks: int = 262_144, feed: Feed = "events") -> None:
        if feed not in FEED_MASKS:
            raise SettingsError(f"shared_tier.feed must be events, decisions or both, got {feed!r}")
        self._blocks: OrderedDict[BlockHash, int] = OrderedDict()
        self.capacity = max(capacity_blocks, 0)
        self.mask = FEED_MASKS[feed]

    def __len__(self) -> int:
        return len(self._blocks)

    def confirm(self, hashes: Sequence[BlockHash]) -> None:
        """Blocks an engine reported storing (its KV events): the store has them."""
        self._add(hashes, EVENTS)

    def predict(self, hashes: Sequence[BlockHash]) -> None:
        """Blocks of a prompt just routed: the pod will compute and save them."""
        self._add(hashes, DECISIONS)

    def run(self, hashes: Sequence[BlockHash], start: int, stop: int, mask: int | None = None) -> int:
        """Consecutive blocks of `hashes[start:stop]` believed held, from `start`.

        Args:
            hashes: a prompt's block hash chain.
            start: the first block to look at (the pod's own GPU hit).
            stop: one past the last block that may be loaded.
            mask: the sources that count (`FEED_MASKS`); the configured feed by default.
        """
        mask = self.mask if mask is None else mask
        blocks = self._blocks
        count = 0
        for index in range(max(start, 0), min(stop, len(hashes))):
            if not blocks.get(hashes[index], 0) & mask:
                break
            count += 1
        return count

    def match(
        self, hashes: Sequence[BlockHash], prompt_tokens: int, block_size: int, load_ratio: float, uses: Callable[[Pod], bool]
    ) -> TierMatch:
        """One request's view of the shared tier (see `TierMatch`)."""
        return TierMatch(self, tuple(hashes), prompt_tokens, block_size, load_ratio, uses)

    def clear(self) -> None:
        """Forget every block (the shared cache was emptied)."""
        self._blocks.clear()

    def _add(self, hashes: Sequence[BlockHash], flag: int) -> None:
        blocks = self._blocks
        for block in hashes:
            blocks[block] = blocks.get(block, 0) | flag
            blocks.move_to_end(block)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


class TierMatch:
    """What the shared tier offers one request, and what its uncached tokens cost on a pod.

    Args:
        tier: the belief.
        hashes: the prompt's block hash chain.
        prompt_tokens: the prompt's length.
        block_size: tokens per block.
        load_ratio: cost of loading a token, in tokens computed (`router.load_cost`).
        uses: whether a pod loads from the shared cache at all.
    """

    __slots__ = ("_tier", "_hashes", "_limit", "_runs", "head", "block_size", "load_ratio", "uses")

    def __init__(
        self,
        tier: SharedTier,
        hashes: tuple[BlockHash, ...],
        prompt_tokens: int,
        block_size: int,
        load_ratio: float,
        uses: Callable[[Pod], bool],
    ) -> None:
        self._tier = tier
        self._hashes = hashes
        # The connector never loads the block holding the prompt's last token.
        self._limit = min(max(prompt_tokens - 1, 0) // block_size, len(hashes)) if block_size > 0 else 0
        self.block_size = block_size
        self.load_ratio = load_ratio
        self.uses = uses
        self.head = tier.run(hashes, 0, self._limit)
        """Blocks loadable from the prompt's start (by a pod holding none of it)."""
        self._runs: dict[int, int] = {}

    def loadable(self, start: int) -> int:
        """Blocks a pod whose GPU holds the first `start` blocks can load after them."""
        if start >= self._limit:
            return 0
        if start <= self.head:
            return self.head - start
        run = self._runs.get(start)
        if run is None:
            run = self._runs[start] = self._tier.run(self._hashes, start, self._limit)
        return run

    def loaded_tokens(self, pod: Pod, start: int, miss: int) -> int:
        """Of the `miss` tokens not on `pod`'s GPU (which holds `start` blocks), those it would load."""
        if not miss or not self.uses(pod):
            return 0
        return min(self.loadable(start) * self.block_size, miss)

    def work(self, pod: Pod, start: int, miss: int) -> float:
        """Prefill-token cost of the `miss` tokens not on `pod`'s GPU: loaded ones at `load_ratio`, the rest at 1."""
        loaded = self.loaded_tokens(pod, start, miss)
        return miss - (1.0 - self.load_ratio) * loaded if loaded else float(miss)

    def floor(self, prompt_tokens: int) -> float:
        """The least `work` of a pod holding none of the prompt on its GPU, whichever pod (a shortlist bound)."""
        loaded = min(self.head * self.block_size, prompt_tokens)
        return min(float(prompt_tokens), prompt_tokens - (1.0 - self.load_ratio) * loaded)

    def predicted(self, start: int, miss: int, mask: int) -> int:
        """Tokens the belief under sources `mask` expects a pod holding `start` blocks to load (for `TierMetrics`)."""
        run = self._tier.run(self._hashes, start, self._limit, mask) if start < self._limit else 0
        return min(run * self.block_size, miss)


class SharedCacheUse:
    """Which pods load from the shared cache: set by `mode`, or detected from their metrics.

    Args:
        mode: `SharedTierSettings.mode`.
    """

    def __init__(self, mode: Mode = "auto") -> None:
        if mode not in ("auto", "on", "off"):
            raise SettingsError(f"shared_tier.mode must be auto, on or off, got {mode!r}")
        self.mode = mode
        self._detected: set[PodId] = set()

    @property
    def active(self) -> bool:
        """Whether any pod may load from the shared cache (else requests are priced GPU-only)."""
        return self.mode == "on" or (self.mode == "auto" and bool(self._detected))

    def __call__(self, pod: Pod) -> bool:
        """Whether `pod` loads from the shared cache."""
        if self.mode != "auto":
            return self.mode == "on"
        stats = pod.stats
        return stats.external_queries > 0 or (stats.prefix_queries == 0 and bool(self._detected))

    def without(self, pod: Pod) -> bool:
        """Whether `pod` is known not to save to the shared cache (its stored blocks are not loadable elsewhere)."""
        if self.mode != "auto":
            return self.mode == "off"
        return pod.stats.prefix_queries > 0 and pod.stats.external_queries == 0

    def scraped(self, pod: PodId, stats: EngineStats) -> None:
        """Note a pod's fresh figures (it reports external queries: it runs a connector)."""
        if stats.external_queries > 0:
            self._detected.add(pod)
        else:
            self._detected.discard(pod)

    def forget(self, pod: PodId) -> None:
        self._detected.discard(pod)


class TierMetrics:
    """How often the router's belief of the shared cache is right, and the learned load ratio.

    `kvgate_shared_tier_predicted_tokens_total{pod, feed}` sums, over requests
    routed to the pod, the tokens the belief under each feed expected it to
    load; `kvgate_shared_tier_loaded_tokens_total{pod}` sums what the engine
    reports it loaded (`vllm:external_prefix_cache_hits_total` increases).
    Their ratio per feed, over the same interval, is the belief's accuracy.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.predicted = Counter(
            "kvgate_shared_tier_predicted_tokens",
            "Prompt tokens the router believed the chosen pod would load from the shared KV cache, per belief feed.",
            ["pod", "feed"],
            registry=registry,
        )
        self.loaded = Counter(
            "kvgate_shared_tier_loaded_tokens",
            "Prompt tokens the pod's engine reports it loaded from outside its GPU cache (external hits).",
            ["pod"],
            registry=registry,
        )
        self.blocks = Gauge(
            "kvgate_shared_tier_blocks", "Blocks the router believes the shared KV cache holds.", registry=registry
        )
        self.load_ratio = Gauge(
            "kvgate_load_cost_ratio", "Learned cost of loading one prompt token, in tokens computed.", registry=registry
        )

    def forget(self, pod: PodId) -> None:
        """`pod` left the table: drop its series."""
        drop_series(self.predicted, ("pod", "feed"), "pod", pod)
        drop_series(self.loaded, ("pod",), "pod", pod)

    def routed(self, pod: PodId, tiers: TierMatch, start: int, miss: int) -> None:
        """Count what each feed's belief predicts the routed request loads on `pod`."""
        for feed, mask in FEED_MASKS.items():
            self.predicted.labels(pod, feed).inc(tiers.predicted(start, miss, mask))

    def scraped(self, pod: PodId, before: EngineStats, after: EngineStats) -> None:
        """Count the external hits an engine reported since its last scrape."""
        gained = after.external_hits - before.external_hits
        if gained > 0:
            self.loaded.labels(pod).inc(gained)
