"""The shared KV cache of the local cluster: L2 cache nodes as processes, and the engines' connector config.

`kvgate up` runs `CacheTiers`: it starts the L2 nodes (`kvgate cache-node`,
static membership, each labelled with its own zone so replicas would land
apart), chooses L3 (Redis when one answers at the given URL, else a local
directory), and gives every engine the same `--kv-transfer-config`, so a
prefix computed by one engine is loaded, not recomputed, by another. On stop
each node gets SIGTERM and hands its blocks to their new owners before it
exits. The nodes accept only callers holding the cluster's token, a random
one made for each start and kept in `state_dir/cache.token` (mode 0600).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from kvcache.launch import (
    cache_node_argv,
    connector_extra_config,
    kv_transfer_config,
    redis_reachable,
    wait_ready,
    write_token_file,
)
from kvcache.ring import NodeInfo
from kvgate.engines import free_ports


@dataclass
class CacheTiers:
    """L2 nodes and L3 choice for one local cluster.

    Args:
        state_dir: where ready files, logs and the directory L3 live.
        nodes: L2 cache nodes to start (0: no L2).
        redis_url: L3 in this Redis if it answers; else `state_dir/l3`.
        node_capacity_bytes: each node's byte budget.
        model: the served model name (the blocks' namespace).
    """

    state_dir: Path
    nodes: int = 2
    redis_url: str | None = "redis://127.0.0.1:6379/0"
    node_capacity_bytes: int = 1 << 30
    model: str = "tiny-llama"
    specs: list[str] = field(default_factory=list)
    metrics_urls: list[str] = field(default_factory=list)
    """Each node's Prometheus endpoint."""
    l3: str = ""
    _procs: list[subprocess.Popen] = field(default_factory=list)

    async def start(self) -> list[str]:
        """Start the nodes and wait until each serves.

        Returns:
            The engines' extra command-line arguments (`--kv-transfer-config JSON`).

        Raises:
            TimeoutError: a node did not come up in time (the others are stopped).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * self.nodes)  # one call: the ports are distinct
        infos = [
            NodeInfo.make(f"n{i}", f"127.0.0.1:{port}", {"host": "local", "zone": f"z{i}"})
            for i, port in enumerate(ports[: self.nodes])
        ]
        peers = [info.spec() for info in infos]
        token_file = write_token_file(self.state_dir / "cache.token")
        try:
            for info, metrics_port in zip(infos, ports[self.nodes :]):
                ready = self.state_dir / f"{info.node_id}.ready.json"
                ready.unlink(missing_ok=True)
                argv = cache_node_argv(
                    node_id=info.node_id,
                    ready_file=ready,
                    port=int(info.address.rsplit(":", 1)[1]),
                    labels=dict(info.labels),
                    capacity_bytes=self.node_capacity_bytes,
                    peers=peers,
                    token_file=token_file,
                ) + ["--metrics-port", str(metrics_port)]
                self.metrics_urls.append(f"http://127.0.0.1:{metrics_port}/metrics")
                with open(self.state_dir / f"{info.node_id}.log", "ab") as log:
                    self._procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                self.specs.append((await asyncio.to_thread(wait_ready, ready)).spec())
        except BaseException:
            self.stop()
            raise
        use_redis = self.redis_url is not None and await asyncio.to_thread(redis_reachable, self.redis_url)
        self.l3 = self.redis_url if use_redis else str(self.state_dir / "l3")
        extra = connector_extra_config(
            peers=self.specs,
            l3_redis_url=self.redis_url if use_redis else None,
            l3_directory=None if use_redis else self.state_dir / "l3",
            model=self.model,
            token_file=token_file,
        )
        return ["--kv-transfer-config", kv_transfer_config(extra)]

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM every node (each hands its blocks off), then wait; kill what outlives `grace`."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
