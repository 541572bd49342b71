"""Cache settings from the connector's JSON: shapes accepted and mistakes refused."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from kvcache.errors import ConfigError
from kvcache.metrics import StoreMetrics
from kvcache.settings import CacheSettings
from kvcache.tiers import DiskTier, LocalTier, PeerTier, RedisTier
from kvcache.wiring import build_store


def test_an_empty_object_gives_l1_only() -> None:
    store = build_store(CacheSettings.from_mapping({}), metrics=StoreMetrics(CollectorRegistry()))
    assert [type(t) for t in store.tiers] == [LocalTier]


def test_every_tier_is_built_in_order() -> None:
    settings = CacheSettings.from_mapping(
        {
            "l1": {"capacity_bytes": 1 << 20, "policy": "lru"},
            "l2": {"peers": "a=127.0.0.1:1,b=127.0.0.1:2?zone=z", "replicas": 2},
            "l3": {"kind": "redis", "url": "redis://127.0.0.1:1/0"},
        }
    )
    assert settings.l2.replicas == 2
    assert [n.node_id for n in settings.l2.nodes()] == ["a", "b"]
    store = build_store(settings, metrics=StoreMetrics(CollectorRegistry()))
    assert [type(t) for t in store.tiers] == [LocalTier, PeerTier, RedisTier]
    assert store.settings.inline_tiers == 1


def test_without_l1_nothing_is_written_inline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = CacheSettings.from_mapping({"l1": {"capacity_bytes": 0}, "l3": {"kind": "disk", "path": str(tmp_path)}})
    store = build_store(settings, metrics=StoreMetrics(CollectorRegistry()))
    assert [type(t) for t in store.tiers] == [DiskTier]
    assert store.settings.inline_tiers == 0


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"l4": {}}, id="unknown-section"),
        pytest.param({"l1": {"size": 1}}, id="unknown-key"),
        pytest.param({"l1": 5}, id="section-not-an-object"),
        pytest.param({"l3": {"kind": "s3"}}, id="unknown-l3-kind"),
    ],
)
def test_mistakes_are_config_errors(data: dict) -> None:
    with pytest.raises(ConfigError):
        CacheSettings.from_mapping(data)


def test_a_disk_l3_needs_a_path() -> None:
    with pytest.raises(ConfigError):
        build_store(CacheSettings.from_mapping({"l3": {"kind": "disk"}}), metrics=StoreMetrics(CollectorRegistry()))
