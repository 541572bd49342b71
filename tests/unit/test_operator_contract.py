"""The command lines and files the operator renders are what kvgate's own parsers accept.

The renderers name flags and settings keys of `kvgate serve`, `kvgate
cache-node` and the vLLM connector without importing them (the operator
stands alone); here the real parsers read what was rendered, with the
`$(VAR)` references filled in as Kubernetes would.
"""

from __future__ import annotations

import json
import re

import yaml

from kvcache.node import build_parser as cache_node_parser
from kvcache.settings import CacheSettings
from operators.meta import Owner
from operators.render import Refs, render_cache, render_engine, render_gateway
from operators.specs import load_spec
from router.server import build_parser as gateway_parser
from router.server import settings_from_args

POD_ENV = {"POD_NAME": "kv-0", "POD_IP": "10.0.0.7", "POD_NAMESPACE": "ns", "NODE_NAME": "node-a",
           "KVGATE_API_KEY_0": "k0", "KVGATE_API_KEY_1": "k1", "KVGATE_STATE_URL": "redis://state:6379/0",
           "KVGATE_L3_REDIS_URL": "redis://l3:6379/0"}


def expand(arg: str) -> str:
    """Kubernetes' `$(VAR)` expansion of container args."""
    return re.sub(r"\$\((\w+)\)", lambda m: POD_ENV[m.group(1)], arg)


def workload_container(children):
    workload = next(c for c in children if c["kind"] in {"StatefulSet", "Deployment"})
    return workload["spec"]["template"]["spec"]["containers"][0]


def test_cache_node_command_line_parses():
    spec = load_spec("KVCache", {"capacityPerNode": "2Gi", "replicationFactor": 2, "auth": {"secretName": "t"}})
    args = [expand(a) for a in workload_container(render_cache(Owner("KVCache", "kv", "ns", "u"), spec))["args"]]
    assert args[0] == "cache-node"
    parsed = cache_node_parser().parse_args(args[1:])
    assert (parsed.membership, parsed.namespace, parsed.node_id) == ("kubernetes", "ns", "kv-0")
    assert parsed.selector == "app.kubernetes.io/name=kvgate,app.kubernetes.io/instance=kv,app.kubernetes.io/component=cache"
    assert parsed.capacity_bytes == 2 << 30 and parsed.replicas == 2
    assert str(parsed.token_file) == "/etc/kvgate/cache-token/token"
    assert parsed.advertise_host == "10.0.0.7"


def test_gateway_command_line_and_config_file_give_kubernetes_discovery(tmp_path):
    pool = load_spec("EnginePool", {"model": "m", "port": 8100})
    spec = load_spec("KVGateway", {"enginePoolRef": {"name": "pool"}, "apiKeys": {"secretName": "s", "keys": ["a", "b"]},
                                   "routing": {"policy": "prefix-cache", "stateSecretName": "st"},
                                   "admission": {"maxQueue": 7, "adaptive": False}})
    children = render_gateway(Owner("KVGateway", "gw", "ns", "u"), spec, Refs(engine_pool=("pool", pool)))
    config = next(c for c in children if c["kind"] == "ConfigMap")["data"]["gateway.yaml"]
    (tmp_path / "gateway.yaml").write_text(config)
    args = [expand(a) for a in workload_container(children)["args"]]
    assert args[0] == "serve"
    args[args.index("--config") + 1] = str(tmp_path / "gateway.yaml")
    settings = settings_from_args(gateway_parser().parse_args(args[1:]))
    assert settings.discovery.kind == "kubernetes"
    assert settings.discovery.namespace == "ns" and settings.discovery.pod_port == 8100
    selector = settings.discovery.selector
    text = ",".join(selector) if isinstance(selector, (list, tuple)) else str(selector)
    assert "app.kubernetes.io/instance=pool" in text and "app.kubernetes.io/component=engine" in text
    assert tuple(settings.server.api_keys) == ("k0", "k1")
    assert settings.routing.policy == "prefix-cache" and settings.admission.max_queue == 7
    assert settings.admission.adaptive is False
    assert settings.server.host == "0.0.0.0"
    assert settings.state.url == "redis://state:6379/0"
    assert yaml.safe_load(config)["server"]["drain_grace_s"] == 30


def test_connector_config_with_redis_l3_and_token_is_accepted():
    cache = load_spec("KVCache", {"l3": {"redis": {"secretName": "r"}}, "auth": {"secretName": "t"}})
    pool = load_spec("EnginePool", {"model": "m", "kvCacheRef": {"name": "kv"}})
    args = workload_container(render_engine(Owner("EnginePool", "p", "ns", "u"), pool, Refs(kv_cache=("kv", cache))))["args"]
    config = json.loads(expand(args[args.index("--kv-transfer-config") + 1]))
    settings = CacheSettings.from_mapping(config["kv_connector_extra_config"])
    assert settings.l3.kind == "redis" and settings.l3.url == "redis://l3:6379/0"
    assert settings.l2.kubernetes_namespace == "ns" and settings.l2.token_file == "/etc/kvgate/cache-token/token"
