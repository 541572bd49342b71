"""The hit rate a placement gets from finite engine caches, replayed on a run's own timeline.

Engines' hit rates move by several points between runs of the same router
(SGLang's on `mixed` from 0.466 to 0.505), more than most routing changes
move them. Replaying a run instead takes the timing out of the comparison:
every request keeps the time it was sent and the time it finished, and only
the engine it went to changes, so two placements are compared on the same
timeline.

Each engine is modelled as vLLM's prefix cache is kept (`KVCacheManager`,
`BlockPool`): `kv_blocks - 1` usable blocks (one is vLLM's null block); a
request, when sent, hits on the leading full blocks of its prompt the engine
holds (at most `floor((n - 1) / block_size)`: the last token is always
computed), and takes new blocks for the rest of its prompt and its answer
from the head of the free queue, evicting whatever those held; when it
finishes its blocks return to the tail of the free queue in reverse order,
so a request's last blocks are evicted first. Blocks in use are never
evicted. The model does not queue: a request that finds too few free blocks
is counted (`overcommitted`) and given what is free.

Placements to compare with the recorded one:
- `pinned`: every user's requests on the engine of its first request.
- `cache_aware`: SGLang's rule, on block hashes instead of characters: the
  engine whose routed prompts share the longest prefix with this one when
  that covers more than half of it, else the engine that has been routed
  the fewest distinct blocks.
- `partitioned`: a placement told in advance what no router knows, which
  users send once: those users and the busiest user on engine 0, every
  other user on one of the other engines, dealt by request count. A prefix
  requested often survives the churn of prompts sent once; rarer ones are
  kept away from it. A reference for how far placement alone could go, not
  a rule to route by (on real engines it also piles load on engine 0).

Not here: building the traces (`kvgate.bench.workloads`), the infinite-cache
bound (`kvgate.bench.bound`); `scripts/replay_placement.py` runs it on a
results folder.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Placed:
    """One request of a run, as the replay needs it.

    Attributes:
        user: who sent it (`pinned` keys on it).
        chain: chained hashes of its prompt's full blocks (`bound.block_chain`).
        prompt_tokens: its prompt's length.
        max_tokens: tokens it generated (their blocks are taken too).
        engine: where it went (an index).
        sent_s: when it was sent.
        done_s: when it finished.
    """

    user: str
    chain: tuple[int, ...]
    prompt_tokens: int
    max_tokens: int
    engine: int
    sent_s: float
    done_s: float


@dataclass(frozen=True, slots=True)
class Replay:
    """What the modelled caches served.

    Attributes:
        hit_tokens: prompt tokens served from an engine's cache.
        prompt_tokens: all prompt tokens.
        overcommitted: requests that found fewer free blocks than they needed.
    """

    hit_tokens: int
    prompt_tokens: int
    overcommitted: int

    @property
    def rate(self) -> float:
        """hit_tokens / prompt_tokens (0 for an empty run)."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class _Engine:
    """One engine's block pool: a free queue in eviction order, and the hashes it holds."""

    def __init__(self, blocks: int) -> None:
        self.free: OrderedDict[int, int | None] = OrderedDict((b, None) for b in range(blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.refs: dict[int, int] = {}  # block id -> requests using it
        self.hashes: dict[int, int | None] = {}  # block id -> its hash, while in use

    def start(
        self, chain: Sequence[int], prompt_tokens: int, needed: int, block_size: int
    ) -> tuple[int, list[int], bool]:
        """Take `needed` blocks for a request: its hit blocks, the blocks it holds, and whether some were missing."""
        hit = 0
        cap = min(len(chain), max(prompt_tokens - 1, 0) // block_size)
        while hit < cap and chain[hit] in self.cached:
            hit += 1
        held = [self._use(self.cached[h]) for h in chain[:hit]]
        short = False
        for index in range(hit, needed):
            full = index < len(chain)
            if full and chain[index] in self.cached:  # cached meanwhile by a request sent with it: share it
                held.append(self._use(self.cached[chain[index]]))
                continue
            if not self.free:
                short = True
                break
            block, old = self.free.popitem(last=False)
            if old is not None:
                del self.cached[old]
            self.hashes[block] = chain[index] if full else None
            if full:
                self.cached[chain[index]] = block
            held.append(self._use(block))
        return hit, held, short

    def finish(self, held: Sequence[int]) -> None:
        """Return a request's blocks, its last ones first (they are evicted first)."""
        for block in reversed(held):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                del self.refs[block]
                self.free[block] = self.hashes.pop(block)

    def _use(self, block: int) -> int:
        if block in self.free:
            self.hashes[block] = self.free.pop(block)
        self.refs[block] = self.refs.get(block, 0) + 1
        return block


def replay(requests: Sequence[Placed], engines: int, kv_blocks: int, block_size: int) -> Replay:
    """Replay `requests` on `engines` modelled caches of `kv_blocks` blocks each (see the module docstring)."""
    pools = [_Engine(max(kv_blocks - 1, 0)) for _ in range(engines)]
    events = sorted(
        [(r.sent_s, 1, i) for i, r in enumerate(requests)] + [(r.done_s, 0, i) for i, r in enumerate(requests)]
    )
    holding: dict[int, list[int]] = {}
    hit_tokens = prompt_tokens = overcommitted = 0
    for _, starts, i in events:
        request = requests[i]
        pool = pools[request.engine]
        if not starts:
            pool.finish(holding.pop(i, []))
            continue
        needed = math.ceil((request.prompt_tokens + request.max_tokens) / block_size)
        hit, holding[i], short = pool.start(request.chain, request.prompt_tokens, needed, block_size)
        hit_tokens += hit * block_size
        prompt_tokens += request.prompt_tokens
        overcommitted += short
    return Replay(hit_tokens, prompt_tokens, overcommitted)


def pinned(requests: Sequence[Placed]) -> list[Placed]:
    """Every user's requests on the engine its first request went to."""
    home: dict[str, int] = {}
    ordered = sorted(range(len(requests)), key=lambda i: requests[i].sent_s)
    out = list(requests)
    for i in ordered:
        out[i] = replace(requests[i], engine=home.setdefault(requests[i].user, requests[i].engine))
    return out


def cache_aware(requests: Sequence[Placed], engines: int, threshold: float = 0.5) -> list[Placed]:
    """SGLang's cache_aware rule on block hashes, in the order requests were sent (see the module docstring)."""
    routed: list[set[int]] = [set() for _ in range(engines)]
    out = list(requests)
    for i in sorted(range(len(requests)), key=lambda i: requests[i].sent_s):
        chain = requests[i].chain
        matches = []
        for seen in routed:
            n = 0
            while n < len(chain) and chain[n] in seen:
                n += 1
            matches.append(n)
        best = max(range(engines), key=lambda e: matches[e])
        if not chain or matches[best] / len(chain) <= threshold:
            best = min(range(engines), key=lambda e: len(routed[e]))
        routed[best].update(chain)
        out[i] = replace(requests[i], engine=best)
    return out


def partitioned(requests: Sequence[Placed], engines: int) -> list[Placed]:
    """Users sending once and the busiest user on engine 0, the others dealt over the rest (see the module docstring)."""
    counts = Counter(request.user for request in requests)
    repeat = sorted((user for user, n in counts.items() if n > 1), key=lambda user: (-counts[user], user))
    home = {user: 0 for user, n in counts.items() if n == 1}
    if repeat:
        home[repeat[0]] = 0
    for k, user in enumerate(repeat[1:]):
        home[user] = 1 + k % (engines - 1) if engines > 1 else 0
    return [replace(request, engine=home[request.user]) for request in requests]
