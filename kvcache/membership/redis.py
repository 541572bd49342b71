"""L2 members registered in Redis, with heartbeats and expiry.

Layout: one hash per cluster, ``kvgate:kvcache:<cluster>:members``, field =
node id, value = JSON of the `NodeInfo` plus ``expires_ms``. A node refreshes
its field every `heartbeat_s`; readers ignore (and prune) fields whose expiry
has passed, so a node that dies without warning drops out after `ttl_s`. Times
come from the Redis server's clock (``TIME``), so hosts need not agree on the
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from kvcache.errors import ConfigError, TierUnavailable
from kvcache.ring import NodeId, NodeInfo

log = logging.getLogger(__name__)


class RedisMembership:
    """Members registered in a Redis hash.

    Args:
        url: the Redis URL.
        cluster: ring name, so several rings can share one Redis.
        ttl_s: lifetime of a registration without heartbeat.
        heartbeat_s: renewal period (well below `ttl_s`).
        client: an existing client to use instead of connecting to `url`.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        cluster: str = "default",
        ttl_s: float = 10.0,
        heartbeat_s: float = 2.0,
        client: aioredis.Redis | None = None,
    ) -> None:
        self._key = f"kvgate:kvcache:{cluster}:members"
        self._ttl_ms = int(ttl_s * 1000)
        self._heartbeat_s = heartbeat_s
        self._owned = client is None
        self._client = client or aioredis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )
        self._beats: dict[NodeId, asyncio.Task[None]] = {}

    async def _now_ms(self) -> int:
        seconds, micros = await self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def members(self) -> list[NodeInfo]:
        """The registered, unexpired members.

        An entry that is not a valid registration (written by something
        else) is skipped and logged, never fatal to the whole list.

        Raises:
            TierUnavailable: Redis cannot be read.
        """
        try:
            now = await self._now_ms()
            fields = await self._client.hgetall(self._key)
        except (RedisError, OSError) as exc:
            raise TierUnavailable("membership", f"redis: {exc}") from exc
        live: list[NodeInfo] = []
        expired = []
        for name, raw in fields.items():
            try:
                entry = json.loads(raw)
                expires = int(entry["expires_ms"])
                node = NodeInfo.from_json(raw)
                NodeInfo.parse(node.address)  # HOST:PORT, or the entry is useless
            except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
                log.warning("ignoring member entry %r of %s: %s", name, self._key, exc)
                continue
            if expires <= now:
                expired.append(name)
            else:
                live.append(node)
        if expired:
            try:
                await self._client.hdel(self._key, *expired)
            except (RedisError, OSError) as exc:
                raise TierUnavailable("membership", f"redis: {exc}") from exc
        return live

    async def _announce(self, node: NodeInfo) -> None:
        entry = json.loads(node.to_json())
        entry["expires_ms"] = await self._now_ms() + self._ttl_ms
        await self._client.hset(self._key, node.node_id, json.dumps(entry))

    async def register(self, node: NodeInfo) -> None:
        """Announce `node` now and renew it every `heartbeat_s`.

        Raises:
            TierUnavailable: the first announcement failed.
        """
        try:
            await self._announce(node)
        except (RedisError, OSError) as exc:
            raise TierUnavailable("membership", f"redis: {exc}") from exc
        old = self._beats.pop(node.node_id, None)
        if old is not None:
            old.cancel()
        self._beats[node.node_id] = asyncio.create_task(self._heartbeat(node), name=f"heartbeat-{node.node_id}")

    async def _heartbeat(self, node: NodeInfo) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await self._announce(node)
            except (RedisError, OSError) as exc:
                # Keep beating: the entry expires on its own if Redis stays away.
                log.warning("heartbeat of %s failed: %s", node.node_id, exc)

    async def deregister(self, node_id: NodeId) -> None:
        task = self._beats.pop(node_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self._client.hdel(self._key, node_id)
        except (RedisError, OSError) as exc:
            raise TierUnavailable("membership", f"redis: {exc}") from exc

    async def aclose(self) -> None:
        for node_id in list(self._beats):
            task = self._beats.pop(node_id)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owned:
            await self._client.aclose()
