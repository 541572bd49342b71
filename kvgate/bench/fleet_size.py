"""The fleet-size section of `kvgate bench`: one gateway's routing work against fleets of 10 to 10,000 pods.

No engines and no HTTP: everything runs in this process on the gateway's real
parts, so the figures are the gateway's own per-request cost as the fleet
grows. For each fleet size it measures:

- decision time: the prefix index's match, the `kv-aware` policy and the
  router's accounting and insert (`Router.try_acquire`), per request, on a
  loaded fleet (a window of requests in flight, engine figures changing as
  scrapes would change them, 2,000 shared prefixes, 16-token blocks); once
  as the router decides (shortlisted above 32 pods) and once pricing every
  pod from a per-request copy of the pods' occupancy (the scan it replaced;
  the copy itself untimed), on the same state;
- KV event ingestion: a synthetic publisher standing in for that many engines
  sends vLLM-shaped batches (`BlockStored` of a shared prefix and a fresh
  tail, `BlockRemoved` of an older tail), msgpack-encoded; the gateway decodes
  and applies them (`decode_batch`, `EngineBlocks.sequence/apply`), as its
  listener does per frame, less the socket;
- the prefix index's memory (tracemalloc) per million resident blocks (a
  block held by two pods counts twice), filled with shared prefixes and
  unique tails spread over the fleet.

Called by `kvgate bench --fleet-sim` and `scripts/bench_fleet.py`; writes
`fleet-size.json`, `fleet-size.md` and `fleet-size.png` to the results folder.
Not here: the engine benchmark (`runner`), the gateways' HTTP overhead (`overhead`).
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack

from kvcache.keys import chain_hashes, hash_block
from router.fairness import VirtualTokenCounters
from router.fleet_order import IndexOccupancy
from router.index import PrefixIndex
from router.kv_events import EngineBlocks, decode_batch
from router.metrics import GatewayMetrics
from router.pods import EngineStats, PodId, PodSet, UserId
from router.policies import PolicyBook, PolicyDeps, RouteRequest
from router.routing import Router
from router.settings import AdmissionSettings, RoutingSettings

BLOCK = 16
POLICY = "kv-aware"


@dataclass(frozen=True, slots=True)
class FleetSimSettings:
    """What the simulation runs."""

    sizes: tuple[int, ...] = (10, 100, 1_000, 10_000)
    """Fleet sizes, in pods (default 10 to 10,000)."""
    decisions: int = 3_000
    """Timed decisions per fleet size, shortlisted (default 3,000: enough for a p99)."""
    full_scan_decisions: int = 600
    """Timed decisions per size pricing every pod (default 600; the slow path at 10,000 pods)."""
    prefixes: int = 2_000
    """Shared prefixes requests draw from (default 2,000)."""
    prefix_blocks: int = 16
    """Blocks of each shared prefix (default 16: 256 tokens; each request adds a 16 to 64 token tail)."""
    in_flight_per_pod: float = 2.0
    """Requests in flight per pod during the run (default 2), capped at 4,000 in all."""
    event_batches: int = 20_000
    """KV event batches the synthetic publishers send, over all engines (default 20,000)."""
    memory_blocks: int = 200_000
    """Resident blocks the memory measurement fills the index with (default 200,000)."""
    rounds: int = 3
    """Times each fleet size's decisions are measured afresh; figures are the median round (default 3)."""
    seed: int = 1

    @classmethod
    def quick(cls) -> FleetSimSettings:
        """A run of about a minute."""
        return cls(decisions=1_000, full_scan_decisions=200, event_batches=5_000, memory_blocks=50_000, rounds=1)


@dataclass(frozen=True, slots=True)
class SizeResult:
    """Figures for one fleet size (times in microseconds)."""

    pods: int
    decision_p50_us: float
    decision_p99_us: float
    decision_p99_low_us: float
    """The lowest p99 of the rounds (the median round's is `decision_p99_us`)."""
    decision_p99_high_us: float
    decision_cpu_p99_us: float
    """p99 of the CPU time the decision took (this thread only): the p99 less time descheduled."""
    full_scan_p50_us: float
    full_scan_p99_us: float
    events_per_s: float
    blocks_per_s: float
    index_bytes_per_million_blocks: float


@dataclass(slots=True)
class FleetSimResult:
    """Every size's figures, and what produced them."""

    settings: FleetSimSettings
    sizes: list[SizeResult] = field(default_factory=list)


def _summary(wall: Sequence[float], cpu: Sequence[float], full: Sequence[float]) -> tuple[float, ...]:
    """(p50, p99, CPU p99, full-scan p50, full-scan p99), in microseconds."""
    return (
        statistics.median(wall) * 1e6,
        _percentile(wall, 0.99) * 1e6,
        _percentile(cpu, 0.99) * 1e6,
        statistics.median(full) * 1e6,
        _percentile(full, 0.99) * 1e6,
    )


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Prompts:
    """Precomputed block-hash chains: a shared prefix and a unique tail each."""

    def __init__(self, settings: FleetSimSettings, rng: random.Random, count: int = 4_000) -> None:
        prefixes = [[rng.randrange(1 << 30) for _ in range(settings.prefix_blocks * BLOCK)] for _ in range(settings.prefixes)]
        self.hashes = []
        for _ in range(count):
            tokens = rng.choice(prefixes) + [rng.randrange(1 << 30) for _ in range(rng.randint(16, 64))]
            self.hashes.append((len(tokens), tuple(chain_hashes(tokens, BLOCK))))
        self._rng = rng

    def draw(self) -> tuple[int, tuple]:
        return self._rng.choice(self.hashes)


def measure_decisions(
    pods_n: int, settings: FleetSimSettings, prompts: _Prompts
) -> tuple[list[float], list[float], list[float]]:
    """Decision times (seconds) on a loaded fleet of `pods_n` pods: as the router decides, then pricing every pod.

    Returns:
        (wall-clock times, CPU times, full-scan wall-clock times).
    """
    rng = random.Random(settings.seed)
    pods = PodSet(f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:8000" for i in range(pods_n))
    index = PrefixIndex()
    counters = VirtualTokenCounters()
    router = Router(pods, index, counters, AdmissionSettings(max_inflight_per_pod=64), GatewayMetrics(), rng)
    policy = PolicyBook(PolicyDeps(RoutingSettings(block_size=BLOCK), counters, rng)).get(POLICY)
    table = list(pods)
    for pod in table:
        pod.stats = EngineStats(running=rng.randint(0, 8), waiting=rng.randint(0, 2))
    window = max(1, min(int(settings.in_flight_per_pod * pods_n), 4_000))
    leases: deque = deque()

    def decide(snapshot: bool = False) -> tuple[float, float]:
        prompt_tokens, hashes = prompts.draw()
        # The scan this replaced read a copy of every pod's occupancy, made per
        # request before routing; as in the figures it was judged by, the copy is not timed.
        occupancy = {pod.id: index.eviction_price(pod.id) for pod in table} if snapshot else None
        started = time.perf_counter()
        on_cpu = time.thread_time()
        request = RouteRequest(
            user=UserId("bench"),
            model="tiny",
            prompt_tokens=prompt_tokens,
            block_size=BLOCK,
            block_hashes=hashes,
            matched_blocks=index.match(hashes),
            occupancy=occupancy if occupancy is not None else IndexOccupancy(index.eviction_price, pods),
        )
        lease = router.try_acquire(request, policy, POLICY)
        elapsed = time.perf_counter() - started, time.thread_time() - on_cpu
        if lease is not None:
            leases.append(lease)
        # The rest of the traffic, untimed: first tokens, finishes, one scrape.
        if len(leases) > window // 2:
            leases[window // 2].first_token()
        while len(leases) > window:
            leases.popleft().release()
        pod = table[rng.randrange(pods_n)]
        pod.stats = EngineStats(running=rng.randint(0, 8), waiting=rng.randint(0, 2))
        return elapsed

    for _ in range(window + 500):
        decide()
    gc.collect()
    shortlisted = [decide() for _ in range(settings.decisions)]
    router.shortlist_above = pods_n + 1
    full = [decide(snapshot=True)[0] for _ in range(settings.full_scan_decisions)]
    while leases:
        leases.popleft().release()
    return [wall for wall, _ in shortlisted], [cpu for _, cpu in shortlisted], full


def _synthetic_batches(engines: int, settings: FleetSimSettings, rng: random.Random) -> list[tuple[int, int, bytes]]:
    """vLLM-shaped event batches from `engines` publishers: (engine, sequence, payload)."""
    prefixes = [[rng.randrange(1 << 30) for _ in range(4 * BLOCK)] for _ in range(settings.prefixes)]
    frames = []
    tails: dict[int, deque] = {}
    next_hash = 1 << 40
    for n in range(settings.event_batches):
        engine = n % engines
        seq = n // engines
        j = rng.randrange(len(prefixes))
        prefix_hashes = [hash((engine, j, k)) & ((1 << 63) - 1) for k in range(4)]
        tail_hashes = list(range(next_hash, next_hash + 4))
        next_hash += 4
        tokens = prefixes[j] + [rng.randrange(1 << 30) for _ in range(4 * BLOCK)]
        events = [
            {"type": "BlockStored", "block_hashes": prefix_hashes + tail_hashes, "parent_block_hash": None,
             "token_ids": tokens, "block_size": BLOCK, "lora_id": None, "medium": "GPU"},
        ]
        old = tails.setdefault(engine, deque())
        old.append(tail_hashes)
        if len(old) > 8:
            events.append({"type": "BlockRemoved", "block_hashes": old.popleft(), "medium": "GPU"})
        frames.append((engine, seq, msgpack.packb([time.time(), events, None])))
    return frames


def measure_ingestion(engines: int, settings: FleetSimSettings) -> tuple[float, float]:
    """Events and blocks per second one gateway applies from `engines` publishers.

    Returns:
        (events per second, blocks per second).
    """
    rng = random.Random(settings.seed)
    frames = _synthetic_batches(engines, settings, rng)
    index = PrefixIndex()
    sinks = [EngineBlocks(PodId(f"http://engine-{i}:8000"), index, BLOCK) for i in range(engines)]
    events = blocks = 0
    gc.collect()
    started = time.perf_counter()
    for engine, seq, payload in frames:
        batch = decode_batch(payload)
        sink = sinks[engine]
        sink.sequence(seq)
        sink.apply(batch)
        events += len(batch)
        blocks += sum(len(e["block_hashes"]) for e in batch)
    elapsed = time.perf_counter() - started
    return events / elapsed, blocks / elapsed


def measure_memory(pods_n: int, settings: FleetSimSettings, prompts: _Prompts) -> float:
    """Bytes the prefix index takes per million resident blocks, filled over `pods_n` pods.

    Each insert is a shared prefix with a fresh two-block tail, on a pod in
    turn, until `settings.memory_blocks` blocks are resident. The count is
    worked out from the schedule (a prefix is new on a pod once; a tail always
    is), so only the index's `insert` is used.
    """
    rng = random.Random(settings.seed)
    pod_ids = [PodId(f"http://engine-{i}:8000") for i in range(pods_n)]
    # The prompts' distinct shared prefixes (prompts drawn from one share it).
    prefixes = list(dict.fromkeys(hashes[: settings.prefix_blocks] for _, hashes in prompts.hashes))
    schedule: list[tuple[PodId, int]] = []
    placed: set[tuple[int, int]] = set()
    resident = 0
    while resident < settings.memory_blocks:
        pod, k = len(schedule) % pods_n, rng.randrange(len(prefixes))
        if (pod, k) not in placed:
            placed.add((pod, k))
            resident += len(prefixes[k])
        resident += 2
        schedule.append((pod_ids[pod], k))
    del placed
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = PrefixIndex(default_capacity=1 << 30)
        for pod_id, k in schedule:
            prefix = prefixes[k]
            tail = hash_block(prefix[-1], [rng.randrange(1 << 30) for _ in range(BLOCK)])
            index.insert(pod_id, prefix + (tail, hash_block(tail, [rng.randrange(1 << 30) for _ in range(BLOCK)])))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del index
    return used / resident * 1_000_000


def _print(line: str) -> None:
    print(line, flush=True)


def run(settings: FleetSimSettings, out: Path, *, log: Callable[[str], None] = _print) -> FleetSimResult:
    """Measure every fleet size and write the figures and plots to `out`.

    Args:
        settings: what to run.
        out: the results folder (created if missing).
        log: progress lines.

    Returns:
        The figures (also written as `fleet-size.json` and `fleet-size.md`).
    """
    out.mkdir(parents=True, exist_ok=True)
    result = FleetSimResult(settings)
    prompts = _Prompts(settings, random.Random(settings.seed))
    for pods_n in settings.sizes:
        rounds = sorted(
            (_summary(*measure_decisions(pods_n, settings, prompts)) for _ in range(max(1, settings.rounds))),
            key=lambda r: r[1],
        )
        p50, p99, cpu_p99, full_p50, full_p99 = rounds[len(rounds) // 2]
        events_s, blocks_s = measure_ingestion(pods_n, settings)
        memory = measure_memory(pods_n, settings, prompts)
        size = SizeResult(
            pods=pods_n,
            decision_p50_us=p50,
            decision_p99_us=p99,
            decision_p99_low_us=rounds[0][1],
            decision_p99_high_us=rounds[-1][1],
            decision_cpu_p99_us=cpu_p99,
            full_scan_p50_us=full_p50,
            full_scan_p99_us=full_p99,
            events_per_s=events_s,
            blocks_per_s=blocks_s,
            index_bytes_per_million_blocks=memory,
        )
        result.sizes.append(size)
        log(
            f"fleet {pods_n:>6} pods: decision p50 {size.decision_p50_us:7.1f} us p99 {size.decision_p99_us:7.1f} us"
            f" ({size.decision_p99_low_us:.0f}-{size.decision_p99_high_us:.0f}; on CPU {size.decision_cpu_p99_us:.0f})"
            f" (full scan p50 {size.full_scan_p50_us:8.1f} p99 {size.full_scan_p99_us:8.1f});"
            f" {events_s:,.0f} events/s ({blocks_s:,.0f} blocks/s); index {memory / 2**20:,.0f} MiB per 1M blocks"
        )
    (out / "fleet-size.json").write_text(json.dumps({"settings": asdict(settings), "sizes": [asdict(s) for s in result.sizes]}, indent=2))
    (out / "fleet-size.md").write_text(render_table(result))
    plot(result, out / "fleet-size.png")
    return result


def render_table(result: FleetSimResult) -> str:
    """The figures as a Markdown table."""
    lines = [
        "| pods | decision p50 / p99 µs (p99 range) | p99 on CPU µs | every pod p50 / p99 µs | KV events/s (blocks/s) | index MiB per 1M blocks |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result.sizes:
        lines.append(
            f"| {s.pods:,} | {s.decision_p50_us:.0f} / {s.decision_p99_us:.0f} ({s.decision_p99_low_us:.0f}-{s.decision_p99_high_us:.0f})"
            f" | {s.decision_cpu_p99_us:.0f} | {s.full_scan_p50_us:.0f} / {s.full_scan_p99_us:.0f}"
            f" | {s.events_per_s:,.0f} ({s.blocks_per_s:,.0f}) | {s.index_bytes_per_million_blocks / 2**20:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: FleetSimResult, path: Path) -> None:
    """Decision time, event ingestion and index memory against fleet size, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pods = [s.pods for s in result.sizes]
    fig, (decisions, events, memory) = plt.subplots(1, 3, figsize=(15, 4.2))
    decisions.plot(pods, [s.decision_p50_us for s in result.sizes], "o-", label="shortlisted p50")
    decisions.errorbar(
        pods,
        [s.decision_p99_us for s in result.sizes],
        yerr=[
            [s.decision_p99_us - s.decision_p99_low_us for s in result.sizes],
            [s.decision_p99_high_us - s.decision_p99_us for s in result.sizes],
        ],
        fmt="o--",
        capsize=3,
        label="shortlisted p99 (range of rounds)",
    )
    decisions.plot(pods, [s.decision_cpu_p99_us for s in result.sizes], "^:", label="shortlisted p99 on CPU")
    decisions.plot(pods, [s.full_scan_p50_us for s in result.sizes], "s-", color="grey", label="every pod p50")
    decisions.plot(pods, [s.full_scan_p99_us for s in result.sizes], "s--", color="grey", label="every pod p99")
    decisions.set(xscale="log", yscale="log", xlabel="pods", ylabel="µs per decision", title="Routing decision (kv-aware)")
    decisions.legend(fontsize="small")
    events.plot(pods, [s.events_per_s for s in result.sizes], "o-", label="events/s")
    events.plot(pods, [s.blocks_per_s for s in result.sizes], "o--", label="blocks/s")
    events.set(xscale="log", xlabel="publishing engines", ylabel="per second", title="KV event ingestion, one gateway")
    events.set_ylim(bottom=0)
    events.legend(fontsize="small")
    memory.plot(pods, [s.index_bytes_per_million_blocks / 2**20 for s in result.sizes], "o-")
    memory.set(xscale="log", xlabel="pods", ylabel="MiB per million resident blocks", title="Prefix index memory")
    memory.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
