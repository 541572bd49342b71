"""`kvgate up`'s cache nodes accept the engines' token and no one else.

Starts the local cluster's L2 (one real ``kvgate cache-node`` process) as
`kvgate up` does, then builds the store an engine would build from the
``--kv-transfer-config`` it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvcache.errors import TierUnavailable
from kvcache.membership import StaticMembership
from kvcache.metrics import StoreMetrics
from kvcache.settings import CacheSettings
from kvcache.tiers import PeerTier
from kvcache.wiring import build_store
from kvgate.cache_tiers import CacheTiers
from tests.support.kvcache_blocks import frame, key


async def test_engines_reach_the_local_cache_nodes_with_the_generated_token_and_others_do_not(tmp_path: Path) -> None:
    tiers = CacheTiers(tmp_path / "cache", nodes=1, redis_url=None)
    engine_args = await tiers.start()
    try:
        extra = json.loads(engine_args[1])["kv_connector_extra_config"]
        token_file = Path(extra["l2"]["token_file"])
        assert token_file.read_text() not in " ".join(engine_args)
        settings = CacheSettings.from_mapping(extra)
        store = build_store(settings, metrics=StoreMetrics(CollectorRegistry()))
        l2 = store.tiers[1]
        assert isinstance(l2, PeerTier)
        await l2.start()
        try:
            await l2.put([(key(1), frame(1, 4096))])
            assert [bytes(f) for f in await l2.get([key(1)]) if f is not None] == [bytes(frame(1, 4096))]
        finally:
            await store.aclose()
        stranger = PeerTier(StaticMembership(settings.l2.nodes()), timeout_s=5)
        await stranger.start()
        try:
            with pytest.raises(TierUnavailable):
                await stranger.get([key(1)])
        finally:
            await stranger.aclose()
    finally:
        tiers.stop()
