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

Growth: every block is written with an expiry (`ttl_s`, one day by default,
set by the same ``SET ... PX`` that writes the value, so no block is ever
stored without it) and reads renew it (``GETEX``), so an unused block leaves
after `ttl_s` even on a Redis without ``maxmemory``. At start-up the tier
reads the server's ``maxmemory`` and ``maxmemory-policy`` (``CONFIG GET``,
else ``INFO memory`` when CONFIG is disabled) and warns, or refuses to start
(`unbounded="refuse"`), when the server can grow until it runs out of memory
(no ``maxmemory``) or would refuse writes when full (``noeviction``, or a
``volatile-*`` policy with no TTL to act on). An out-of-memory refusal of a
write is a `TierRejected` (that batch is dropped; reads go on).

The client does not retry: a failure raises `TierUnavailable` at once and the
tiered store decides when to try again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvcache.errors import ConfigError, CorruptBlock, TierRejected, TierTimeout, TierUnavailable
from kvcache.framing import Buffer, corruption_reason, open_frame
from kvcache.keys import BlockKey
from kvcache.metrics import StoreMetrics
from kvcache.tiers.base import HitSource, Usage

log = logging.getLogger(__name__)

DEFAULT_PREFIX = b"kvgate:kv:"


class RedisTier:
    """Framed blocks in one Redis database.

    Args:
        url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``).
        prefix: prepended to every key, so the database can be shared.
        ttl_s: expiry of each block in seconds, renewed on read; None or 0
            for none.
        unbounded: ``warn`` or ``refuse`` when the server's memory policy
            lets L3 grow until Redis runs out of memory (see the module docstring).
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
        ttl_s: float | None = None,
        unbounded: str = "warn",
        timeout_s: float = 2.0,
        batch_keys: int = 256,
        max_connections: int = 16,
        name: str = "l3",
        metrics: StoreMetrics | None = None,
        client: aioredis.Redis | None = None,
    ) -> None:
        self._prefix = prefix
        self._ttl_ms = int(ttl_s * 1000) if ttl_s else None
        self._unbounded = unbounded
        self._renew_on_read = False
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
        #: What start-up found wrong with the server's memory policy (None: bounded or unknown).
        self.unbounded_reason: str | None = None

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
        """Connect, learn whether AOF is on and check the server's memory policy.

        Raises:
            TierUnavailable: the server does not answer.
            ConfigError: the memory policy lets L3 grow without bound and
                `unbounded` is ``refuse``.
        """
        try:
            info = await self._client.info("persistence")
            server = await self._client.info("server")
            maxmemory, policy = await self._memory_policy()
        except (RedisError, OSError) as exc:
            raise self._error(exc) from exc
        self.aof_enabled = bool(int(info.get("aof_enabled", 0)))
        version = tuple(int(part) for part in str(server.get("redis_version", "0")).split(".")[:2] if part.isdigit())
        self._renew_on_read = version >= (6, 2)  # GETEX came with Redis 6.2
        self.unbounded_reason = self._unbounded_reason(maxmemory, policy)
        if self.unbounded_reason is None:
            return
        message = (
            f"L3 Redis {self.unbounded_reason}; set maxmemory with an allkeys-* eviction policy "
            f"(e.g. CONFIG SET maxmemory-policy allkeys-lru)"
        )
        if self._unbounded == "refuse":
            raise ConfigError(message)
        log.warning("%s", message)

    async def _memory_policy(self) -> tuple[int | None, str | None]:
        """The server's ``maxmemory`` and ``maxmemory-policy``; None where it will not say."""
        try:
            config = await self._client.config_get("maxmemory*")
            return int(config["maxmemory"]), str(config["maxmemory-policy"])
        except (ResponseError, KeyError, ValueError):
            pass  # CONFIG disabled or renamed (managed services): INFO says the same
        try:
            memory = await self._client.info("memory")
        except ResponseError:
            return None, None
        maxmemory = memory.get("maxmemory")
        policy = memory.get("maxmemory_policy")
        return (None if maxmemory is None else int(maxmemory)), (None if policy is None else str(policy))

    def _unbounded_reason(self, maxmemory: int | None, policy: str | None) -> str | None:
        if maxmemory is None and policy is None:
            log.warning("L3 Redis does not say its maxmemory policy (CONFIG and INFO refused); cannot check its bounds")
            return None
        if maxmemory == 0:
            ttl = f" (blocks expire after {self._ttl_ms / 1000:g}s unused)" if self._ttl_ms else ""
            return f"has no maxmemory: it grows until the host runs out of memory{ttl}"
        if policy == "noeviction":
            return "uses maxmemory-policy noeviction: once full it refuses every write, L3's and others'"
        if policy is not None and policy.startswith("volatile-") and not self._ttl_ms:
            return f"uses maxmemory-policy {policy} and l3.ttl_s is off: no block can be evicted"
        return None

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
                chunk = [self.redis_key(key) for key in keys[start : start + self._batch]]
                if self._ttl_ms is None or not self._renew_on_read:
                    frames.extend(await self._client.mget(chunk))
                    continue
                # GETEX renews the expiry of what is read: blocks in use stay.
                pipe = self._client.pipeline(transaction=False)
                for name in chunk:
                    pipe.getex(name, px=self._ttl_ms)
                frames.extend(await pipe.execute())
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
                # The good frames are still good: a failed clean-up costs no read.
                log.warning("could not delete %d corrupt L3 blocks: %s", len(bad), exc)
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
