"""Sizes of a benchmark run: the full run and `--quick`.

A full run is sized so that cache pressure is real (more shared prefixes than
one engine's KV cache holds, conversations whose histories together exceed
the fleet's KV capacity) while each router's pass over the three workloads
takes a few minutes on a two-core machine. `--quick` keeps every router and
every figure but shrinks everything, so a smoke test finishes in a few
minutes.

Called by `kvgate.bench.cli`; every other module receives these values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvgate.bench.workloads import (
    MixedSpec,
    MultiTurnSpec,
    SharedCacheSpec,
    SharedPrefixSpec,
    SkewedUsersSpec,
    WorkloadSizes,
)


@dataclass(frozen=True, slots=True)
class OverheadSpec:
    """How the gateways are measured against the stub engine.

    Attributes:
        latency_requests: sequential requests per path (direct and via the
            gateway) for the added-latency percentiles.
        rate_step_s: seconds each concurrency level of the rate ladder runs.
        concurrency: the ladder of closed-loop client counts.
        min_gain: a level must beat the best rate so far by this fraction to
            count as growth; the ladder stops after two levels without growth.
        warmup_requests: requests sent before measuring each path.
    """

    latency_requests: int = 2000
    rate_step_s: float = 3.0
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    min_gain: float = 0.05
    warmup_requests: int = 200


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Everything that sizes one run.

    Attributes:
        engines: vLLM CPU engines started.
        kv_blocks: KV capacity of each engine, in blocks (`--num-gpu-blocks-override`).
        block_size: tokens per KV block (vLLM's CPU default).
        sizes: the workloads' sizes (and `max_model_len`).
        overhead: the stub-engine measurement.
        seed: seed of every workload.
        engine_start_timeout_s: seconds the engines may take to start (or an
            engine restarted mid-run to serve again); generous, because on a
            loaded two-core machine a start can take minutes.
        request_timeout_s: seconds one request may take before it fails.
        cache_nodes: L2 cache nodes of the shared-cache engine set (2, as
            `kvgate up` starts; L3 is a local directory).
    """

    engines: int
    kv_blocks: int
    sizes: WorkloadSizes
    overhead: OverheadSpec
    block_size: int = 128
    seed: int = 1
    engine_start_timeout_s: float = 900.0
    request_timeout_s: float = 300.0
    cache_nodes: int = 2

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus answer, in tokens."""
        return self.sizes.max_model_len

    def with_overrides(
        self, *, engines: int | None = None, kv_blocks: int | None = None, seed: int | None = None
    ) -> BenchConfig:
        """A copy with the given fields replaced (None keeps the value).

        A smaller KV capacity also lowers `max_model_len` to what fits in it
        (vLLM refuses to start when one longest request does not fit).
        """
        blocks = self.kv_blocks if kv_blocks is None else kv_blocks
        fits = (blocks - 1) * self.block_size
        sizes = self.sizes if self.sizes.max_model_len <= fits else replace(self.sizes, max_model_len=fits)
        return replace(
            self,
            engines=self.engines if engines is None else engines,
            kv_blocks=blocks,
            sizes=sizes,
            seed=self.seed if seed is None else seed,
        )


def full() -> BenchConfig:
    """The full run: 3 engines of 48 blocks (6,144 tokens) each.

    shared-prefix: 12 groups of a 1,024-token prompt (8 full blocks): one
    engine holds about 5 of them, the fleet about 16. multi-turn: 6
    conversations at a time, each growing to up to 32 blocks, against 144
    blocks in all. skewed-users: 24 clients for 60 s. mixed: 10 groups of a
    1,024-token prompt (80 blocks, more than one engine holds) under 64
    one-off prompts of 5 to 15 blocks each. shared-cache: 24
    documents of 1,024 tokens (9 blocks each with the template: 216 blocks
    against the fleet's 144) visited 3 times, 6 chats of 3 turns growing to
    about 12 blocks, a burst of 24 requests on one prefix (8 clients all on
    it), engine 0 restarted halfway: 114 requests.
    """
    return BenchConfig(
        engines=3,
        kv_blocks=48,
        sizes=WorkloadSizes(
            shared_prefix=SharedPrefixSpec(groups=12, requests_per_group=16, prefix_tokens=1024, clients=8),
            multi_turn=MultiTurnSpec(conversations=24, clients=6, max_turns=8),
            skewed_users=SkewedUsersSpec(light_users=6, heavy_clients=12, light_clients=2, duration_s=60.0),
            mixed=MixedSpec(groups=10, requests=160, prefix_tokens=1024, one_offs=64, one_off_tokens=1280, clients=8),
            shared_cache=SharedCacheSpec(
                documents=24, visits=3, prefix_tokens=1024, hot_requests=24, chats=6, turns=3, turn_tokens=192
            ),
            max_model_len=4096,
        ),
        overhead=OverheadSpec(),
    )


def quick() -> BenchConfig:
    """A small run for smoke tests: 2 engines of 24 blocks, a few dozen requests per workload.

    shared-cache: 10 documents of 512 tokens (5 blocks each: 50 against the
    fleet's 48) visited twice, 2 chats of 2 turns, 6 hot requests: 30 requests.
    """
    return BenchConfig(
        engines=2,
        kv_blocks=24,
        sizes=WorkloadSizes(
            shared_prefix=SharedPrefixSpec(
                groups=8, requests_per_group=3, prefix_tokens=512, question_tokens=32, max_tokens=16, clients=4
            ),
            multi_turn=MultiTurnSpec(conversations=4, clients=2, max_turns=4, max_tokens=16, scan=400),
            skewed_users=SkewedUsersSpec(
                light_users=3,
                heavy_clients=4,
                light_clients=1,
                duration_s=6.0,
                system_tokens=256,
                question_tokens=48,
                max_tokens=16,
                requests_per_client=40,
            ),
            mixed=MixedSpec(
                groups=4,
                requests=16,
                prefix_tokens=512,
                question_tokens=32,
                one_offs=8,
                one_off_tokens=512,
                max_tokens=16,
                clients=4,
            ),
            shared_cache=SharedCacheSpec(
                documents=10,
                visits=2,
                prefix_tokens=512,
                hot_requests=6,
                chats=2,
                turns=2,
                turn_tokens=96,
                question_tokens=16,
                max_tokens=8,
                clients=4,
            ),
            max_model_len=2048,
        ),
        overhead=OverheadSpec(latency_requests=300, rate_step_s=1.0, concurrency=(1, 8, 32), warmup_requests=50),
    )
