"""The engine sets a benchmark compares routers on, and the order its runs go in.

Two sets of the same engines (count, KV capacity, model):

- `plain`: each engine with only its own prefix cache, what users of the
  other routers run. Started once and reused: between runs the engines'
  prefix caches are reset (`fleet`).
- `shared`: the engines wired to kvgate's shared KV cache exactly as
  `kvgate up` wires them (`kvgate.cache_tiers.CacheTiers`: L2 cache nodes, L3
  in a local directory, the `kvcache.vllm_connector` on every engine), so a
  block one engine computed, or lost, can be loaded instead of recomputed.
  Its tiers cannot be emptied in place (L1 lives in the engines, L2 in the
  nodes), so every run gets a new set: fresh nodes, a fresh L3 directory and
  engines started again; no run inherits another's blocks.

Only one set runs at a time (two would compete for the same two cores and
memory). `schedule` puts every router/engine-set combination `repeats` times
in an order that shifts each repeat, so no router and no set always runs
first (early runs meet a cooler machine and fresher page caches).

Called by `kvgate.bench.runner`; the CLI checks set names with `parse_engine_sets`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import aiohttp

from kvgate.bench.fleet import EngineFleet, FleetSpec
from kvgate.cache_tiers import CacheTiers
from kvgate.model import SERVED_MODEL_NAME

T = TypeVar("T")

#: Engine set names, in report order.
ENGINE_SETS: tuple[str, ...] = ("plain", "shared")

#: Sets that are started anew for every run (their caches cannot be reset in place).
FRESH_PER_RUN = frozenset({"shared"})


def parse_engine_sets(names: Sequence[str]) -> list[str]:
    """Check engine set names, keeping order and dropping repeats.

    Raises:
        ValueError: an unknown name or none at all.
    """
    unknown = [name for name in names if name not in ENGINE_SETS]
    if unknown:
        raise ValueError(f"unknown engine sets {', '.join(unknown)}; known: {', '.join(ENGINE_SETS)}")
    if not names:
        raise ValueError("at least one engine set is needed")
    return list(dict.fromkeys(names))


def row_label(router: str, engine_set: str) -> str:
    """How a report names a router on an engine set: the router alone on plain engines, else `router@set`."""
    return router if engine_set == "plain" else f"{router}@{engine_set}"


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """`items` starting at index `shift` (modulo their number), wrapping around."""
    if not items:
        return []
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


@dataclass(frozen=True, slots=True)
class Block:
    """A stretch of runs on one engine set within one repeat.

    Attributes:
        repeat: which repeat (from 0).
        engine_set: the set the runs use.
        order: positions of the routers, in the order they run (indexes into
            the routers given to `schedule`).
    """

    repeat: int
    engine_set: str
    order: tuple[int, ...]


def schedule(routers: int, engine_sets: Sequence[str], repeats: int) -> list[Block]:
    """The order of the runs: per repeat, each engine set with each router once.

    Repeat r starts at engine set r and at router r (both modulo their
    number), wrapping around, so with N repeats of K routers each router runs
    first in N/K of them (rounded) and never always.

    Args:
        routers: how many routers are compared.
        engine_sets: the sets, in report order.
        repeats: how many times every combination runs.

    Returns:
        The blocks, in run order; each (engine set, router) pair appears
        `repeats` times overall.
    """
    indexes = list(range(routers))
    return [
        Block(repeat=r, engine_set=name, order=tuple(rotated(indexes, r)))
        for r in range(repeats)
        for name in rotated(list(engine_sets), r)
    ]


class EngineSets:
    """Starts the engine set a run needs, reusing the running one when it may.

    Args:
        spec: the engines (its `name` is set per set, and the `shared` set's
            connector arguments are added to its `engine_args`).
        start_timeout_s: seconds engines and cache nodes may take to start.
        cache_nodes: L2 cache nodes of the `shared` set.
    """

    def __init__(self, spec: FleetSpec, *, start_timeout_s: float, cache_nodes: int = 2) -> None:
        self._spec = spec
        self._timeout = start_timeout_s
        self._cache_nodes = cache_nodes
        self.fleet: EngineFleet | None = None
        self._tiers: CacheTiers | None = None
        self._state_dir: Path | None = None
        self.ready_s: list[float] = []

    async def use(self, engine_set: str, http: aiohttp.ClientSession, warm_up_prompt: str) -> tuple[EngineFleet, bool]:
        """The running fleet of `engine_set`, started (and warmed up) first when needed.

        Returns:
            The fleet, and whether it was started by this call.

        Raises:
            kvgate.engines.EngineError: an engine failed to start.
            kvgate.bench.fleet.FleetError: an engine refused its warm-up.
            TimeoutError: a cache node did not come up.
        """
        if self.fleet is not None and self.fleet.spec.name == engine_set and engine_set not in FRESH_PER_RUN:
            return self.fleet, False
        await asyncio.to_thread(self.stop)
        engine_args = self._spec.engine_args
        if engine_set == "shared":
            self._state_dir = Path(tempfile.mkdtemp(prefix="kvgate-bench-cache-"))
            self._tiers = CacheTiers(
                self._state_dir, nodes=self._cache_nodes, redis_url=None, model=SERVED_MODEL_NAME
            )
            engine_args += tuple(await self._tiers.start())
        fleet = EngineFleet(replace(self._spec, name=engine_set, engine_args=engine_args))
        self.fleet = fleet
        self.ready_s = await fleet.start(timeout=self._timeout)
        await fleet.warm_up(http, warm_up_prompt)
        return fleet, True

    def stop(self) -> None:
        """Stop the running set: engines, then cache nodes (their blocks are dropped, not handed off)."""
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
        if self._tiers is not None:
            self._tiers.stop(grace=5.0)
            self._tiers = None
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None
