"""Real servers for kvcache tests: cache nodes on 127.0.0.1 port 0, and redis-server.

`run_nodes` starts in-process `CacheNode`s sharing one static membership;
`RedisServer` runs a private redis-server on a free port in a temporary
directory, and can kill it with SIGKILL and start it again on the same data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry

from kvcache.membership import StaticMembership
from kvcache.metrics import NodeMetrics
from kvcache.server import CacheNode, NodeSettings


@contextlib.asynccontextmanager
async def run_nodes(
    count: int,
    *,
    capacity_bytes: int = 64 << 20,
    labels: Sequence[Mapping[str, str]] | None = None,
    replicas: int = 1,
    membership: StaticMembership | None = None,
    **settings: object,
) -> AsyncIterator[tuple[list[CacheNode], StaticMembership]]:
    """Start `count` cache nodes on 127.0.0.1:0, registered in one membership.

    Yields:
        The nodes (started) and their shared membership.
    """
    membership = membership or StaticMembership([])
    nodes: list[CacheNode] = []
    try:
        for index in range(count):
            node_labels = dict(labels[index]) if labels else {"host": f"h{index}"}
            node = CacheNode(
                NodeSettings(
                    node_id=f"n{index}",
                    capacity_bytes=capacity_bytes,
                    labels=tuple(sorted(node_labels.items())),
                    replicas=replicas,
                    **settings,  # type: ignore[arg-type]
                ),
                membership=membership,
                metrics=NodeMetrics(CollectorRegistry()),
            )
            await node.start()
            nodes.append(node)
        yield nodes, membership
    finally:
        for node in nodes:
            await node.stop(0)


async def start_node(
    membership: StaticMembership, node_id: str, *, capacity_bytes: int = 64 << 20, **settings: object
) -> CacheNode:
    """Start one more node in an existing membership."""
    node = CacheNode(
        NodeSettings(node_id=node_id, capacity_bytes=capacity_bytes, labels=(("host", node_id),), **settings),  # type: ignore[arg-type]
        membership=membership,
        metrics=NodeMetrics(CollectorRegistry()),
    )
    await node.start()
    return node


def free_port() -> int:
    """A port free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A private redis-server for one test.

    Args:
        directory: data directory (AOF files live here).
        appendonly: run with AOF.
        appendfsync: ``always``, ``everysec`` or ``no``.
        maxmemory: byte cap, or None.
        maxmemory_policy: eviction policy with `maxmemory` (default ``allkeys-lru``).
        extra_args: more ``--name value`` arguments, e.g. to rename CONFIG away.
    """

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        maxmemory: int | None = None,
        maxmemory_policy: str = "allkeys-lru",
        extra_args: Sequence[str] = (),
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", appendfsync,
            "--daemonize", "no",
            "--logfile", str(directory / "redis.log"),
        ]
        if maxmemory is not None:
            self.args += ["--maxmemory", str(maxmemory), "--maxmemory-policy", maxmemory_policy]
        self.args += list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING (and has loaded its data)."""
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping() and client.info("persistence").get("loading", 0) == 0:
                        return
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on {self.port} did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final fsync) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """Terminate the server and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def client(self) -> redis.Redis:
        """A synchronous client (for poking at the data behind a tier's back)."""
        return redis.Redis(port=self.port)


async def leftover_tasks() -> list[str]:
    """Names of asyncio tasks still pending besides the caller (after a tick)."""
    import asyncio

    await asyncio.sleep(0)
    current = asyncio.current_task()
    return [t.get_name() for t in asyncio.all_tasks() if t is not current and not t.done()]
