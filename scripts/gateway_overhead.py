#!/usr/bin/env python
"""Latency the gateway adds per request, and its routing decision time.

Starts a stub engine that answers at once and `kvgate serve` in front of it
(each its own process), then sends the same chat request N times in sequence,
directly to the stub and through the gateway, and reports p50/p99 of both and
their difference, plus the gateway's own mean routing-decision time from its
/metrics. Usage:

    python scripts/gateway_overhead.py [--requests 2000] [--tokenizer MODEL_DIR] [--policy kv-aware]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import aiohttp


async def _spawn(*argv: str, prefix: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    while True:
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line:
            raise RuntimeError(f"{argv} exited before listening")
        if line.startswith(prefix):
            return proc, line.split(" ", 1)[1].strip()


async def _timed(http: aiohttp.ClientSession, url: str, payload: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        async with http.post(url + "/v1/chat/completions", json=payload) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append(time.perf_counter() - start)
    return out


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tokenizer")
    parser.add_argument("--policy", default="kv-aware")
    args = parser.parse_args()
    stub, stub_url = await _spawn("-m", "kvgate.stub_engine", prefix="stub: ")
    extra = ["--tokenizer", args.tokenizer] if args.tokenizer else []
    gateway, gateway_url = await _spawn(
        "-m", "kvgate", "serve", "--worker-urls", stub_url, "--port", "0", "--policy", args.policy, "--log-level", "WARNING", *extra,
        prefix="gateway: ",
    )  # fmt: skip
    try:
        payload = {
            "model": "tiny-llama",
            "max_tokens": 4,
            "messages": [{"role": "system", "content": "You are helpful. " * 50}, {"role": "user", "content": "Hi"}],
        }
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(gateway_url + "/ready") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            await _timed(http, stub_url, payload, 200)  # warm up both paths
            await _timed(http, gateway_url, payload, 200)
            direct = await _timed(http, stub_url, payload, args.requests)
            via = await _timed(http, gateway_url, payload, args.requests)
            async with http.get(gateway_url + "/metrics") as r:
                metrics = await r.text()
        total = count = 0.0
        for line in metrics.splitlines():
            if line.startswith("kvgate_routing_decision_seconds_sum"):
                total = float(line.split()[-1])
            elif line.startswith("kvgate_routing_decision_seconds_count"):
                count = float(line.split()[-1])
        ms = 1e3
        print(f"requests: {args.requests} sequential, policy {args.policy}, tokenizer {'model' if args.tokenizer else 'bytes'}")
        print(f"direct  p50 {_pct(direct, 50) * ms:.3f} ms  p99 {_pct(direct, 99) * ms:.3f} ms")
        print(f"gateway p50 {_pct(via, 50) * ms:.3f} ms  p99 {_pct(via, 99) * ms:.3f} ms")
        print(f"added   p50 {(_pct(via, 50) - _pct(direct, 50)) * ms:.3f} ms  p99 {(_pct(via, 99) - _pct(direct, 99)) * ms:.3f} ms")
        print(f"routing decision mean {total / max(count, 1) * 1e6:.1f} us over {int(count)} decisions")
    finally:
        for proc in (gateway, stub):
            proc.terminate()
            proc.wait(timeout=15)


if __name__ == "__main__":
    asyncio.run(main())
