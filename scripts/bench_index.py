"""The prefix index and long prompts: what one prompt costs the gateway, and what /health sees meanwhile.

Three measurements, each printed as median and spread (p10, p90, p99, max) over repeats:

1. inserting and matching one 32,768-token prompt at block size 16 (2,048
   blocks) in `router.index.PrefixIndex`, on an empty index and on one that
   already holds it on several pods; next to it, the same walk in a
   `pygtrie.Trie` keyed by block paths, the structure the index replaced;
2. memory per resident block (tracemalloc) at 10k, 100k and 1M blocks;
3. /health latency of a real gateway (`kvgate serve`, the tiny model's
   tokenizer) over a stub engine while the largest prompt the pods accept
   (`--max-model-len`) is tokenised, hashed and routed, polled from another
   connection; the gateway and the engine run as their own processes.

    python scripts/bench_index.py [--repeats 30] [--max-model-len 131072] [--skip-health]

Targets: (1) <= 2 ms, (2) flat in the number of blocks, (3) < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp
import pygtrie

from kvcache.keys import BlockHash, chain_hashes
from router.index import PrefixIndex
from router.pods import PodId

PROMPT_TOKENS = 32_768
BLOCK_SIZE = 16


def spread(samples: Sequence[float]) -> str:
    ordered = sorted(samples)
    p10 = ordered[int(0.1 * (len(ordered) - 1))]
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    return (
        f"median {statistics.median(ordered):8.3f}  p10 {p10:8.3f}  p90 {p90:8.3f}  p99 {p99:8.3f}  max {ordered[-1]:8.3f}"
    )


def timed_ms(work: Callable[[], object], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1e3)
    return samples


def bench_index(repeats: int) -> None:
    hashes = chain_hashes(list(range(PROMPT_TOKENS)), BLOCK_SIZE)
    pods = [PodId(f"http://pod-{i}:8000") for i in range(8)]
    print(f"\n1. insert + match of one {PROMPT_TOKENS:,}-token prompt ({len(hashes):,} blocks of {BLOCK_SIZE}), ms")

    def cold() -> None:
        index = PrefixIndex(default_capacity=len(hashes) * 4)
        index.insert(pods[0], hashes)
        index.match(hashes)

    warm_index = PrefixIndex(default_capacity=len(hashes) * 4)
    for i, pod in enumerate(pods):
        warm_index.insert(pod, hashes[: len(hashes) * (i + 1) // len(pods)])

    def warm() -> None:
        warm_index.match(hashes)
        warm_index.insert(pods[0], hashes)

    def full() -> None:  # a pod at capacity: every insert evicts as many blocks
        full_index.insert(pods[1], hashes)
        full_index.match(hashes)

    full_index = PrefixIndex(default_capacity=len(hashes))
    other = chain_hashes(list(range(1, PROMPT_TOKENS + 1)), BLOCK_SIZE)

    def full_alternating() -> None:
        full_index.insert(pods[1], other)
        full()

    path = tuple(hashes)

    def pygtrie_walk() -> None:
        trie: pygtrie.Trie = pygtrie.Trie()
        trie.setdefault(path, {})
        for depth, step in enumerate(trie.walk_towards(path)):
            if depth and step.get() is None:
                step.value = {}
        for depth, step in enumerate(trie.walk_towards(path)):
            if depth and not step.get():
                break

    print(f"  PrefixIndex, empty index         {spread(timed_ms(cold, repeats))}")
    print(f"  PrefixIndex, 8 pods hold it      {spread(timed_ms(warm, repeats))}")
    print(f"  PrefixIndex, pod full (2 evicts) {spread([t / 2 for t in timed_ms(full_alternating, repeats)])}")
    print(f"  pygtrie.Trie path walk only      {spread(timed_ms(pygtrie_walk, repeats))}")


def bench_memory() -> None:
    print("\n2. memory per resident block (tracemalloc; one pod, prompts of 2,048 blocks)")
    for total in (10_000, 100_000, 1_000_000):
        index = PrefixIndex(default_capacity=total)
        pod = PodId("http://pod-0:8000")
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            made = 0
            while made < total:
                n = min(2048, total - made)
                # Stand-in chained hashes (16 bytes, as kvcache.keys makes them), cheaper to make.
                prompt = [BlockHash(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()) for i in range(made, made + n)]
                index.insert(pod, prompt)
                made += n
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert index.blocks(pod) == total and len(index) == total
        print(f"  {total:>9,} blocks: {used / total:6.1f} bytes per block (hash keys included), {used / 2**20:7.1f} MiB")


async def _start(cmd: list[str], pattern: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ})
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, proc.stdout.readline)
        if not line:
            raise RuntimeError(f"{cmd[2]} exited before listening")
        found = re.search(pattern, line)
        if found:
            return proc, found.group(1)


async def bench_health(max_model_len: int, repeats: int) -> None:
    from kvgate.model import SERVED_MODEL_NAME, build_model
    from router.tokenize import PromptTokenizer

    model_dir = build_model(Path(tempfile.gettempdir()) / "kvgate-bench-index" / SERVED_MODEL_NAME)
    tokenizer = PromptTokenizer.from_model_dir(model_dir)
    words = ["kv", "cache", "block", "prefix", "route", "gateway", "engine", "token", "alpha", "42"]
    text = " ".join(words[i % len(words)] + str(i % 97) for i in range(max_model_len))
    ids = tokenizer.encode_prompt(text)[: max_model_len - 16]
    prompt = tokenizer.decode(ids[1:], skip_special_tokens=True)
    tokens = len(tokenizer.encode_prompt(prompt))
    python = sys.executable
    engine, engine_url = await _start(
        [python, "-m", "kvgate.stub_engine", "--max-model-len", str(max_model_len)], r"stub: (\S+)"
    )
    gateway = None
    try:
        gateway, url = await _start(
            [python, "-m", "kvgate", "serve", "--worker-urls", engine_url, "--tokenizer", str(model_dir), "--port", "0",
             "--log-level", "WARNING"],
            r"gateway: (\S+)",
        )
        print(f"\n3. /health while a {tokens:,}-token prompt ({len(prompt):,} characters; max_model_len "
              f"{max_model_len:,}) is routed by a gateway process, ms")
        async with aiohttp.ClientSession() as poller, aiohttp.ClientSession() as client:
            while True:  # until the gateway has seen the engine's max_model_len
                async with client.get(url + "/v1/models") as response:
                    data = (await response.json()).get("data") or []
                if data and data[0].get("max_model_len"):
                    break
                await asyncio.sleep(0.1)
            health: list[float] = []
            requests: list[float] = []
            for _ in range(repeats):
                started = time.perf_counter()
                body = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": 4}
                big = asyncio.create_task(client.post(url + "/v1/completions", json=body))
                while not big.done():
                    t0 = time.perf_counter()
                    async with poller.get(url + "/health") as response:
                        await response.read()
                    health.append((time.perf_counter() - t0) * 1e3)
                    await asyncio.sleep(0.005)
                response = big.result()
                assert response.status == 200, await response.text()
                response.release()
                requests.append((time.perf_counter() - started) * 1e3)
            print(f"  /health ({len(health)} probes)      {spread(health)}")
            print(f"  the long request itself         {spread(requests)}")
    finally:
        for proc in (gateway, engine):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_index.py", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="repeats of each timed step (default 30)")
    parser.add_argument("--max-model-len", type=int, default=131_072, help="context length of the stub engine")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory measurement (1M blocks)")
    parser.add_argument("--skip-health", action="store_true", help="skip the gateway /health measurement")
    args = parser.parse_args(argv)
    bench_index(args.repeats)
    if not args.skip_memory:
        bench_memory()
    if not args.skip_health:
        asyncio.run(bench_health(args.max_model_len, max(3, args.repeats // 3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
