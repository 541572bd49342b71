"""Engine KV events: the engines' own word on which blocks they hold.

vLLM publishes, over ZMQ PUB, frames `[topic, sequence (8 bytes, big-endian),
msgpack([ts, [event, ...], dp_rank])]`, each event a map tagged by `type`:
`BlockStored` (the engine's block hashes, their parent's, the blocks' token
ids, the block size), `BlockRemoved` (hashes evicted) and `AllBlocksCleared`.

`EngineBlocks` turns them into prefix-index updates for one pod. The engine's
hashes are its own (sha256 of a pickle, or a 64-bit digest); the index speaks
`kvcache.keys` chains, so for every stored block it recomputes our hash from
its parent's and its token ids (the first block of a chain also with its
cache salt and LoRA adapter, from the event's extra keys, as the gateway and
the connector key requests), and remembers engine hash -> path. A block whose
parent it never saw, or that carries multimodal keys, is skipped. A gap in the
sequence numbers means events were lost: the pod's entries are dropped and
rebuilt from the events that follow (and from routing predictions).

`KVEventListener` runs one SUB socket per pod on the event loop. It connects
to an engine that binds its publisher (vLLM's `tcp://*:PORT`), or, for an
endpoint written `listen:tcp://HOST:PORT`, binds there for an engine that
connects (vLLM connects when its endpoint names a host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from kvcache.keys import ROOT_HASH, BlockHash, hash_block, request_extra
from router.index import PrefixIndex
from router.pods import PodId

log = logging.getLogger(__name__)

Path = tuple[BlockHash, ...]

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
    return [e for e in batch[1] if isinstance(e, Mapping)]


class EngineBlocks:
    """One pod's blocks as its engine reports them, applied to the prefix index.

    Args:
        pod: the pod the events come from.
        index: the gateway's prefix index.
        block_size: tokens per block the gateway hashes with; stored blocks of
            another size are ignored.
    """

    def __init__(self, pod: PodId, index: PrefixIndex, block_size: int) -> None:
        self.pod = pod
        self.index = index
        self.block_size = block_size
        self._paths: dict[Hashable, Path] = {}
        self._last_seq: int | None = None
        self.stored = self.removed = self.skipped = self.gaps = 0

    def sequence(self, seq: int) -> None:
        """Check the batch sequence number; on a gap forget everything (events were lost)."""
        if self._last_seq is not None and seq != self._last_seq + 1:
            self.gaps += 1
            dropped = self.index.drop_pod(self.pod)
            self._paths.clear()
            log.warning("lost KV events from %s (sequence %d after %d); forgot %d blocks", self.pod, seq, self._last_seq, dropped)
        self._last_seq = seq

    def apply(self, events: Iterable[Mapping[str, Any]]) -> None:
        for event in events:
            kind = event.get("type")
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                for engine_hash in event.get("block_hashes") or ():
                    path = self._paths.pop(_hashable(engine_hash), None)
                    if path is not None and self.index.remove_block(self.pod, path):
                        self.removed += 1
            elif kind == "AllBlocksCleared":
                self.index.drop_pod(self.pod)
                self._paths.clear()

    def _stored(self, event: Mapping[str, Any]) -> None:
        size = event.get("block_size")
        hashes = event.get("block_hashes") or []
        tokens = event.get("token_ids") or []
        lora = event.get("lora_name")
        if size != self.block_size or len(tokens) != size * len(hashes) or (event.get("lora_id") is not None and lora is None):
            self.skipped += len(hashes)
            return
        parent = event.get("parent_block_hash")
        if parent is None:
            path: Path = ()
        else:
            known = self._paths.get(_hashable(parent))
            if known is None:
                self.skipped += len(hashes)
                return
            path = known
        for i, engine_hash in enumerate(hashes):
            extra = block_extra(event, i)
            if extra is None:
                self.skipped += len(hashes) - i
                break
            # As the connector keys it: salt and adapter on the first block only.
            ours = hash_block(path[-1] if path else ROOT_HASH, tokens[i * size : (i + 1) * size], b"" if path else extra)
            path = path + (ours,)
            self._paths[_hashable(engine_hash)] = path
            self.stored += 1
        if path:
            self.index.insert(self.pod, path)


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


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


class KVEventListener:
    """Subscribes to each pod's KV event endpoint and keeps the index confirmed.

    Args:
        index: the prefix index.
        sources: pod id -> ZMQ endpoint (e.g. `tcp://127.0.0.1:5557`).
        block_size: returns the gateway's current block size.
    """

    def __init__(self, index: PrefixIndex, sources: Mapping[PodId, str], block_size: int) -> None:
        self.index = index
        self.sources = dict(sources)
        self.block_size = block_size
        self.engines = {pod: EngineBlocks(pod, index, block_size) for pod in self.sources}
        self._context: zmq.asyncio.Context | None = None
        self._tasks: dict[PodId, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()

    def start(self) -> None:
        self._context = zmq.asyncio.Context()
        for pod in self.sources:
            self._spawn(pod)

    def add(self, pod: PodId, endpoint: str) -> None:
        """Subscribe to `pod`'s events at `endpoint`, with an empty block map.

        Idempotent for the same endpoint; another endpoint replaces the old
        subscription. Before `start` it only records the source.
        """
        if self.sources.get(pod) == endpoint:
            return
        self.remove(pod)
        self.sources[pod] = endpoint
        self.engines[pod] = EngineBlocks(pod, self.index, self.block_size)
        if self._context is not None:
            self._spawn(pod)

    def remove(self, pod: PodId) -> None:
        """Stop listening to `pod` (idempotent). Its index entries are the caller's business."""
        self.sources.pop(pod, None)
        self.engines.pop(pod, None)
        task = self._tasks.pop(pod, None)
        if task is not None:
            task.cancel()
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _spawn(self, pod: PodId) -> None:
        self._tasks[pod] = asyncio.create_task(self._listen(pod, self.sources[pod]), name=f"kv-events {pod}")

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *self._closing]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._context is not None:
            self._context.term()
            self._context = None

    async def _listen(self, pod: PodId, endpoint: str) -> None:
        assert self._context is not None
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        if endpoint.startswith(LISTEN):
            socket.bind(endpoint[len(LISTEN) :])  # the engine's publisher connects to us
        else:
            socket.connect(endpoint)  # the engine's publisher binds (vLLM's `tcp://*:PORT`)
        engine = self.engines[pod]
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) < 3 or len(frames[1]) != 8:
                    continue
                engine.sequence(int.from_bytes(frames[1], "big"))
                try:
                    engine.apply(decode_batch(frames[2]))
                except ValueError as exc:
                    log.warning("bad KV event batch from %s: %s", pod, exc)
        finally:
            socket.close()
