"""A replica's two connections to the store: the batch writer and the stream follower.

`StoreWriter`: `RedisState` hands it one batch at a time (the encoded events,
the replica's snapshot, the counters' increments). `send` writes the batch as
one call of `WRITE_SCRIPT` into the connection's socket in the caller's own
step and returns: the caller (a request about to leave for its pod) waits for
no round trip. Redis executes one connection's commands in order, so batches
reach the stream in the order they were sent, and a batch sent before a
request leaves for its pod is in the store about when the pod sees the
request. A task reads the replies, one per batch, in the same order, and
reports each (whether the replica's lease key was still there, and how long
the store took) or the first failure; `settle` waits until the store has
answered every batch sent so far (the end of an answer, a replica leaving).

`StreamFollower`: one blocking XREAD after another on a connection of its
own, the command packed once.

Why not redis-py's client calls: every change of load was a transaction
(MULTI, four commands, EXEC: six replies) awaited on the request's path, and
every read went through the client's pool, retry and reply-callback layers,
all in pure Python. One script call is one command and one integer reply;
both connections use redis-py's `Connection` (connect, TLS, AUTH, RESP
parsing) and nothing above it.

Not here: what goes into a batch and when it is written (`RedisState`),
what the entries mean (`router.state.inbox`), the lease loop
(`router.state.lease`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

#: Appends a batch to the stream and writes the replica's snapshot and lease in one step.
#: KEYS: the stream, this replica's snapshot key, the set of replicas, the counters hash.
#: ARGV: replica id, events, snapshot, lease in ms, stream length, then user and cost pairs.
#: Returns 1 when the snapshot key was still there before this write, 0 when it was gone.
WRITE_SCRIPT = """
local had = redis.call('EXISTS', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'r', ARGV[1], 'e', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[1])
for i = 6, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[4], ARGV[i], ARGV[i + 1])
end
return had
"""

WRITE_SCRIPT_SHA = hashlib.sha1(WRITE_SCRIPT.encode()).hexdigest()

#: What a failing store raises through redis-py.
STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

#: A stream entry as read: its id and its fields.
Entry = tuple[bytes, dict[bytes, bytes]]


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def _bulks(args: Sequence[bytes | str | int | float]) -> bytes:
    out = []
    for arg in args:
        if isinstance(arg, bytes):
            out.append(_bulk(arg))
        elif isinstance(arg, str):
            out.append(_bulk(arg.encode()))
        else:
            out.append(_bulk(repr(arg).encode()))
    return b"".join(out)


def command(*args: bytes | str | int | float) -> bytes:
    """One Redis command in the protocol's wire form (an array of bulk strings)."""
    return b"*%d\r\n" % len(args) + _bulks(args)


def _connection(url: str, connect_timeout_s: float) -> Any:
    pool = aioredis.ConnectionPool.from_url(url, socket_connect_timeout=connect_timeout_s, socket_timeout=None)
    return pool.make_connection()


class StoreWriter:
    """One connection to the store that batches are written on, and the task reading its replies.

    Args:
        url: the store (`redis://`, `rediss://` or `unix://`).
        keys: the script's four keys (stream, snapshot key, replica set, counters hash).
        connect_timeout_s: seconds to connect and load the script.
        reply_timeout_s: seconds the store may take to answer a batch before it counts as failed.
        on_reply: called per batch, in order, with the batch's tag, whether the
            lease key was still there, and the seconds from send to reply.
        on_failure: called once, with the error, when the connection fails.
    """

    def __init__(
        self,
        url: str,
        keys: Sequence[str],
        *,
        connect_timeout_s: float,
        reply_timeout_s: float,
        on_reply: Callable[[bool, bool, float], None],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        if len(keys) != 4:
            raise ValueError("the write script takes four keys")
        self._connection = _connection(url, connect_timeout_s)
        head = ("EVALSHA", WRITE_SCRIPT_SHA, len(keys), *keys)
        self._head, self._head_count = _bulks(head), len(head)
        self._connect_timeout_s = connect_timeout_s
        self._reply_timeout_s = reply_timeout_s
        self._on_reply = on_reply
        self._on_failure = on_failure
        # (tag, sent at) per batch whose reply is still to come, oldest first
        self._pending: deque[tuple[bool, float]] = deque()
        self._more = asyncio.Event()
        self._replies: asyncio.Task | None = None
        self._failed = False
        self._sent = 0  # batches sent since the connection opened
        # (batches sent when it began, future) per `settle` waiting; in that order, so the counts never fall
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def pending(self) -> int:
        """Batches sent whose reply has not been read yet."""
        return len(self._pending)

    @property
    def _answered(self) -> int:
        """Batches the store has answered (their replies come in the order they were sent)."""
        return self._sent - len(self._pending)

    async def open(self) -> None:
        """Connect and make sure the store has the script.

        Raises:
            RedisError, OSError, asyncio.TimeoutError: the store did not answer or refused.
        """
        async with asyncio.timeout(self._connect_timeout_s):
            await self._connection.connect()
            await self._connection.send_packed_command(command("SCRIPT", "LOAD", WRITE_SCRIPT), check_health=False)
            sha = await self._connection.read_response()
        if (sha.decode() if isinstance(sha, bytes) else sha) != WRITE_SCRIPT_SHA:
            raise ConnectionError(f"the store loaded the write script as {sha!r}, not {WRITE_SCRIPT_SHA}")
        self._replies = asyncio.create_task(self._read_replies(), name="state replies")

    async def send(self, args: Sequence[bytes | str | int | float], *, tag: bool = False) -> None:
        """Write one batch (the script's ARGV) into the socket; returns without waiting for the store.

        Returns at once unless the socket's buffers are full (the store stopped
        reading), in which case it waits for them to drain.

        Args:
            args: the script's arguments.
            tag: handed back to `on_reply` with this batch's reply.

        Raises:
            RedisError, OSError: the connection failed (the writer is then unusable).
        """
        if self._failed:
            raise ConnectionError("the state store connection had failed")
        packed = b"*%d\r\n%b%b" % (self._head_count + len(args), self._head, _bulks(args))
        self._pending.append((tag, time.perf_counter()))
        self._sent += 1
        self._more.set()
        await self._connection.send_packed_command(packed, check_health=False)

    async def settle(self, timeout_s: float) -> bool:
        """Wait until every batch sent so far has its reply; batches sent meanwhile are not waited for.

        Returns whether they all had it: False if `timeout_s` passed first or
        the connection failed.
        """
        target = self._sent
        if self._answered >= target:
            return True
        if self._failed:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await waiter
        return self._answered >= target

    async def close(self) -> None:
        """Stop reading replies and disconnect (batches not answered yet are left to the store)."""
        self._failed = True
        self._wake_waiters(self._sent)  # they end unanswered
        if self._replies is not None:
            self._replies.cancel()
            await asyncio.gather(self._replies, return_exceptions=True)
        with contextlib.suppress(*STORE_ERRORS):
            await self._connection.disconnect(nowait=True)

    async def _read_replies(self) -> None:
        try:
            while True:
                if not self._pending:
                    self._more.clear()
                    await self._more.wait()
                    continue
                # NOTE: not read_response(timeout=...): on a timeout it returns None as if the store had answered.
                async with asyncio.timeout(self._reply_timeout_s):
                    reply = await self._connection.read_response()
                tag, sent_at = self._pending.popleft()
                self._wake_waiters(self._answered)
                self._on_reply(tag, bool(reply), time.perf_counter() - sent_at)
        except STORE_ERRORS as exc:
            self._failed = True
            self._wake_waiters(self._sent)
            self._on_failure(exc)

    def _wake_waiters(self, upto: int) -> None:
        """Wake every `settle` that waits for no more than `upto` batches."""
        while self._waiters and self._waiters[0][0] <= upto:
            waiter = self._waiters.popleft()[1]
            if not waiter.done():
                waiter.set_result(None)


class StreamFollower:
    """Blocking reads of one stream, one after another, on a connection of its own.

    Args:
        url: the store.
        stream: the stream's key.
        block_ms: how long one read waits for new entries.
        count: entries one read returns at most.
        connect_timeout_s: seconds to connect.
    """

    def __init__(self, url: str, stream: str, *, block_ms: int, count: int, connect_timeout_s: float) -> None:
        self._connection = _connection(url, connect_timeout_s)
        self._head = b"*8\r\n" + _bulks(("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", stream))
        self._read_timeout_s = block_ms / 1000 + connect_timeout_s

    async def read(self, after: str | bytes) -> list[Entry]:
        """The entries after id `after`, waiting up to `block_ms` for some (none: an empty list).

        Raises:
            RedisError, OSError, asyncio.TimeoutError: the store failed or did not answer in time.
        """
        connection = self._connection
        if not connection.is_connected:
            await connection.connect()
        await connection.send_packed_command(self._head + _bulk(after if isinstance(after, bytes) else after.encode()), check_health=False)
        async with asyncio.timeout(self._read_timeout_s):
            reply = await connection.read_response()
        if not reply:
            return []
        streams = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
        out: list[Entry] = []
        for entries in streams:
            for entry_id, fields in entries:
                if isinstance(fields, list):
                    fields = dict(zip(fields[::2], fields[1::2]))
                out.append((entry_id, fields))
        return out

    async def close(self) -> None:
        """Disconnect."""
        with contextlib.suppress(*STORE_ERRORS):
            await self._connection.disconnect(nowait=True)
