"""`TieredKVConnector`: vLLM's KV connector (v1 API) over the tiered block store.

Load it with::

    --kv-transfer-config '{"kv_connector": "TieredKVConnector",
                           "kv_connector_module_path": "kvcache.vllm_connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {...CacheSettings JSON...}}'

vLLM builds two instances, in different processes on CPU:

- Scheduler side: for a waiting request, `get_num_new_matched_tokens` hashes
  the prompt into blocks (`kvcache.keys`, seed-independent), asks which blocks
  exist beyond the engine's own prefix hit (L1 through the index the worker
  reports, L2 and L3 through the store, within `lookup_timeout_s`) and offers
  the longest run. `build_connector_meta` turns the plan into per-step loads
  and saves (`kvcache.transfer_plan`). Hits are reported per tier as host
  (L1), p2p (L2) and disk (L3) in ``vllm:prompt_tokens_cached_by_source``.
- Worker side: `start_load_kv` reads the step's blocks through the store (L1 →
  L2 → L3, promoting) and copies each whole block into the paged KV tensors
  (`kvcache.kv_pages`) before the forward; a block that is missing, corrupt
  or late is reported by `get_block_ids_with_load_errors`, and vLLM recomputes
  from there. `wait_for_save` frames the blocks that became full and hands
  them to the store (L1 inline, L2/L3 behind, bounded).

A tier that is down only costs hits; with every tier down the engine computes
everything itself. Metrics: the store's (hits, misses, bytes, latency per
tier, checksum failures, dropped writes) are exported through vLLM's
``/metrics`` (`kvcache.vllm_metrics`), and on ``connector.metrics_port`` when set.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvcache.errors import ConfigError
from kvcache.framing import new_frame, payload_of, seal
from kvcache.keys import BlockHash, BlockKey, Namespace, request_extra
from kvcache.loop import LoopThread
from kvcache.metrics import StoreMetrics
from kvcache.settings import CacheSettings, L1Settings
from kvcache.transfer_plan import RequestTransfers, TransferPlanner
from kvcache.vllm_metrics import StatsSnapshotter, TieredConnectorStats, TieredPromMetrics
from kvcache.wiring import build_store

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvcache.kv_pages import PageCodec
    from kvcache.store import Found, TieredStore

log = logging.getLogger(__name__)

#: Tier name -> how vLLM labels the tokens it supplied.
HIT_SOURCES: dict[str, CacheHitSource] = {
    "l1": CacheHitSource.HOST,
    "l2": CacheHitSource.P2P,
    "l3": CacheHitSource.DISK,
}


class TieredConnectorMetadata(KVConnectorMetadata):
    """Scheduler → worker, once per step: each request's loads and saves."""

    def __init__(self, transfers: list[RequestTransfers]) -> None:
        self.transfers = transfers


class TieredWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker → scheduler, once per step: keys that entered and left L1."""

    def __init__(self, added: list[bytes], removed: list[bytes]) -> None:
        self.added = added
        self.removed = removed

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, TieredWorkerMetadata)
        return TieredWorkerMetadata(self.added + other.added, self.removed + other.removed)


def _namespaces(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, model: str) -> list[Namespace]:
    """One namespace per tensor-parallel rank, from what both sides know.

    Raises:
        ConfigError: a KV cache this connector cannot share (several groups).
    """
    from vllm.platforms import current_platform

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(f"{len(groups)} KV cache groups; only single-group models are shared")
    spec = groups[0].kv_cache_spec
    layout = ":".join(
        (
            current_platform.device_type,
            type(spec).__name__,
            f"layers={len(groups[0].layer_names)}",
            f"heads={getattr(spec, 'num_kv_heads', '?')}",
            f"head={getattr(spec, 'head_size', '?')}",
            f"page={spec.page_size_bytes}",
            f"cache_dtype={vllm_config.cache_config.cache_dtype}",
        )
    )
    tp = vllm_config.parallel_config.tensor_parallel_size
    dtype = str(getattr(spec, "dtype", vllm_config.model_config.dtype)).removeprefix("torch.")
    return [Namespace(model, dtype, spec.block_size, layout, rank, tp) for rank in range(tp)]


class TieredKVConnector(KVConnectorBase_V1):
    """Shares KV blocks between vLLM engines through L1, L2 and L3."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._settings = CacheSettings.from_mapping(self._kv_transfer_config.kv_connector_extra_config)
        self._block_size = vllm_config.cache_config.block_size
        model = self._settings.connector.model or vllm_config.model_config.served_model_name or ""
        self._enabled = True
        try:
            self._namespaces = _namespaces(vllm_config, kv_cache_config, str(model))
        except ConfigError as exc:
            log.error("KV connector off: %s", exc)
            self._enabled = False
            self._namespaces = []
        if role == KVConnectorRole.SCHEDULER:
            self._rank = 0
            self._process = "scheduler"
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._rank = get_tensor_model_parallel_rank()
            self._process = f"worker{self._rank}"
        self._registry = CollectorRegistry()
        self._metrics = StoreMetrics(self._registry)
        self._snapshotter = StatsSnapshotter(self._registry, self._process)
        self._loop = LoopThread(f"kvcache-{self._process}")
        self._lock = threading.Lock()
        self._l1_changes: deque[tuple[str, BlockKey]] = deque()
        self._load_errors: set[int] = set()
        self._pending_save_bytes = 0
        self._codec: PageCodec | None = None
        if role == KVConnectorRole.SCHEDULER:
            # L1 lives in the worker: the scheduler learns its keys from the
            # worker's reports and asks only L2 and L3 itself.
            settings = dataclasses.replace(self._settings, l1=L1Settings(capacity_bytes=0))
            self._l1_index: set[bytes] = set()
            self._requests: dict[str, Request] = {}
            self._planner = TransferPlanner(block_size=self._block_size, lookup=self._lookup)
            self._store: TieredStore = build_store(settings, metrics=self._metrics)
        else:
            self._store = build_store(self._settings, metrics=self._metrics, l1_listener=self._on_l1_change)
            if self._settings.connector.metrics_port:
                start_http_server(self._settings.connector.metrics_port + self._rank, registry=self._registry)
        self._loop.run(self._store.start(), timeout=30)
        log.info(
            "TieredKVConnector %s: tiers %s, namespace %s",
            self._process,
            [tier.name for tier in self._store.tiers],
            self._namespaces[0] if self._namespaces else None,
        )

    # ------------------------------------------------------------------
    # Scheduler side
    # ------------------------------------------------------------------

    @staticmethod
    def _salt(request: Request) -> bytes:
        lora = getattr(request, "lora_request", None)
        return request_extra(getattr(request, "cache_salt", None), None if lora is None else lora.lora_name)

    def _lookup(self, hashes: Sequence[BlockHash]) -> list[str | None]:
        """Tier holding each block (all TP ranks' shards), or None."""
        self._snapshotter.mark_active()
        per_rank = [ns.keys(hashes) for ns in self._namespaces]
        where: list[str | None] = [None] * len(hashes)
        ask: list[int] = []
        with self._lock:
            for index in range(len(hashes)):
                if all(keys[index] in self._l1_index for keys in per_rank):
                    where[index] = "l1"
                else:
                    ask.append(index)
        if ask and self._store.tiers:
            asked = [keys[i] for keys in per_rank for i in ask]
            try:
                tiers = self._loop.run(self._store.exists(asked), self._settings.connector.lookup_timeout_s)
            except TimeoutError:
                log.warning("store lookup of %d blocks timed out", len(asked))
                return where
            for position, index in enumerate(ask):
                shards = tiers[position :: len(ask)]
                if all(shards):
                    where[index] = shards[0]
        return where

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._enabled or request.prompt_token_ids is None:
            return 0, False
        match = self._planner.match(
            request.request_id, request.prompt_token_ids, num_computed_tokens, salt=self._salt(request)
        )
        return match.blocks * self._block_size, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if not self._enabled or request.prompt_token_ids is None:
            return
        self._requests[request.request_id] = request
        match = self._planner.last_match(request.request_id)
        self._planner.allocated(
            request.request_id,
            request.all_token_ids,
            blocks.get_block_ids()[0],
            num_external_tokens,
            num_local_tokens=0 if match is None else match.start_block * self._block_size,
            salt=self._salt(request),
        )

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        counts: dict[CacheHitSource, int] = {}
        for tier, tokens in self._planner.hit_tiers(request.request_id, num_external_tokens).items():
            source = HIT_SOURCES.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
            counts[source] = counts.get(source, 0) + tokens
        return counts

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        transfers: list[RequestTransfers] = []
        if not self._enabled:
            return TieredConnectorMetadata(transfers)
        scheduled = scheduler_output.num_scheduled_tokens
        steps: list[tuple[str, list[int], int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            steps.append((new.req_id, new.block_ids[0], new.num_computed_tokens + scheduled.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            if self._kv_cache_manager is None:
                continue
            block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
            steps.append((req_id, block_ids, cached.num_computed_tokens[index] + scheduled.get(req_id, 0)))
        for req_id, block_ids, computed_after in steps:
            request = self._requests.get(req_id)
            if request is None:
                continue
            step = self._planner.step(req_id, request.all_token_ids, block_ids, computed_after)
            if step is not None:
                transfers.append(step)
        return TieredConnectorMetadata(transfers)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        report = connector_output.kv_connector_worker_meta
        if isinstance(report, TieredWorkerMetadata):
            with self._lock:
                self._l1_index.update(report.added)
                self._l1_index.difference_update(report.removed)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._planner.finished(request.request_id)
        self._requests.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------
    # Worker side
    # ------------------------------------------------------------------

    def _on_l1_change(self, change: str, key: BlockKey) -> None:
        self._l1_changes.append((change, key))  # deque: safe across threads

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from kvcache.kv_pages import PageCodec

        if not self._enabled:
            return
        spec = self._kv_cache_config.kv_cache_groups[0].kv_cache_spec
        try:
            self._codec = PageCodec(
                kv_caches, self._kv_cache_config.num_blocks, expected_page_bytes=spec.page_size_bytes
            )
        except ConfigError as exc:
            log.error("KV connector off: %s", exc)
            self._enabled = False
            return
        log.info("TieredKVConnector pages: %s, %d bytes per block", self._codec.layout, self._codec.block_bytes)

    def _key(self, block_hash: BlockHash) -> BlockKey:
        return self._namespaces[self._rank].key(block_hash)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        codec = self._codec
        if codec is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, TieredConnectorMetadata)
        loads = [load for transfer in meta.transfers for load in transfer.loads]
        if not loads:
            return
        self._snapshotter.mark_active()
        keys = [self._key(load.block_hash) for load in loads]
        found: list[Found | None]
        try:
            found = self._loop.run(self._store.get(keys), self._settings.connector.load_timeout_s)
        except TimeoutError:
            log.warning("loading %d blocks timed out: recomputing them", len(keys))
            found = [None] * len(keys)
        for load, hit in zip(loads, found):
            payload = None if hit is None else payload_of(hit.frame)
            if payload is None or payload.nbytes != codec.block_bytes:
                self._load_errors.add(load.block_id)
                continue
            codec.write_block(load.block_id, payload)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete in start_load_kv, before the forward

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return None  # whole blocks are saved after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        codec = self._codec
        if codec is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, TieredConnectorMetadata)
        saves = [save for transfer in meta.transfers for save in transfer.saves]
        if not saves:
            return
        self._snapshotter.mark_active()
        items = []
        for save in saves:
            key = self._key(save.block_hash)
            frame, body = new_frame(key, codec.block_bytes)
            codec.read_block(save.block_id, body)  # now: the pages may be reused after this step
            items.append((key, seal(frame)))
        size = sum(len(frame) for _, frame in items)
        with self._lock:
            if self._pending_save_bytes + size > self._settings.connector.save_queue_bytes:
                self._metrics.dropped_writes.labels("all", "save_queue_full").inc(len(items))
                self._metrics.dropped_bytes.labels("all").inc(size)
                return
            self._pending_save_bytes += size
        future = self._loop.submit(self._store.put(items))
        future.add_done_callback(lambda done: self._saved(size, done))

    def _saved(self, size: int, done: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._pending_save_bytes -= size
        self._snapshotter.mark_active()
        if not done.cancelled() and done.exception() is not None:
            log.error("saving blocks failed", exc_info=done.exception())

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._l1_changes:
            return None
        added: list[bytes] = []
        removed: list[bytes] = []
        while self._l1_changes:
            change, key = self._l1_changes.popleft()
            (added if change == "put" else removed).append(key)
        return TieredWorkerMetadata(added, removed)

    # ------------------------------------------------------------------
    # Both sides
    # ------------------------------------------------------------------

    def get_kv_connector_stats(self) -> TieredConnectorStats | None:
        return self._snapshotter.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TieredConnectorStats | None:
        return TieredConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> TieredPromMetrics:
        return TieredPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        try:
            self._loop.run(self._store.aclose(), timeout=10)
        except TimeoutError:
            log.warning("store did not close in time")
        self._loop.close()
