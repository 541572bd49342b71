"""A shared-cache cluster for end-to-end tests and benchmarks of the connector.

Starts a private redis-server (AOF on, L3), `kvgate cache-node` processes
(L2), and real vLLM CPU engines loading `TieredKVConnector` with all of them.
Used by tests/e2e/test_kvcache_engines.py and scripts/bench_kvcache.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvcache.client import NodeClient
from kvcache.launch import cache_node_argv, connector_extra_config, kv_transfer_config, wait_ready
from kvgate.engines import Engine, EngineSpec, free_ports, kv_events_args, kv_events_endpoint, stop_engines
from tests.support.kvcache_servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]


class CacheNodeProcess:
    """One ``kvgate cache-node`` subprocess on a free port."""

    def __init__(self, directory: Path, node_id: str, *extra: str) -> None:
        ready = directory / f"{node_id}.ready.json"
        ready.unlink(missing_ok=True)
        self.log_path = directory / f"{node_id}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*cache_node_argv(node_id=node_id, ready_file=ready, labels={"host": node_id}, capacity_bytes=1 << 30),
             *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            info = wait_ready(ready)
        except TimeoutError:
            raise RuntimeError(f"cache node {node_id} did not start: {self.log_path.read_text()}") from None
        self.spec: str = info.spec()
        self.address: str = info.address

    def stop(self, sig: int = signal.SIGKILL) -> int | None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        code = self.process.wait(timeout=60)
        self._log.close()
        return code


@dataclass
class SharedCacheCluster:
    engines: list[Engine]
    nodes: list[CacheNodeProcess]
    redis: RedisServer

    @property
    def event_sources(self) -> list[str]:
        """`URL=ENDPOINT` pairs of the engines that publish KV events (`kv_events=True`)."""
        pairs = [(engine.url, kv_events_endpoint(engine.spec.extra_args)) for engine in self.engines]
        return [f"{url}={endpoint}" for url, endpoint in pairs if endpoint]

    async def l2_blocks(self) -> int:
        """Blocks the cache nodes hold, all nodes together (each node's own count)."""
        total = 0
        for node in self.nodes:
            client = NodeClient(node.address)
            try:
                total += (await client.stats()).blocks
            finally:
                await client.aclose()
        return total

    def l3_blocks(self) -> int:
        """Blocks the L3 Redis holds."""
        with self.redis.client() as client:
            return sum(1 for _ in client.scan_iter(match=b"kvgate:kv:*", count=1000))

    def stop_l2(self) -> None:
        for node in self.nodes:
            node.stop()

    def stop_l3(self) -> None:
        self.redis.kill()


@contextmanager
def shared_cache_cluster(
    directory: Path,
    model_dir: Path,
    *,
    engines: int = 2,
    nodes: int = 2,
    num_gpu_blocks: int = 64,
    max_model_len: int = 4096,
    start_timeout: float = 300.0,
    kv_events: bool = False,
) -> Iterator[SharedCacheCluster]:
    """Redis (L3, AOF), cache nodes (L2) and engines sharing them through the connector.

    With `kv_events`, each engine also sends its KV events to a gateway listening at
    `SharedCacheCluster.event_sources`.
    """
    redis = RedisServer(directory, appendonly=True)
    redis.start()
    started_nodes: list[CacheNodeProcess] = []
    started_engines: list[Engine] = []
    try:
        started_nodes = [CacheNodeProcess(directory, f"n{i}") for i in range(nodes)]
        extra = connector_extra_config(
            peers=[node.spec for node in started_nodes], l3_redis_url=redis.url, l1_capacity_bytes=256 << 20
        )
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        ports = free_ports(2 * engines)
        for index, (port, event_port) in enumerate(zip(ports[:engines], ports[engines:])):
            events = kv_events_args(event_port, topic=f"kv@engine-{index}") if kv_events else ()
            engine = Engine(
                EngineSpec(
                    model_dir=model_dir,
                    port=port,
                    num_gpu_blocks=num_gpu_blocks,
                    max_model_len=max_model_len,
                    extra_args=("--kv-transfer-config", kv_transfer_config(extra), *events),
                    extra_env=env,
                ),
                log_path=directory / f"engine-{index}.log",
            )
            engine.start()
            started_engines.append(engine)
        for engine in started_engines:
            engine.wait_ready_sync(start_timeout)
        yield SharedCacheCluster(started_engines, started_nodes, redis)
    finally:
        stop_engines(started_engines)
        for node in started_nodes:
            node.stop()
        redis.stop()


def complete(url: str, prompt: Sequence[int], *, max_tokens: int = 16, timeout: float = 300.0) -> tuple[str, float]:
    """Greedy completion of a token-id prompt; returns the text and the seconds taken."""
    body = json.dumps(
        {"model": "tiny-llama", "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0}
    ).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())
    return answer["choices"][0]["text"], time.perf_counter() - started


def first_token_seconds(url: str, prompt: Sequence[int], *, timeout: float = 300.0) -> float:
    """Time to first token of a one-token greedy completion (the prefill)."""
    return complete(url, prompt, max_tokens=1, timeout=timeout)[1]


def reset_prefix_cache(url: str) -> None:
    """Empty an engine's own prefix cache (engines run with VLLM_SERVER_DEV_MODE=1)."""
    request = urllib.request.Request(url + "/reset_prefix_cache", b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEnaNIf]+)$")


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples on an engine's /metrics whose labels include `labels`."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if not found or found.group(1) != name:
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            total += float(found.group(3))
    return total


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    """Poll until `predicate()` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
