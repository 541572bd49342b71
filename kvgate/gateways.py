"""`kvgate up --gateways N`: several gateway replicas in front of the same engines.

`serve_replicas` runs N gateways in this process, each on its own port (the
given port and the ones after it, or each its own free port for port 0), each
printing its `gateway: URL` line. With more than one, they share routing
state (predicted placements, load per pod, fairness counters; see
`router.state`) through the Redis that `kvgate up` already uses, under a
replica group name of their own, so that they route as one gateway would; a
load balancer in front of them may send any request to any of them. Every
replica follows every engine's KV events (the engines bind their publishers,
the replicas connect: `engine_events_host`). When no
Redis answers, it says so in one warning line and the replicas run without
shared state, each routing on its own view. On stop every replica drains, and
the group's keys are deleted from the store.

NOTE: the replicas share this process and its event loop: enough to try
several replicas on one machine (and to measure how they route), not a
defence against the process dying; in production each replica is its own
`kvgate serve --state-url ...` process or pod.

Called by `kvgate.cluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import sys
from collections.abc import Callable, Sequence

from kvcache.launch import redis_reachable
from kvgate.engines import kv_events_endpoint
from router.discovery import Discovery
from router.kv_events import LISTEN
from router.prompts import PromptEncoder
from router.server import serve
from router.settings import Settings


def state_url_for(redis_url: str | None, gateways: int, *, warn: Callable[[str], None]) -> str | None:
    """The store `gateways` replicas share routing state through, or None (one replica, or no Redis).

    Args:
        redis_url: the Redis `kvgate up` uses (None: none).
        gateways: replicas to run.
        warn: called with one line when replicas must run without shared state.
    """
    if gateways < 2:
        return None
    if redis_url and redis_reachable(redis_url):
        return redis_url
    where = f"at {redis_url}" if redis_url else "(no --redis-url)"
    warn(
        f"kvgate up: warning: no Redis answers {where}; the {gateways} gateways run without shared state, "
        "each routing on its own view of the engines"
    )
    return None


def engine_events_host(gateways: int) -> str:
    """Where an engine publishes its KV events: to one gateway that listens, or bound for several to connect to.

    vLLM's publisher connects when its endpoint names a host and binds when it
    is a wildcard. One gateway listens on 127.0.0.1 (`kvgate.engines.kv_events_args`);
    several cannot all listen on one port, so the engine binds and every
    replica connects (NOTE: the engine's event port then listens on every
    interface of this machine).
    """
    return "127.0.0.1" if gateways < 2 else "*"


def event_source(extra_args: Sequence[str], gateways: int) -> str | None:
    """The gateways' side of an engine's KV events (see `engine_events_host`), None if it sends none."""
    endpoint = kv_events_endpoint(extra_args)
    if endpoint is None or gateways < 2:
        return endpoint
    return endpoint.removeprefix(LISTEN).replace("tcp://*:", "tcp://127.0.0.1:")


def replica_settings(base: Settings, index: int, *, state_url: str | None, cluster: str) -> Settings:
    """Replica `index`'s settings: `base` on port `base.port + index` (0 stays 0), sharing state when `state_url`."""
    settings = copy.deepcopy(base)
    if base.server.port:
        settings.server.port = base.server.port + index
    settings.state.url = state_url
    settings.state.cluster = cluster
    return settings


async def serve_replicas(
    settings: Settings,
    gateways: int,
    *,
    redis_url: str | None,
    discovery: Callable[[], Discovery],
    encoder: PromptEncoder | None,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> int:
    """Serve `gateways` replicas until SIGTERM or SIGINT, then drain them all.

    Args:
        settings: one gateway's settings (its port is the first replica's).
        gateways: how many replicas.
        redis_url: the Redis to share routing state through (see `state_url_for`).
        discovery: makes each replica's pod discovery.
        encoder: the model's tokenizer, shared by the replicas.
        stop: set to drain every replica; SIGTERM and SIGINT set it too.
        on_listening: called with each replica's base URL once it listens
            (default: print its `gateway: URL` line).

    Returns:
        0 once every replica drained.
    """
    if gateways == 1:
        return await serve(settings, discovery=discovery(), encoder=encoder, stop=stop, on_listening=on_listening)
    state_url = await asyncio.to_thread(
        state_url_for, redis_url, gateways, warn=lambda line: print(line, file=sys.stderr, flush=True)
    )
    cluster = f"up-{os.getpid()}"
    stop = stop or asyncio.Event()
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    serve(
                        replica_settings(settings, i, state_url=state_url, cluster=cluster),
                        discovery=discovery(),
                        encoder=encoder,
                        stop=stop,
                        on_listening=on_listening,
                    )
                )
                for i in range(gateways)
            ]
    finally:
        if state_url is not None:
            await asyncio.to_thread(forget_cluster, state_url, cluster)
    return max(task.result() for task in tasks)


def forget_cluster(url: str, cluster: str) -> None:
    """Delete a replica group's keys (its stream, leases and counters) from the store; errors are ignored."""
    import redis
    from redis.exceptions import RedisError

    with contextlib.suppress(RedisError, OSError):
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            keys = list(client.scan_iter(match=f"kvgate:{cluster}:*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
