"""Closed-loop users against a hand-set limit, with and without slots kept for returning users.

    python scripts/bench_returning_users.py [--limit 6] [--seconds 20] [--engines 3]

Stub engines (`kvgate.stub_engine`, in this process) answer every chat in
0.3 s plus 32 chunks 30 ms apart; a `kvgate serve` in front of them has a
fixed limit per pod (`--no-adaptive-admission`). One heavy user with 12
closed-loop clients and 6 light users with 2 each send for `--seconds`, once
with `admission.hold_for_return_s` at its default and once at 0. Prints each
run's requests per class, the light users' share of requests and the TTFT
percentiles per class (the stubs never queue, so what is above 0.3 s waited
at the gateway).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from kvgate.bench.stats import percentile
from kvgate.stub_engine import StubBehaviour, StubEngine, run_stub

MODEL_DIR = Path(".kvgate/models/tiny-llama")
HEAVY_CLIENTS, LIGHT_USERS, LIGHT_CLIENTS = 12, 6, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(300):
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/v1/models") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"gateway at {url} never became ready")


async def one_run(urls: list[str], limit: int, hold_s: float | None, seconds: float) -> list[tuple[str, float]]:
    """(user, TTFT) of every request of one run."""
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config:
        config.write(f"admission:\n  hold_for_return_s: {hold_s}\n" if hold_s is not None else "{}\n")
        config.flush()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "kvgate", "serve", "--worker-urls", *urls, "--policy", "kv-aware",
             "--host", "127.0.0.1", "--port", str(port), "--tokenizer", str(MODEL_DIR), "--log-level", "WARNING",
             "--no-adaptive-admission", "--max-inflight-per-pod", str(limit), "--config", config.name],
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        records: list[tuple[str, float]] = []
        try:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, base)
                stop = time.monotonic() + seconds

                async def client(user: str, n: int) -> None:
                    system = f"You answer for {user}. " * 60
                    k = 0
                    while time.monotonic() < stop:
                        body = {"model": "tiny-llama", "stream": True, "max_tokens": 32, "user": user,
                                "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": f"question {n}-{k}"}]}  # fmt: skip
                        sent = time.monotonic()
                        first = None
                        async with session.post(base + "/v1/chat/completions", json=body) as r:
                            async for _ in r.content:
                                if first is None:
                                    first = time.monotonic() - sent
                        records.append((user, first if first is not None else float("nan")))
                        k += 1

                users = ["heavy"] * HEAVY_CLIENTS + [f"light-{i}" for i in range(LIGHT_USERS) for _ in range(LIGHT_CLIENTS)]
                await asyncio.gather(*(client(user, n) for n, user in enumerate(users)))
        finally:
            gateway.terminate()
            gateway.wait()
        return records


def report(name: str, records: list[tuple[str, float]]) -> None:
    light = [t for u, t in records if u != "heavy"]
    heavy = [t for u, t in records if u == "heavy"]
    share = len(light) / len(records) if records else 0.0

    def cut(values: list[float]) -> str:
        values = sorted(values)
        return " / ".join(f"{percentile(values, q):.2f}" for q in (50, 90, 95)) if values else "-"

    print(
        f"{name}: requests light {len(light)}, heavy {len(heavy)}; light share {share:.3f}; "
        f"TTFT s p50/p90/p95 light {cut(light)}, heavy {cut(heavy)}; mean light {statistics.fmean(light):.2f}"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=6, help="requests per pod (default 6)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--engines", type=int, default=3)
    args = parser.parse_args()
    behaviour = StubBehaviour(delay_s=0.3, chunk_delay_s=0.03, tokens=32)
    async with contextlib.AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(run_stub(StubEngine(block_size=128, behaviour=behaviour))) for _ in range(args.engines)]
        urls = [engine.url for engine in engines]
        print(f"{args.engines} stub engines x limit {args.limit}: {args.engines * args.limit} slots for "
              f"{HEAVY_CLIENTS + LIGHT_USERS * LIGHT_CLIENTS} clients ({LIGHT_USERS * LIGHT_CLIENTS} light)")  # fmt: skip
        report("slots kept for returning users", await one_run(urls, args.limit, None, args.seconds))
        report("no slots kept (hold_for_return_s: 0)", await one_run(urls, args.limit, 0.0, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
