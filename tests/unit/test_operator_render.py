"""The operator's pure parts on tables: specs, renderers, status (no API server)."""

from __future__ import annotations

import json

import pytest

from operators.errors import DependencyError, SpecError
from operators.meta import Owner, quantity_bytes
from operators.render import RENDERERS, Refs, render_cache, render_engine, render_gateway
from operators.specs import load_spec
from operators.status import condition, gateway_status, parse_cache_config, pod_ready, ring_version


def owner(kind: str, name: str) -> Owner:
    return Owner(kind, name, "ns", f"uid-{name}", 3)


def by_kind(children, kind):
    return next(c for c in children if c["kind"] == kind)


def pod_of(children, kind):
    return by_kind(children, kind)["spec"]["template"]["spec"]


def container(children, kind):
    return pod_of(children, kind)["containers"][0]


def fleet(cache_spec=None, pool_spec=None, gateway_spec=None):
    cache = load_spec("KVCache", cache_spec or {})
    pool = load_spec("EnginePool", {"model": "m", "kvCacheRef": {"name": "c"}, **(pool_spec or {})})
    gateway = load_spec("KVGateway", {"enginePoolRef": {"name": "p"}, **(gateway_spec or {})})
    return {
        "KVCache": render_cache(owner("KVCache", "c"), cache),
        "EnginePool": render_engine(owner("EnginePool", "p"), pool, Refs(kv_cache=("c", cache))),
        "KVGateway": render_gateway(owner("KVGateway", "g"), gateway, Refs(engine_pool=("p", pool))),
    }


def test_every_child_carries_the_owner_reference_and_recommended_labels():
    for kind, children in fleet().items():
        for child in children:
            meta = child["metadata"]
            (ref,) = meta["ownerReferences"]
            assert ref["kind"] == kind and ref["uid"].startswith("uid-") and ref["controller"] is True
            assert ref["apiVersion"] == "kvgate.io/v1alpha1"
            assert meta["namespace"] == "ns"
            labels = meta["labels"]
            assert labels["app.kubernetes.io/managed-by"] == "kvgate-operator"
            assert labels["app.kubernetes.io/part-of"] == "kvgate"
            assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"} <= set(labels)


@pytest.mark.parametrize(
    ("mode", "key"),
    [
        pytest.param("required", "requiredDuringSchedulingIgnoredDuringExecution", id="required"),
        pytest.param("preferred", "preferredDuringSchedulingIgnoredDuringExecution", id="preferred"),
        pytest.param("none", None, id="none"),
    ],
)
@pytest.mark.parametrize("kind", ["KVCache", "EnginePool", "KVGateway"])
def test_hostname_anti_affinity_follows_the_placement_mode(kind, mode, key):
    specs = {"KVCache": "cache_spec", "EnginePool": "pool_spec", "KVGateway": "gateway_spec"}
    children = fleet(**{specs[kind]: {"placement": {"antiAffinity": mode}}})[kind]
    workload = next(c for c in children if c["kind"] in {"StatefulSet", "Deployment"})
    pod = workload["spec"]["template"]["spec"]
    if key is None:
        assert "affinity" not in pod
        return
    terms = pod["affinity"]["podAntiAffinity"][key]
    term = terms[0] if mode == "required" else terms[0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    # The term selects exactly this workload's pods.
    assert term["labelSelector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize(
    ("spread", "expected"),
    [
        pytest.param({}, [("topology.kubernetes.io/zone", 1, "ScheduleAnyway")], id="default-zones"),
        pytest.param({"enabled": False}, [], id="off"),
        pytest.param({"maxSkew": 2, "whenUnsatisfiable": "DoNotSchedule", "topologyKey": "rack"},
                     [("rack", 2, "DoNotSchedule")], id="custom"),
    ],
)
def test_topology_spread(spread, expected):
    children = fleet(cache_spec={"placement": {"topologySpread": spread}})["KVCache"]
    pod = by_kind(children, "StatefulSet")["spec"]["template"]["spec"]
    got = [(c["topologyKey"], c["maxSkew"], c["whenUnsatisfiable"]) for c in pod.get("topologySpreadConstraints", [])]
    assert got == expected


def test_cache_nodes_have_stable_identities_and_kubernetes_membership():
    children = fleet(cache_spec={"replicas": 4, "capacityPerNode": "2Gi", "replicationFactor": 3})["KVCache"]
    sts = by_kind(children, "StatefulSet")
    service = by_kind(children, "Service")
    assert sts["spec"]["serviceName"] == service["metadata"]["name"] == "c-nodes"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    args = container(children, "StatefulSet")["args"]
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert args[0] == "cache-node"
    assert flag("--node-id") == "$(POD_NAME)"
    assert flag("--advertise-host") == "$(POD_IP)"
    assert flag("--capacity-bytes") == str(2 << 30)
    assert flag("--replicas") == "3"
    assert flag("--membership") == "kubernetes"
    assert flag("--namespace") == "ns"
    assert "--labels" not in args  # host and zone come from the Kubernetes membership
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container(children, "StatefulSet")["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_IP"] == "status.podIP"
    assert sts["spec"]["template"]["metadata"]["annotations"] == {"kvgate.io/port": "50051"}
    assert "--allow-unauthenticated" in args and "--token-file" not in args
    selector = dict(item.split("=") for item in flag("--selector").split(","))
    assert selector.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # Memory request covers the block budget plus the process.
    assert container(children, "StatefulSet")["resources"]["requests"]["memory"] == "2304Mi"
    # The hand-off fits in the grace period.
    assert int(flag("--handoff-timeout-s")) < sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    rules = by_kind(children, "Role")["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def _connector(children):
    args = container(children, "Deployment")["args"]
    return json.loads(args[args.index("--kv-transfer-config") + 1])


@pytest.mark.parametrize(
    ("l3", "env", "volume", "expected"),
    [
        pytest.param(None, None, None, None, id="no-l3"),
        pytest.param({"redis": {"secretName": "r"}}, {"name": "r", "key": "url"}, None,
                     {"kind": "redis", "url": "$(KVGATE_L3_REDIS_URL)", "prefix": "kvgate:kv:"}, id="redis-secret"),
        pytest.param({"pvc": {"claimName": "kv"}}, None, "kv", {"kind": "disk", "path": "/var/lib/kvgate/l3"},
                     id="pvc"),
    ],
)
def test_engines_get_the_connector_wired_to_the_cache(l3, env, volume, expected):
    children = fleet(cache_spec={"replicas": 3, "l3": l3} if l3 else {"replicas": 3})["EnginePool"]
    config = _connector(children)
    assert config["kv_connector"] == "TieredKVConnector"
    assert config["kv_connector_module_path"] == "kvcache.vllm_connector"
    extra = config["kv_connector_extra_config"]
    assert extra["l2"] == {"kubernetes_selector": "app.kubernetes.io/name=kvgate,app.kubernetes.io/instance=c,"
                                                  "app.kubernetes.io/component=cache",
                           "kubernetes_namespace": "ns", "kubernetes_port": 50051, "replicas": 2, "vnodes": 160}
    assert extra.get("l3") == expected
    cont = container(children, "Deployment")
    secret_env = [e["valueFrom"]["secretKeyRef"] for e in cont["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert secret_env == ([env] if env else [])
    pvcs = [v["persistentVolumeClaim"]["claimName"] for v in by_kind(children, "Deployment")["spec"]["template"]
            ["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert pvcs == ([volume] if volume else [])


def test_connector_config_is_what_the_kvcache_settings_accept():
    from kvcache.launch import CONNECTOR_CLASS, CONNECTOR_MODULE
    from kvcache.settings import CacheSettings

    config = _connector(fleet(cache_spec={"l3": {"pvc": {"claimName": "kv"}}})["EnginePool"])
    assert (config["kv_connector"], config["kv_connector_module_path"]) == (CONNECTOR_CLASS, CONNECTOR_MODULE)
    settings = CacheSettings.from_mapping(config["kv_connector_extra_config"])
    assert settings.l2.replicas == 2 and settings.l2.kubernetes_port == 50051
    assert settings.l2.token_file == "" and settings.l2.enabled


def test_cache_token_reaches_nodes_and_engines():
    children = fleet(cache_spec={"auth": {"secretName": "tok"}})
    node = container(children["KVCache"], "StatefulSet")
    assert node["args"][node["args"].index("--token-file") + 1] == "/etc/kvgate/cache-token/token"
    assert "--allow-unauthenticated" not in node["args"]
    for kind, workload in (("KVCache", "StatefulSet"), ("EnginePool", "Deployment")):
        pod = pod_of(children[kind], workload)
        (volume,) = [v for v in pod["volumes"] if v["name"] == "cache-token"]
        assert volume["secret"] == {"secretName": "tok", "items": [{"key": "token", "path": "token"}]}
        assert {"name": "cache-token", "mountPath": "/etc/kvgate/cache-token", "readOnly": True} in \
            pod["containers"][0]["volumeMounts"]
    assert _connector(children["EnginePool"])["kv_connector_extra_config"]["l2"]["token_file"] == \
        "/etc/kvgate/cache-token/token"
    # The connector watches cache-node pods: the engines get their own pod reader.
    engine_pod = pod_of(children["EnginePool"], "Deployment")
    assert engine_pod["serviceAccountName"] == "p-engine"
    assert by_kind(children["EnginePool"], "Role")["rules"][0]["resources"] == ["pods"]


def test_engine_pods_announce_ports_bind_events_and_drain_before_sigterm():
    children = fleet(pool_spec={"port": 8100, "kvEvents": {"port": 6000},
                                "lifecycle": {"terminationGracePeriodSeconds": 90, "preStopDelaySeconds": 15}})
    deployment = by_kind(children["EnginePool"], "Deployment")
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"] == {"kvgate.io/port": "8100", "kvgate.io/kv-events-port": "6000"}
    cont = template["spec"]["containers"][0]
    args = cont["args"]
    events = json.loads(args[args.index("--kv-events-config") + 1])
    assert events["endpoint"] == "tcp://*:6000" and events["publisher"] == "zmq"
    assert cont["lifecycle"] == {"preStop": {"sleep": {"seconds": 15}}}
    assert template["spec"]["terminationGracePeriodSeconds"] == 90
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # The gateway watches exactly these pods, on this port.
    gw_args = container(children["KVGateway"], "Deployment")["args"]
    selector = dict(item.split("=") for item in gw_args[gw_args.index("--selector") + 1].split(","))
    assert selector.items() <= template["metadata"]["labels"].items()
    assert selector.items() <= deployment["spec"]["selector"]["matchLabels"].items()
    assert gw_args[gw_args.index("--service-discovery-port") + 1] == "8100"
    assert gw_args[gw_args.index("--service-discovery-namespace") + 1] == "ns"
    assert "--service-discovery" in gw_args


def test_engine_without_events_or_cache():
    pool = load_spec("EnginePool", {"model": "m", "kvEvents": {"enabled": False}, "gpus": 2,
                                    "lifecycle": {"preStopDelaySeconds": 0}})
    children = render_engine(owner("EnginePool", "p"), pool, Refs())
    cont = container(children, "Deployment")
    assert "--kv-events-config" not in cont["args"] and "--kv-transfer-config" not in cont["args"]
    assert "lifecycle" not in cont
    assert cont["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert by_kind(children, "Deployment")["spec"]["template"]["metadata"]["annotations"] == {"kvgate.io/port": "8000"}


def test_gateway_api_keys_state_and_config():
    children = fleet(gateway_spec={"apiKeys": {"secretName": "keys", "keys": ["a", "b"]},
                                   "routing": {"policy": "prefix-cache:2,least-request:1", "stateSecretName": "st"},
                                   "service": {"type": "LoadBalancer", "annotations": {"x": "y"}}})["KVGateway"]
    cont = container(children, "Deployment")
    assert [cont["args"][i + 1] for i, a in enumerate(cont["args"]) if a == "--api-key"] == [
        "$(KVGATE_API_KEY_0)", "$(KVGATE_API_KEY_1)"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in cont["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"KVGATE_API_KEY_0": {"name": "keys", "key": "a"}, "KVGATE_API_KEY_1": {"name": "keys", "key": "b"},
                    "KVGATE_STATE_URL": {"name": "st", "key": "url"}}
    assert cont["args"][cont["args"].index("--state-url") + 1] == "$(KVGATE_STATE_URL)"
    config = by_kind(children, "ConfigMap")["data"]["gateway.yaml"]
    assert "prefix-cache:2,least-request:1" in config
    service = by_kind(children, "Service")
    assert service["spec"]["type"] == "LoadBalancer" and service["metadata"]["annotations"] == {"x": "y"}
    binding = by_kind(children, "RoleBinding")
    pod = by_kind(children, "Deployment")["spec"]["template"]["spec"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"] == by_kind(children, "ServiceAccount")["metadata"]["name"]


def test_gateway_config_change_rolls_the_pods():
    a = by_kind(fleet(gateway_spec={"admission": {"maxQueue": 10}})["KVGateway"], "Deployment")
    b = by_kind(fleet(gateway_spec={"admission": {"maxQueue": 20}})["KVGateway"], "Deployment")
    key = "kvgate.io/config-hash"
    assert a["spec"]["template"]["metadata"]["annotations"][key] != b["spec"]["template"]["metadata"]["annotations"][key]


@pytest.mark.parametrize("kind", ["KVCache", "EnginePool", "KVGateway"])
def test_disruption_budget_can_be_turned_off(kind):
    specs = {"KVCache": {}, "EnginePool": {"model": "m"}, "KVGateway": {"enginePoolRef": {"name": "p"}}}
    refs = Refs(engine_pool=("p", load_spec("EnginePool", {"model": "m"})))
    on = RENDERERS[kind](owner(kind, "x"), load_spec(kind, specs[kind]), refs)
    off = RENDERERS[kind](owner(kind, "x"), load_spec(kind, {**specs[kind], "podDisruptionBudget": {"enabled": False}}),
                          refs)
    pdb = by_kind(on, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    workload = next(c for c in on if c["kind"] in {"StatefulSet", "Deployment"})
    assert pdb["spec"]["selector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]
    assert "PodDisruptionBudget" not in {c["kind"] for c in off}


@pytest.mark.parametrize(
    ("kind", "spec", "refs"),
    [
        pytest.param("EnginePool", {"model": "m", "kvCacheRef": {"name": "gone"}}, Refs(), id="missing-kvcache"),
        pytest.param("KVGateway", {"enginePoolRef": {"name": "gone"}}, Refs(), id="missing-pool"),
    ],
)
def test_missing_reference_is_a_dependency_error(kind, spec, refs):
    with pytest.raises(DependencyError):
        RENDERERS[kind](owner(kind, "x"), load_spec(kind, spec), refs)


@pytest.mark.parametrize(
    ("kind", "spec", "needle"),
    [
        pytest.param("KVCache", {"replicas": 1, "replicationFactor": 2}, "replicationFactor", id="rf-over-replicas"),
        pytest.param("KVCache", {"l3": {"redis": {"secretName": "a"}, "pvc": {"claimName": "b"}}}, "not both",
                     id="two-l3"),
        pytest.param("KVCache", {"capacityPerNode": "lots"}, "capacityPerNode", id="bad-quantity"),
        pytest.param("KVCache", {"replicas": 0}, "spec.replicas", id="schema-minimum"),
        pytest.param("KVCache", {"evictionPolicy": "fifo"}, "evictionPolicy", id="schema-enum"),
        pytest.param("EnginePool", {}, "model", id="missing-model"),
        pytest.param("EnginePool", {"model": "m", "engineArgs": ["--port=9"]}, "--port", id="reserved-arg"),
        pytest.param("EnginePool", {"model": "m", "kvEvents": {"port": 8000}}, "kvEvents.port", id="port-clash"),
        pytest.param("EnginePool", {"model": "m", "lifecycle": {"terminationGracePeriodSeconds": 5}},
                     "preStopDelaySeconds", id="prestop-over-grace"),
        pytest.param("KVGateway", {}, "enginePoolRef", id="missing-pool-ref"),
        pytest.param("KVGateway", {"enginePoolRef": {"name": "p"}, "lifecycle": {"terminationGracePeriodSeconds": 10}},
                     "exceed", id="grace-too-short"),
    ],
)
def test_invalid_specs_are_spec_errors_naming_the_field(kind, spec, needle):
    with pytest.raises(SpecError, match=needle.replace("[", r"\[")):
        load_spec(kind, spec)


def test_defaults_fill_nested_objects():
    spec = load_spec("KVGateway", {"enginePoolRef": {"name": "p"}, "placement": {"topologySpread": {"maxSkew": 3}}})
    assert spec["replicas"] == 2 and spec["service"] == {"type": "ClusterIP", "port": 80}
    assert spec["placement"]["topologySpread"] == {"enabled": True, "topologyKey": "topology.kubernetes.io/zone",
                                                   "maxSkew": 3, "whenUnsatisfiable": "ScheduleAnyway"}
    assert "apiKeys" not in spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1Gi", 1 << 30), ("512Mi", 512 << 20), ("2G", 2 * 10**9), ("1.5Ki", 1536), ("4096", 4096)],
)
def test_quantities(text, expected):
    assert quantity_bytes(text, "f") == expected


def test_condition_keeps_its_transition_time_while_unchanged():
    first = condition("Ready", False, "ReplicasNotReady", "0/3", generation=1)
    same = condition("Ready", False, "ReplicasNotReady", "1/3", generation=1, previous=[
        {**first, "lastTransitionTime": "2020-01-01T00:00:00Z"}])
    flipped = condition("Ready", True, "AllReplicasReady", "3/3", generation=1, previous=[
        {**first, "lastTransitionTime": "2020-01-01T00:00:00Z"}])
    assert same["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    assert flipped["lastTransitionTime"] != "2020-01-01T00:00:00Z"
    assert set(first) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}


def _pod(ready=True, deleting=False):
    meta = {"name": "p", "deletionTimestamp": "2020-01-01T00:00:00Z"} if deleting else {"name": "p"}
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_pod_readiness_and_gateway_status():
    assert pod_ready(_pod()) and not pod_ready(_pod(ready=False)) and not pod_ready(_pod(deleting=True))
    spec = load_spec("KVGateway", {"enginePoolRef": {"name": "p"}, "replicas": 1})
    deployment = {"status": {"replicas": 1, "readyReplicas": 1}}
    fields, (ok, reason, _) = gateway_status(spec, deployment, [_pod(), _pod(deleting=True), _pod(ready=False)])
    assert fields == {"replicas": 1, "readyReplicas": 1, "enginePods": 1} and ok
    _, (ok, reason, _) = gateway_status(spec, deployment, [])
    assert not ok and reason == "NoEnginePods"


def test_ring_version_changes_exactly_with_the_layout():
    assert ring_version(["a", "b"], 160) == ring_version(["b", "a"], 160)
    assert ring_version(["a", "b"], 160) != ring_version(["a"], 160)
    assert ring_version(["a", "b"], 160) != ring_version(["a", "b"], 80)


def test_block_size_from_vllm_metrics():
    text = ('# HELP vllm:cache_config_info info\nvllm:cache_config_info{block_size="16",engine="0",'
            'num_gpu_blocks="4096"} 1.0\n')
    assert parse_cache_config(text) == {"block_size": 16, "num_gpu_blocks": 4096}
    assert parse_cache_config("vllm:num_requests_running 0\n") == {}


def test_operator_command_without_cluster_credentials_exits_1(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(tmp_path / "absent"), HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "kvgate", "operator", "--namespace", "ns"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "kubeconfig" in result.stderr
