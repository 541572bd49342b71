"""`kv-aware` (default): the pod where this request will finish its prefill soonest.

Cost of pod p, in prompt tokens of prefill work (lower is better):

    cost(p) = miss(p) x (1 + full(p)) + pending(p) + d * decoding(p)

    miss(p)     = prompt tokens not cached on p: prompt - block_size x matched(p),
                  where matched(p) counts only if >= min_match_blocks
    full(p)     = share of p's KV capacity holding cached blocks (0..1): on a
                  full pod, caching the missing blocks evicts as many blocks of
                  other prefixes, which later requests recompute (Preble's
                  eviction cost); on an empty pod a miss costs only itself
    pending(p)  = uncached prompt tokens the gateway sent to p whose first
                  output token has not come back (queued prefill ahead of us)
    decoding(p) = requests on p past their first token: the gateway's count,
                  or, if higher, the engine's running + waiting less the
                  gateway's requests still in prefill (others' traffic counts)
    d           = prefill_tokens_per_decode: what one decode stream slows a
                  step down by, in prefill tokens

This is the Dynamo cost (prefill blocks not cached + active decode blocks) with
Preble's points that queued prefill is the real load and that a miss also
costs what it evicts: a pod holding the prefix wins until the work already
queued on it outweighs recomputing (and, on a full pod, displacing) the prefix
elsewhere, so a hot prefix spreads to a second pod instead of piling up, but
not at the first sign of a queue.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.policies.base import PolicyDeps, RouteRequest
from router.pods import Pod


class KVAwarePolicy:
    name = "kv-aware"

    def __init__(self, deps: PolicyDeps) -> None:
        self._decode_cost = deps.settings.prefill_tokens_per_decode
        self._min_match = deps.settings.min_match_blocks

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        costs = []
        for pod in pods:
            matched = request.matched_blocks.get(pod.id, 0)
            if matched < self._min_match:
                matched = 0
            miss = max(request.prompt_tokens - matched * request.block_size, 0)
            engine_load = pod.stats.running + pod.stats.waiting
            decoding = max(pod.fleet_decoding, engine_load - (pod.fleet_in_flight - pod.fleet_decoding))
            evicts = miss * request.occupancy.get(pod.id, 0.0)
            costs.append(miss + evicts + pod.fleet_pending_prefill + self._decode_cost * max(decoding, 0))
        return costs
