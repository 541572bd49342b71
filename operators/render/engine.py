"""Render an EnginePool: a Deployment of vLLM engines, their Service and PDB.

With a `kvCacheRef`, every engine loads the kvgate tiered connector
(`--kv-transfer-config`) pointed at the KVCache's nodes (L2, found by their
pod labels like the nodes find each other) and its L3; with
`kvEvents.enabled`, every engine binds a ZMQ publisher of its KV cache events
on its own port, which the pod announces in the annotation
`kvgate.io/kv-events-port` next to `kvgate.io/port`, so every gateway replica
can subscribe to every engine.
"""

from __future__ import annotations

import json
from typing import Any

from operators.errors import DependencyError
from operators.meta import (
    KV_EVENTS_PORT_ANNOTATION,
    PORT_ANNOTATION,
    Owner,
    child_metadata,
    quantity_bytes,
    selector_labels,
)
from operators.placement import disruption_budget, place, pod_downward_env, resources
from operators.render.base import Refs, pod_reader, prestop_sleep
from operators.render.cache import TOKEN_FILE, member_selector, token_volume

COMPONENT = "engine"

#: The kvgate vLLM connector (kvcache.vllm_connector.TieredKVConnector), named, not imported.
CONNECTOR_CLASS = "TieredKVConnector"
CONNECTOR_MODULE = "kvcache.vllm_connector"

L3_REDIS_ENV = "KVGATE_L3_REDIS_URL"


def served_name(spec: dict[str, Any]) -> str:
    """The model name clients send (`servedModelName`, else `model`)."""
    return spec.get("servedModelName") or spec["model"]


def connector_config(spec: dict[str, Any], cache: tuple[str, dict[str, Any]], namespace: str) -> dict[str, Any]:
    """The `--kv-transfer-config` value for engines sharing the KVCache `cache`.

    Args:
        spec: the EnginePool's defaulted spec (with a `kvCacheRef`).
        cache: (name, defaulted spec) of the KVCache.
        namespace: where both live.
    """
    cache_name, cache_spec = cache
    extra: dict[str, Any] = {
        "l1": {"capacity_bytes": quantity_bytes(spec["kvCacheRef"]["l1Capacity"], "spec.kvCacheRef.l1Capacity")},
        # The same Kubernetes membership the cache nodes use, so engines and nodes build one ring.
        "l2": {
            "kubernetes_selector": member_selector(cache_name),
            "kubernetes_namespace": namespace,
            "kubernetes_port": cache_spec["port"],
            "replicas": cache_spec["replicationFactor"],
            "vnodes": cache_spec["vnodes"],
        },
        "connector": {"model": served_name(spec)},
    }
    if cache_spec.get("auth"):
        extra["l2"]["token_file"] = TOKEN_FILE
    l3 = cache_spec.get("l3") or {}
    if l3.get("redis"):
        extra["l3"] = {"kind": "redis", "url": f"$({L3_REDIS_ENV})", "prefix": l3["redis"]["prefix"]}
    elif l3.get("pvc"):
        extra["l3"] = {"kind": "disk", "path": l3["pvc"]["mountPath"]}
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def kv_events_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The `--kv-events-config` value: a ZMQ publisher bound on the pod's events port."""
    events = spec["kvEvents"]
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events['port']}",
            "topic": events["topic"]}


def engine_args(spec: dict[str, Any], refs: Refs, namespace: str) -> list[str]:
    """The `vllm serve` arguments of every engine."""
    args = [spec["model"], "--host", "0.0.0.0", "--port", str(spec["port"])]
    if spec.get("servedModelName"):
        args += ["--served-model-name", spec["servedModelName"]]
    if spec.get("kvCacheRef"):
        if refs.kv_cache is None:
            raise DependencyError(f"KVCache {spec['kvCacheRef']['name']!r} not found")
        args += ["--kv-transfer-config", json.dumps(connector_config(spec, refs.kv_cache, namespace))]
    if spec["kvEvents"]["enabled"]:
        args += ["--kv-events-config", json.dumps(kv_events_config(spec))]
    return args + list(spec["engineArgs"])


def render_engine(owner: Owner, spec: dict[str, Any], refs: Refs = Refs()) -> list[dict[str, Any]]:
    """The children of an EnginePool.

    Args:
        owner: the EnginePool.
        spec: its defaulted spec.
        refs: `kv_cache` when the spec has a `kvCacheRef`.

    Returns:
        Manifests: with a `kvCacheRef` a ServiceAccount/Role/RoleBinding
        `<name>-engine` (the connector watches cache-node pods); Deployment,
        Service and the PodDisruptionBudget when enabled.

    Raises:
        DependencyError: the referenced KVCache is not in `refs`.
    """
    match = selector_labels(owner, COMPONENT)
    annotations = {PORT_ANNOTATION: str(spec["port"])}
    ports = [{"name": "http", "containerPort": spec["port"], "protocol": "TCP"}]
    if spec["kvEvents"]["enabled"]:
        annotations[KV_EVENTS_PORT_ANNOTATION] = str(spec["kvEvents"]["port"])
        ports.append({"name": "kv-events", "containerPort": spec["kvEvents"]["port"], "protocol": "TCP"})
    env = pod_downward_env() + [dict(var) for var in spec.get("env") or []]
    volumes: list[dict[str, Any]] = [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec["shmSize"])}}]
    mounts: list[dict[str, Any]] = [{"name": "shm", "mountPath": "/dev/shm"}]
    if spec.get("modelVolumeClaim"):
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": spec["modelVolumeClaim"], "readOnly": True}})
        mounts.append({"name": "models", "mountPath": "/models", "readOnly": True})
    l3 = ((refs.kv_cache[1].get("l3") or {}) if refs.kv_cache and spec.get("kvCacheRef") else {})
    if l3.get("redis"):
        secret = {"name": l3["redis"]["secretName"], "key": l3["redis"]["key"]}
        env.append({"name": L3_REDIS_ENV, "valueFrom": {"secretKeyRef": secret}})
    elif l3.get("pvc"):
        volumes.append({"name": "l3", "persistentVolumeClaim": {"claimName": l3["pvc"]["claimName"]}})
        mounts.append({"name": "l3", "mountPath": l3["pvc"]["mountPath"]})
    token = token_volume(refs.kv_cache[1]) if refs.kv_cache and spec.get("kvCacheRef") else None
    if token:
        volumes.append(token[0])
        mounts.append(token[1])
    gpus = {"nvidia.com/gpu": str(spec["gpus"])} if spec["gpus"] else {}
    health = {"httpGet": {"path": "/health", "port": "http"}}
    lifecycle = spec["lifecycle"]
    container = {
        "name": "vllm",
        "image": spec["image"],
        "command": ["vllm", "serve"],
        "args": engine_args(spec, refs, owner.namespace),
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "resources": resources(spec["resources"], requests=gpus, limits=gpus),
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": max(1, spec["startupTimeoutSeconds"] // 10)},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 6},
        "lifecycle": prestop_sleep(lifecycle["preStopDelaySeconds"]),
    }
    if not container["lifecycle"]:
        del container["lifecycle"]
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": lifecycle["terminationGracePeriodSeconds"],
                           "containers": [container], "volumes": volumes}
    rbac: list[dict[str, Any]] = []
    if spec.get("kvCacheRef"):
        # The connector lists the cache-node pods (Kubernetes membership of the L2 ring).
        pod["serviceAccountName"] = f"{owner.name}-engine"
        rbac = pod_reader(owner, pod["serviceAccountName"], COMPONENT)
    pod_spec = place(pod, spec["placement"], match)
    template_meta = {"labels": child_metadata(owner, "", COMPONENT)["labels"], "annotations": annotations}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(owner, owner.name, COMPONENT),
        "spec": {
            "replicas": spec["replicas"],
            # A new engine must be Ready (model loaded) before an old one stops.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "selector": {"matchLabels": match},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, owner.name, COMPONENT),
        "spec": {"selector": match, "ports": [{"name": "http", "port": spec["port"], "targetPort": "http"}]},
    }
    budget = disruption_budget(owner, COMPONENT, spec["podDisruptionBudget"])
    return [*rbac, deployment, service] + ([budget] if budget else [])
