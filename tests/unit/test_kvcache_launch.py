"""The launcher contract: node command lines and the engines' connector config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache.launch import cache_node_argv, connector_extra_config, kv_transfer_config, redis_reachable
from kvcache.node import build_parser, parse_bytes, parse_labels
from kvcache.settings import CacheSettings


def test_a_node_command_line_parses_as_the_node_reads_it(tmp_path: Path) -> None:
    argv = cache_node_argv(
        node_id="n0", ready_file=tmp_path / "r.json", labels={"zone": "z", "host": "h"}, capacity_bytes=1 << 20,
        peers=["a=127.0.0.1:1"], replicas=2,
    )
    assert argv[1:4] == ["-m", "kvgate", "cache-node"]
    args = build_parser().parse_args(argv[4:])
    assert (args.node_id, args.port, args.capacity_bytes, args.replicas) == ("n0", 0, 1 << 20, 2)
    assert args.labels == (("host", "h"), ("zone", "z"))
    assert args.peers == ["a=127.0.0.1:1"]


@pytest.mark.parametrize(
    ("extra", "kinds"),
    [
        pytest.param({"peers": ["a=127.0.0.1:1"], "l3_redis_url": "redis://x:1/0"}, ("redis", True), id="redis"),
        pytest.param({"l3_directory": Path("/var/cache/kv")}, ("disk", False), id="directory"),
        pytest.param({}, ("none", False), id="l1-only"),
    ],
)
def test_the_connector_config_parses_as_the_connector_reads_it(extra: dict, kinds: tuple[str, bool]) -> None:
    config = json.loads(kv_transfer_config(connector_extra_config(**extra)))
    assert config["kv_connector"] == "TieredKVConnector"
    assert config["kv_connector_module_path"] == "kvcache.vllm_connector"
    assert config["kv_load_failure_policy"] == "recompute"
    settings = CacheSettings.from_mapping(config["kv_connector_extra_config"])
    assert (settings.l3.kind, settings.l2.enabled) == kinds


@pytest.mark.parametrize(("text", "value"), [("1024", 1024), ("512M", 512 << 20), ("2GiB", 2 << 30), ("1.5k", 1536)])
def test_byte_counts(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_labels() -> None:
    assert parse_labels("zone=z1, host=h1") == (("host", "h1"), ("zone", "z1"))


def test_an_unreachable_redis_is_reported_so() -> None:
    assert redis_reachable("redis://127.0.0.1:1/0", timeout_s=0.2) is False
