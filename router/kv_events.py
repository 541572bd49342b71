"""Engine KV events: the engines' own word on which blocks they hold.

vLLM publishes, over ZMQ PUB, frames `[topic, sequence (8 bytes, big-endian),
msgpack([ts, [event, ...], dp_rank])]`, each event a map tagged by `type`:
`BlockStored` (the engine's block hashes, their parent's, the blocks' token
ids, the block size), `BlockRemoved` (hashes evicted) and `AllBlocksCleared`.

`EngineBlocks` turns them into prefix-index updates for one pod. The engine's
hashes are its own (sha256 of a pickle, or a 64-bit digest); the index speaks
`kvcache.keys` chains, so for every stored block it recomputes our chained hash
from its parent's and its token ids (a chain's first block also with its cache
salt and LoRA adapter, from the event's extra keys, as the gateway and the
connector key requests; blocks with multimodal keys are skipped), and remembers engine hash -> our hash:
one entry per resident block, and all it needs to extend a chain, since our
hash names the whole prefix. A block whose parent it never saw cannot be
placed and is skipped, and so are blocks of another size than the gateway
hashes with (it follows the size the engines report). A gap in the sequence
numbers means events were lost: the pod's entries are dropped and rebuilt from
the events that follow (and from routing predictions). A malformed event or
batch is counted and skipped; it never ends the pod's subscription.

`KVEventListener` runs one SUB socket per pod on the event loop, added and
removed as pods come and go. It connects to an engine that binds its publisher
(vLLM's `tcp://*:PORT`), or, for an endpoint written `listen:tcp://HOST:PORT`,
binds there for an engine that connects (vLLM connects when its endpoint names
a host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from kvcache.keys import ROOT_HASH, BlockHash, hash_block, request_extra
from router.index import PrefixIndex
from router.pods import PodId

log = logging.getLogger(__name__)

#: Backoff between attempts to bind or connect a pod's subscriber, in seconds.
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 5.0

#: Largest event message accepted, in bytes: a step's batch is kilobytes; a
#: larger message closes the connection instead of filling memory.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: Endpoint prefix: the gateway binds and the engine connects, instead of the reverse.
LISTEN = "listen:"


def parse_event_sources(pairs: Iterable[str]) -> dict[PodId, str]:
    """`POD_URL=ENDPOINT` pairs (flags, config) as pod id -> endpoint.

    Raises:
        ValueError: a pair without `=`.
    """
    sources = {}
    for pair in pairs:
        url, sep, endpoint = pair.partition("=")
        if not sep or not url or not endpoint:
            raise ValueError(f"KV event source {pair!r}: expected POD_URL=ENDPOINT")
        sources[PodId(url.rstrip("/"))] = endpoint
    return sources


def decode_batch(payload: bytes) -> list[Mapping[str, Any]]:
    """The events of one published batch (maps with a `type`).

    Raises:
        ValueError: the payload is not a batch.
    """
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError(f"undecodable KV event batch: {exc}") from exc
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("KV event batch is not [ts, events, ...]")
    return list(batch[1])


class EngineBlocks:
    """One pod's blocks as its engine reports them, applied to the prefix index.

    Args:
        pod: the pod the events come from.
        index: the gateway's prefix index.
        block_size: tokens per block the gateway hashes with (a number, or a
            callable giving the current one: the gateway learns the engines'
            size from their metrics); stored blocks of another size cannot
            match the gateway's hashes and are skipped.
        on_stored: told of every block the engine stored, as our chained
            hashes (the shared KV cache's belief, `router.shared_tier`).
    """

    def __init__(
        self,
        pod: PodId,
        index: PrefixIndex,
        block_size: int | Callable[[], int],
        on_stored: Callable[[PodId, list[BlockHash]], None] | None = None,
    ) -> None:
        self.pod = pod
        self.index = index
        self.on_stored = on_stored
        self.block_size: Callable[[], int] = block_size if callable(block_size) else (lambda: block_size)
        # Engine hash -> our chained hash of the same block. The engine holds
        # at most its capacity, and says what it evicts; oldest entries go
        # first should it fail to (see `_bound`).
        self._ours: OrderedDict[Hashable, BlockHash] = OrderedDict()
        self._last_seq: int | None = None
        self.stored = self.removed = self.skipped = self.gaps = self.malformed = 0
        self._reported = False

    def sequence(self, seq: int) -> None:
        """Check the batch sequence number; on a gap forget everything (events were lost)."""
        if self._last_seq is not None and seq != self._last_seq + 1:
            self.gaps += 1
            dropped = self.index.drop_pod(self.pod)
            self._ours.clear()
            log.warning("lost KV events from %s (sequence %d after %d); forgot %d blocks", self.pod, seq, self._last_seq, dropped)
        self._last_seq = seq

    def apply(self, events: Iterable[Any]) -> None:
        """Apply a batch's events in order; a malformed event is counted and skipped."""
        for event in events:
            try:
                self._apply_one(event)
            except (TypeError, ValueError, OverflowError, struct.error) as exc:
                self.bad_input(f"malformed {_kind(event)} event: {exc}")

    def bad_input(self, why: str) -> None:
        """Count an event or batch that could not be used; log the first one per pod."""
        self.malformed += 1
        if not self._reported:
            self._reported = True
            log.warning("KV events from %s: %s (further ones are only counted)", self.pod, why)

    def _apply_one(self, event: Any) -> None:
        if not isinstance(event, Mapping):
            raise TypeError("an event must be a map")
        kind = event.get("type")
        if kind == "BlockStored":
            self._stored(event)
        elif kind == "BlockRemoved":
            for engine_hash in _hashes(event):
                ours = self._ours.pop(_hashable(engine_hash), None)
                if ours is not None and self.index.remove_block(self.pod, ours):
                    self.removed += 1
        elif kind == "AllBlocksCleared":
            self.index.drop_pod(self.pod)
            self._ours.clear()

    def _stored(self, event: Mapping[str, Any]) -> None:
        size = event.get("block_size")
        hashes = _hashes(event)
        tokens = event.get("token_ids") or []
        if not isinstance(tokens, list):
            raise TypeError("token_ids must be a list")
        lora = event.get("lora_name")
        if (
            size != self.block_size()
            or len(tokens) != size * len(hashes)
            or (event.get("lora_id") is not None and lora is None)
        ):
            self.skipped += len(hashes)
            return
        parent = event.get("parent_block_hash")
        if parent is None:
            chained = ROOT_HASH
        else:
            known = self._ours.get(_hashable(parent))
            if known is None:
                self.skipped += len(hashes)
                return
            chained = known
        ours: list[BlockHash] = []
        for i in range(len(hashes)):
            extra = block_extra(event, i)
            if extra is None:  # multimodal or embedding keys: prompts the gateway never keys
                self.skipped += len(hashes) - i
                break
            # As the connector keys it: salt and adapter on a chain's first block only.
            first = parent is None and i == 0
            chained = hash_block(chained, tokens[i * size : (i + 1) * size], extra if first else b"")
            ours.append(chained)
        if not ours:
            return
        for engine_hash, block in zip(hashes, ours):
            self._ours[_hashable(engine_hash)] = block
            self._ours.move_to_end(_hashable(engine_hash))
        # NOTE: only the new blocks are refreshed, not their ancestors: that
        # would mean walking the chain back to its root on every event
        # (quadratic over a long prompt stored step by step). The router's own
        # insert at routing time already refreshed the whole prompt.
        self.index.insert(self.pod, ours)
        if self.on_stored is not None:
            self.on_stored(self.pod, ours)
        self.stored += len(ours)
        self._bound()

    def _bound(self) -> None:
        limit = 2 * max(self.index.capacity(self.pod), 1024)
        while len(self._ours) > limit:
            self._ours.popitem(last=False)


def block_extra(event: Mapping[str, Any], index: int) -> bytes | None:
    """Our extra keys (`kvcache.keys.request_extra`) for block `index` of a `BlockStored` event.

    vLLM publishes each block's extra keys untagged, in this order: the LoRA
    name (when `lora_name` is set), `(mm_identifier, offset)` pairs, the cache
    salt (first block of a request only), prompt-embedding digests.

    Returns:
        The bytes to fold into the block (used for a chain's first block), or
        None when the block carries multimodal or embedding keys, whose
        prompts the gateway never keys.
    """
    lora = event.get("lora_name")
    per_block = event.get("extra_keys")
    entry = per_block[index] if isinstance(per_block, list) and index < len(per_block) else None
    keys = list(entry) if isinstance(entry, (list, tuple)) else []
    if isinstance(lora, str) and keys and keys[0] == lora:
        keys.pop(0)
    if len(keys) > 1 or (keys and not isinstance(keys[0], str)):
        return None
    return request_extra(keys[0] if keys else None, lora if isinstance(lora, str) else None)


def _hashes(event: Mapping[str, Any]) -> list[Any]:
    hashes = event.get("block_hashes") or []
    if not isinstance(hashes, list):
        raise TypeError("block_hashes must be a list")
    return hashes


def _kind(event: Any) -> str:
    kind = event.get("type") if isinstance(event, Mapping) else None
    return kind if isinstance(kind, str) else "untyped"


def _hashable(value: Any) -> Hashable:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        raise TypeError("a block hash cannot be a map")
    return value


class KVEventListener:
    """Subscribes to each pod's KV event endpoint and keeps the index confirmed.

    Subscriptions can be added and removed while it runs (`add`, `remove`), as
    discovery finds pods and loses them. A batch or event that cannot be used
    is counted on the pod's `EngineBlocks` (`malformed`) and never ends its
    subscription.

    Args:
        index: the prefix index.
        sources: pod id -> ZMQ endpoint (e.g. `tcp://127.0.0.1:5557`) to
            subscribe to on `start`.
        block_size: the gateway's block size, or a callable returning its
            current one (so events follow what the engines report).
        on_stored: passed to each pod's `EngineBlocks`.
    """

    def __init__(
        self,
        index: PrefixIndex,
        sources: Mapping[PodId, str],
        block_size: int | Callable[[], int],
        on_stored: Callable[[PodId, list[BlockHash]], None] | None = None,
    ) -> None:
        self.index = index
        self.block_size = block_size
        self.on_stored = on_stored
        self.sources: dict[PodId, str] = {}
        self.engines: dict[PodId, EngineBlocks] = {}
        self._context: zmq.asyncio.Context | None = None
        self._tasks: dict[PodId, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()
        for pod, endpoint in sources.items():
            self.add(pod, endpoint)

    def start(self) -> None:
        """Open the ZMQ context and subscribe to every source added so far."""
        self._context = zmq.asyncio.Context()
        for pod in self.sources:
            self._spawn(pod)

    def add(self, pod: PodId, endpoint: str) -> None:
        """Subscribe to `pod`'s events at `endpoint` (at once if started, else on `start`).

        Adding a pod already subscribed at the same endpoint changes nothing;
        at another endpoint, the old subscription is replaced.
        """
        if self.sources.get(pod) == endpoint and (self._context is None or pod in self._tasks):
            return
        self._cancel(pod)
        self.sources[pod] = endpoint
        self.engines[pod] = EngineBlocks(pod, self.index, self.block_size, self.on_stored)
        if self._context is not None:
            self._spawn(pod)

    def remove(self, pod: PodId) -> None:
        """Stop following `pod`'s events. Its entries in the index are left to the monitor."""
        self._cancel(pod)
        self.sources.pop(pod, None)
        self.engines.pop(pod, None)

    async def stop(self) -> None:
        """End every subscription and close the ZMQ context."""
        for pod in list(self._tasks):
            self._cancel(pod)
        for task in list(self._closing):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._context is not None:
            self._context.term()
            self._context = None

    def _spawn(self, pod: PodId) -> None:
        task = asyncio.create_task(self._listen(pod, self.sources[pod], self.engines[pod]), name=f"kv-events {pod}")
        self._tasks[pod] = task

    def _cancel(self, pod: PodId) -> None:
        task = self._tasks.pop(pod, None)
        if task is not None:
            task.cancel()
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _listen(self, pod: PodId, endpoint: str, engine: EngineBlocks) -> None:
        assert self._context is not None
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        try:
            await self._attach(socket, pod, endpoint)
            while True:
                frames = await socket.recv_multipart()
                self._handle(engine, frames)
        finally:
            socket.close()

    @staticmethod
    async def _attach(socket: zmq.asyncio.Socket, pod: PodId, endpoint: str) -> None:
        """Bind or connect, retrying: a port just released (a pod re-added) frees up shortly."""
        delay = _RETRY_FIRST_S
        while True:
            try:
                if endpoint.startswith(LISTEN):
                    socket.bind(endpoint[len(LISTEN) :])  # the engine's publisher connects to us
                else:
                    socket.connect(endpoint)  # the engine's publisher binds (vLLM's `tcp://*:PORT`)
                return
            except zmq.ZMQError as exc:
                if delay == _RETRY_FIRST_S:
                    log.warning("KV events of %s at %s: %s; retrying", pod, endpoint, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    @staticmethod
    def _handle(engine: EngineBlocks, frames: list[bytes]) -> None:
        if len(frames) < 3 or len(frames[1]) != 8:
            engine.bad_input(f"a message of {len(frames)} frames is not [topic, sequence, batch]")
            return
        engine.sequence(int.from_bytes(frames[1], "big"))
        try:
            engine.apply(decode_batch(frames[2]))
        except ValueError as exc:
            engine.bad_input(str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad batch must not end the pod's subscription
            log.exception("KV event batch from %s could not be applied", engine.pod)
            engine.bad_input(f"{type(exc).__name__}: {exc}")
