"""The best prefix-cache hit rate a trace allows, computed from the trace alone.

Replay the prompts, in the order they were sent, against one infinite KV
cache shared by all engines. A prompt of n tokens hits on its leading full
blocks that some earlier prompt of the trace also had (same tokens from the
start, block for block: the same chained hash), including the earlier turns of
its own conversation. vLLM never serves a whole prompt from cache (it always
recomputes at least the last token), so hits are capped at
`floor((n - 1) / block_size)` blocks. Then the prompt's own full blocks join
the cache. The bound is

    sum(hit blocks x block_size) / sum(n)

which is what `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`
measures on the engines. No router can beat it: real engines have finite
caches, are several, and a block computed on one is not seen by another.
(Blocks of generated tokens are ignored: no prompt of our traces repeats
them.)

Called by `kvgate.bench.summary`; pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HitBound:
    """The bound and its parts.

    Attributes:
        hit_tokens: prompt tokens an infinite shared cache would serve.
        prompt_tokens: all prompt tokens of the trace.
    """

    hit_tokens: int
    prompt_tokens: int

    @property
    def rate(self) -> float:
        """hit_tokens / prompt_tokens (0 for an empty trace)."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def block_chain(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `tokens`: entry i names blocks 0..i.

    Python's hash of a tuple of ints is the same in every process (it does
    not depend on `PYTHONHASHSEED`), and 64 bits are ample for a trace.
    """
    chain: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        chain.append(parent)
    return chain


def hit_bound(prompts: Iterable[Sequence[int]], block_size: int) -> HitBound:
    """The infinite-shared-cache hit bound of prompts sent in this order.

    Args:
        prompts: token ids of each prompt, in send order.
        block_size: tokens per KV block of the engines.

    Returns:
        Hit and prompt token totals.

    Raises:
        ValueError: a block size below 1.
    """
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    seen: set[int] = set()
    hits = total = 0
    for tokens in prompts:
        chain = block_chain(tokens, block_size)
        cap = max(len(tokens) - 1, 0) // block_size
        matched = 0
        for key in chain[:cap]:
            if key not in seen:
                break
            matched += 1
        hits += matched * block_size
        total += len(tokens)
        seen.update(chain)
    return HitBound(hit_tokens=hits, prompt_tokens=total)
