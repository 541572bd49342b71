"""`kv-aware` (default): the pod where this request's prefill costs least, its own wait and the others'.

Cost of pod p, in prompt tokens of prefill work (lower is better):

    cost(p) = work(p) x (1 + c x crowd(p)) + miss(p) x full(p) + pending(p) + d * decoding(p) + copy(p)

    miss(p)     = prompt tokens not cached on p: prompt - block_size x matched(p),
                  where matched(p) counts only if >= min_match_blocks
    work(p)     = prefill work of the miss: miss(p) - (1 - r) x loaded(p), where
                  loaded(p) = the tokens after p's GPU hit that the shared KV
                  cache holds (L1/L2/L3, `router.shared_tier`) and p's connector
                  would load, r = the learned cost of loading a token in tokens
                  computed (`router.load_cost`); work(p) = miss(p) when no pod
                  loads from a shared cache
    full(p)     = what caching a block on p costs later, in blocks (0..2,
                  `PrefixIndex.eviction_price`): p's occupancy (on a full pod,
                  caching the missing blocks evicts as many blocks of other
                  prefixes, which later requests recompute: Preble's eviction
                  cost; on an empty pod a miss costs only itself) plus the
                  share of p's capacity holding blocks requests came back for
                  there (how likely what it evicts is still in demand)
    pending(p)  = q x the uncached prompt tokens the gateway sent to p whose
                  first output token has not come back (queued prefill ahead
                  of us); q = queued_prefill_weight (1)
    decoding(p) = requests on p past their first token: the gateways' count
                  plus others(p)
    others(p)   = requests on p that no gateway of the fleet sent: the
                  engine's running + waiting at its last scrape less the
                  gateways' own count then (`EngineStats.others`; counted as
                  decoding)
    d           = prefill_tokens_per_decode: what one decode stream slows a
                  step down by, in prefill tokens
    crowd(p)    = requests on p: the fleet's gateways' count plus others(p)
    c           = prefill_delay_weight (1): what the work costs each of them
    copy(p)     = k x the work of blocks matched(p) to held, held = the longest
                  match any pod has: a prefix cached elsewhere and made again
                  on p is a second copy, priced k times what making it costs
                  (1 a token computed, r a token loaded); k = prefix_copy_weight

This is the Dynamo cost (prefill blocks not cached + active decode blocks) with
Preble's points that queued prefill is the real load and that a miss also
costs what it evicts: a pod holding the prefix wins until the work already
queued on it outweighs recomputing (and, on a full pod, displacing) the prefix
elsewhere, so a hot prefix spreads to a second pod instead of piling up, but
not at the first sign of a queue. With a shared KV cache the prefix need not
be recomputed elsewhere, only loaded (r x its length), so a busy holder
loses to an idle pod much sooner, and a chat whose history left every GPU
costs the same to load on any pod: the least loaded wins.

The crowd term prices what the request's prefill does to the others: every
request on the pod waits while it is computed (a decode stream's steps carry
its tokens; the requests queued behind it, and the next ones the same
clients send, start later). Pricing only the request's own wait, kv-aware
recomputed a prefix on any pod whose queue was a little shorter than the
holder's, and sent long new prompts onto the pod busy with many cheap cache
hits, holding all of them up. Measured on real engines (`kvgate bench`, one
run each unless noted), the engines' hit rate without the term / with it:
multi-turn 0.457 / 0.537 (seed 1) and 0.518 / 0.529 (seed 2, 2 repeats),
shared-prefix 0.792 / 0.797 and 0.742 / 0.768, mixed 0.422 / 0.413 (seed 3);
TTFT p50 moved by less than the runs' spread, either way. SGLang's
cache_aware, which never moves a prefix, stayed ahead on mixed (0.47-0.49) and
on multi-turn seed 2 (0.584) until the copy term (below). An idle pod has no crowd, so a hot prefix
still spreads to one when its holder's queue outweighs recomputing it there.

The copy term prices what leaving a prefix's holder does later. Recomputing
the prefix on a quieter pod pays for itself now, but the prefix then lives in
two caches, each serving half its requests: both copies grow colder and are
evicted sooner, and the next requests recompute it again. Replaying runs'
placements on modelled caches at their own timing (`kvgate.bench.lru_replay`),
each user pinned to one engine got 0.015 to 0.025 more hit rate on `mixed`
than kv-aware's own placement without the term. With it (k = 1), in the same
runs on the same engines (`kvgate bench`, seeds 1 and 2), the engines' hit
rate rose by 0.016 and 0.024 on mixed and 0.047 on shared-prefix, level on
multi-turn; k = 2 kept conversations too long on full pods (multi-turn 0.565
against 0.579) and is not the default. SGLang's cache_aware, which never
moves a prefix, is the other end.

Why others(p) and not the engine's count when it is higher: the engine's
count is as old as its last scrape (every 0.5 s, and a loaded engine takes
a few tenths of a second to serve its /metrics), so after a burst it still
shows requests the gateway has seen finish. Taking the higher of the two,
kv-aware priced a pod that had just emptied as holding four requests, and
sent prompts to busier ones. The gateways' own count is current; only the
rest of the engine's load is read from the scrape.

The reused share matters when shared prefixes are mixed with prompts nobody
sends again (one-off documents, first turns): priced by occupancy alone, every
full pod charges the same, so each one-off lands on the least loaded pod and
pushes out whichever prefix it held. Pricing the reused share too, one-offs
gather on the pods whose caches hold other one-offs, and the pods holding
reused prefixes keep them. (Pricing only the blocks at a pod's LRU end was
tried and lost hit rate: those are nearly always one-offs' blocks, so every
pod looked free to evict and prefixes lost their pull.)

Engines sharing cores (several on one host's CPUs) feel a prefill queued on
another engine almost as much as one queued on their own; the TTFT of
`mixed`'s grouped requests rose 0.7 to 1.2 times as much per one-off
computing elsewhere as per one-off on their own engine. Counting the queue
and the crowd at 0.3 there (q = c = 0.3) left prefixes on their holders:
on four shapes of traffic, hit rate and throughput at or above the
default's and TTFT p50 level with it overall, but 1.27 x on the one shape
where leaving a busy holder pays (docs/bench/studies.md, "Queued prefill
weighted for engines that share cores"). Not a default: q = c = 1 is the
model for engines with devices of their own.

Shortlist (large fleets, see `router.fleet_order`): a pod that holds no
prefix of the request (or fewer than min_match_blocks) costs

    work(p) x (1 + c x crowd(p)) + load(p) + prompt x full(p),   load(p) = pending(p) + d * decoding(p)

where neither full(p) nor load(p) depends on the request, the crowd factor is
at least 1 (the walk's bound leaves it out: it stays a lower bound, only
looser), and work(p) is at
least floor = min(prompt, prompt - (1 - r) x loaded from the prompt's start),
the same for every pod (r is one fleet-wide ratio; a pod that does not load
from the shared cache only costs more), so "prompt" below reads "floor". The fleet is kept
ordered by load(p) + S x full(p) for a few scales S (64, 256, 1024, ...
prompt tokens, made as prompt lengths need them); for a prompt between two
scales, its cost less the prompt is a fixed positive mix of those two keys on
every pod. So the policy prices the pods that hold a prefix, then walks the
two orderings in turn: every pod not yet visited costs at least prompt + the
mix of the last keys seen, and the walk stops once the best cost found is
below that bound. The choice is the full scan's argmin (Fagin's threshold
algorithm over two sorted lists), within the limits `router.fleet_order`
states (stale fullness, ties, the visit cap); a prompt near a scale is priced
almost by that ordering alone, so the walk is short.

NOTE: every ordering costs O(log n) per change of a pod's load; a workload
whose prompts run from 64 to 64k tokens keeps seven. Scales closer together
would shorten walks and add orderings to keep current.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from router.fleet_order import MAX_VISITS, TIE_CAP, FleetOrder, IndexOccupancy
from router.policies.base import PolicyDeps, RouteRequest
from router.pods import Pod


class KVAwarePolicy:
    name = "kv-aware"

    def __init__(self, deps: PolicyDeps) -> None:
        self._decode_cost = deps.settings.prefill_tokens_per_decode
        self._delay_weight = deps.settings.prefill_delay_weight
        self._min_match = deps.settings.min_match_blocks
        self._copy_weight = deps.settings.prefix_copy_weight
        self._queued_weight = deps.settings.queued_prefill_weight

    def costs(self, request: RouteRequest, pods: Sequence[Pod]) -> list[float]:
        held = self._held(request)
        return [self._cost(request, pod, held) for pod in pods]

    def load(self, pod: Pod) -> float:
        """The request-independent part of a pod's cost: q x queued prefill plus d x decoding."""
        return self._queued_weight * pod.fleet_pending_prefill + self._decode_cost * (pod.fleet_decoding + pod.stats.others)

    def shortlist(self, request: RouteRequest, fleet: FleetOrder, eligible: Callable[[Pod], bool]) -> list[Pod]:
        """The eligible pods of least cost, found without pricing the whole fleet (see the module docstring)."""
        priced: dict[Pod, float] = {}
        best = math.inf
        ties = 0
        held = self._held(request)
        for pod_id in request.matched_blocks:
            pod = fleet.pods.get(pod_id)
            if pod is not None and eligible(pod):
                cost = priced[pod] = self._cost(request, pod, held)
                best, ties = _better(cost, best, ties)
        prompt = max(request.prompt_tokens, 0)
        # A non-holder's work is at least `floor` (all it could load, loaded), whichever pod it is,
        # and it copies the whole held prefix.
        floor = prompt if request.tiers is None else request.tiers.floor(prompt)
        floor += self._copy_weight * self._copy_floor(request, held)
        names, weights = self._orderings(prompt, fleet, live=isinstance(request.occupancy, IndexOccupancy))
        last = [0.0] * len(names)  # the last key seen in each ordering
        for visits, (which, key, pod) in enumerate(fleet.walk(names), 1):
            last[which] = key
            if pod not in priced and eligible(pod):
                cost = priced[pod] = self._cost(request, pod, held)
                best, ties = _better(cost, best, ties)
            bound = floor + sum(w * k for w, k in zip(weights, last))
            slack = _SLACK * abs(bound)  # rounding must never make the bound exceed a cost
            if best < bound - slack or (best <= bound + slack and ties >= TIE_CAP):
                break  # nobody left is cheaper; or enough pods tie and nobody left is cheaper than them
            if visits >= MAX_VISITS and priced:
                break
        return [pod for pod, cost in priced.items() if cost <= best]

    def _orderings(self, prompt: int, fleet: FleetOrder, *, live: bool) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """The orderings whose weighted keys sum to every non-holder's cost less `prompt`.

        Ordering j sorts by load + S_j x fullness, S_j = 64 x 4^j prompt tokens
        (ordering "0" by load alone); a prompt of P tokens with S_lo < P <= S_hi
        costs, less P, lam x key_lo + (1 - lam) x key_hi with lam = (S_hi - P) /
        (S_hi - S_lo) on every pod, so walking those two bounds every unvisited
        pod. Orderings are made on first use: a fleet maintains only those its
        prompts' lengths need.
        """
        base = f"kv-aware:{self._decode_cost!r}:{self._queued_weight!r}"
        if not live or prompt == 0:
            # Fullness from another source than the index: only its lower bound 0 is safe.
            fleet.ordering(f"{base}:0", self.load)
            return (f"{base}:0",), (1.0,)
        high = _STEP_BASE
        while high < prompt:
            high *= _STEP_RATIO
        low = 0 if high == _STEP_BASE else high // _STEP_RATIO
        for scale in (low, high):
            fleet.ordering(f"{base}:{scale}", self._fullness_key(scale, fleet))
        lam = (high - prompt) / (high - low)
        return (f"{base}:{low}", f"{base}:{high}"), (lam, 1.0 - lam)

    def _fullness_key(self, scale: int, fleet: FleetOrder) -> Callable[[Pod], float]:
        def key(pod: Pod) -> float:
            return self.load(pod) + scale * fleet.occupancy(pod.id)

        return key

    def _held(self, request: RouteRequest) -> int:
        """The longest match any pod holds (counted from min_match_blocks), in blocks."""
        held = max(request.matched_blocks.values(), default=0)
        return held if held >= self._min_match else 0

    def _copy_work(self, request: RouteRequest, pod: Pod, matched: int, held: int) -> float:
        """The work of making blocks `matched`..`held` on `pod`: computed at 1 a token, loaded at the ratio."""
        tokens = (held - matched) * request.block_size
        return tokens if request.tiers is None else request.tiers.work(pod, matched, tokens)

    def _copy_floor(self, request: RouteRequest, held: int) -> float:
        """The least `_copy_work` of a pod holding none of the prompt on its GPU (a shortlist bound)."""
        tokens = held * request.block_size
        return tokens if request.tiers is None else request.tiers.floor(tokens)

    def _cost(self, request: RouteRequest, pod: Pod, held: int) -> float:
        matched = request.matched_blocks.get(pod.id, 0)
        if matched < self._min_match:
            matched = 0
        miss = max(request.prompt_tokens - matched * request.block_size, 0)
        evicts = miss * request.occupancy.get(pod.id, 0.0)
        work = miss if request.tiers is None else request.tiers.work(pod, matched, miss)
        copy = 0.0
        if held > matched and self._copy_weight:
            copy = self._copy_weight * self._copy_work(request, pod, matched, held)
        # `load` inlined: this runs once per pod on a full scan.
        others = pod.stats.others
        crowd = pod.fleet_in_flight + others
        decoding = pod.fleet_decoding + others
        cost = work * (1.0 + self._delay_weight * crowd) + evicts + self._queued_weight * pod.fleet_pending_prefill
        return cost + self._decode_cost * decoding + copy


#: The smallest fullness scale, in prompt tokens, and the ratio between scales.
_STEP_BASE = 64
_STEP_RATIO = 4
#: Relative slack taken off a walk's bound, far above float rounding and far below any real cost gap.
_SLACK = 1e-9


def _better(cost: float, best: float, ties: int) -> tuple[float, int]:
    """The new best cost and how many pods share it."""
    if cost < best:
        return cost, 1
    if cost == best:
        return best, ties + 1
    return best, ties
