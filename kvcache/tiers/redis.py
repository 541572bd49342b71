"""L3: blocks in Redis, pipelined.

Each block is one Redis string: the key is a prefix followed by the raw
`BlockKey` bytes, the value is the frame. Batches are one round trip each
(`MGET` for reads, a non-transactional pipeline of `SET` or `EXISTS`
otherwise). Reads check every frame; a bad one is a counted miss and is
deleted.

What L3-on-Redis promises (tested in tests/loopback/test_kvcache_redis_durability.py):
a block whose `SET` Redis acknowledged survives a crash of the Redis process
(SIGKILL) and its restart when the server runs with AOF (``appendonly yes``,
any ``appendfsync``); with ``appendfsync always`` it also survives the loss of
the machine, if the disk honours fsync. It does not survive: a server without
AOF; a failover to a replica (replication is asynchronous); eviction under
``maxmemory`` (L3 is a cache). Writes reach Redis behind the request path
(`kvcache.store.TieredStore`), so a block is acknowledged when its write-behind
batch completes, not when the engine's step ends.

The client does not retry: a failure raises `TierUnavailable` at once and the
tiered store decides when to try again.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvcache.errors import CorruptBlock, TierRejected, TierTimeout, TierUnavailable
from kvcache.framing import Buffer, corruption_reason, open_frame
from kvcache.keys import BlockKey
from kvcache.metrics import StoreMetrics
from kvcache.tiers.base import HitSource, Usage

DEFAULT_PREFIX = b"kvgate:kv:"


class RedisTier:
    """Framed blocks in one Redis database.

    Args:
        url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``).
        prefix: prepended to every key, so the database can be shared.
        ttl_s: expiry of each block in seconds, or None for none.
        timeout_s: socket deadline of each call.
        batch_keys: most keys per round trip.
        max_connections: connection pool size.
        name: metric label.
        metrics: where to count corrupt frames.
        client: an existing client to use instead of connecting to `url`
            (it is then not closed by `aclose`).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: bytes = DEFAULT_PREFIX,
        ttl_s: int | None = None,
        timeout_s: float = 2.0,
        batch_keys: int = 256,
        max_connections: int = 16,
        name: str = "l3",
        metrics: StoreMetrics | None = None,
        client: aioredis.Redis | None = None,
    ) -> None:
        self._prefix = prefix
        self._ttl_ms = None if ttl_s is None else int(ttl_s * 1000)
        self._batch = batch_keys
        self._name = name
        self._metrics = metrics
        self._owned = client is None
        self._client = client or aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
        )
        self.aof_enabled: bool | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def source(self) -> HitSource:
        return "disk"

    def redis_key(self, key: BlockKey) -> bytes:
        """The Redis key under which `key`'s frame is stored."""
        return self._prefix + key

    def _error(self, exc: Exception) -> Exception:
        if isinstance(exc, RedisTimeoutError):
            return TierTimeout(self._name, f"redis timed out: {exc}")
        if isinstance(exc, ResponseError):
            return TierRejected(self._name, f"redis refused: {exc}")
        return TierUnavailable(self._name, f"{type(exc).__name__}: {exc}")

    async def start(self) -> None:
        try:
            info = await self._client.info("persistence")
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        self.aof_enabled = bool(int(info.get("aof_enabled", 0)))

    async def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        found: list[bool] = []
        try:
            for start in range(0, len(keys), self._batch):
                pipe = self._client.pipeline(transaction=False)
                for key in keys[start : start + self._batch]:
                    pipe.exists(self.redis_key(key))
                found.extend(bool(count) for count in await pipe.execute())
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        return found

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        frames: list[Buffer | None] = []
        try:
            for start in range(0, len(keys), self._batch):
                chunk = keys[start : start + self._batch]
                frames.extend(await self._client.mget([self.redis_key(key) for key in chunk]))
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        bad: list[bytes] = []
        for index, (key, frame) in enumerate(zip(keys, frames)):
            if frame is None:
                continue
            try:
                open_frame(key, frame)
            except CorruptBlock as exc:
                if self._metrics is not None:
                    self._metrics.checksum_failures.labels(self._name, corruption_reason(exc)).inc()
                frames[index] = None
                bad.append(self.redis_key(key))
        if bad:
            try:
                await self._client.delete(*bad)
            except (RedisError, OSError) as exc:
                raise self._error(exc) from exc
        return frames

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> None:
        try:
            for start in range(0, len(items), self._batch):
                pipe = self._client.pipeline(transaction=False)
                for key, frame in items[start : start + self._batch]:
                    pipe.set(self.redis_key(key), frame, px=self._ttl_ms)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc

    async def usage(self) -> Usage:
        try:
            info = await self._client.info("memory")
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        capacity = int(info.get("maxmemory", 0)) or None
        return Usage(bytes_used=int(info["used_memory"]), capacity_bytes=capacity, blocks=None)

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()
