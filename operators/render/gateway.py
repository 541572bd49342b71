"""Render a KVGateway: the gateway Deployment, its Service, config and RBAC.

The gateway finds the EnginePool's pods itself (`kvgate serve
--service-discovery`), watching pods by the pool's selector labels in its own
namespace; the ServiceAccount/Role/RoleBinding `<name>-gateway` allow exactly
that. Settings that have no flag travel in the ConfigMap `<name>-config`
(the `--config` file); a change of it rolls the pods (a hash annotation).
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from operators.errors import DependencyError
from operators.meta import Owner, child_metadata, selector_labels
from operators.placement import disruption_budget, place, pod_downward_env, resources
from operators.render.base import Refs, pod_reader, prestop_sleep
from operators.render.engine import COMPONENT as ENGINE_COMPONENT

COMPONENT = "gateway"
CONFIG_DIR = "/etc/kvgate"
CONFIG_HASH_ANNOTATION = "kvgate.io/config-hash"
STATE_URL_ENV = "KVGATE_STATE_URL"


def gateway_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The `--config` file of the gateway (router settings YAML shape)."""
    routing: dict[str, Any] = {"policy": spec["routing"]["policy"]}
    if spec["routing"].get("tokenizer"):
        routing["tokenizer"] = spec["routing"]["tokenizer"]
    return {
        "server": {"host": "0.0.0.0", "port": spec["port"], "drain_grace_s": spec["lifecycle"]["drainGraceSeconds"]},
        "routing": routing,
        "admission": {
            "max_inflight_per_pod": spec["admission"]["maxInflightPerPod"],
            "adaptive": spec["admission"]["adaptive"],
            "max_queue": spec["admission"]["maxQueue"],
        },
    }


def gateway_args(owner: Owner, spec: dict[str, Any], pool: tuple[str, dict[str, Any]]) -> list[str]:
    """The `kvgate serve` command line (after the image's `kvgate`)."""
    pool_name, pool_spec = pool
    pool_owner = Owner("EnginePool", pool_name, owner.namespace, "")
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(pool_owner, ENGINE_COMPONENT).items())
    args = [
        "serve",
        "--config", f"{CONFIG_DIR}/gateway.yaml",
        "--host", "0.0.0.0",
        "--port", str(spec["port"]),
        "--service-discovery",
        "--selector", selector,
        "--service-discovery-namespace", owner.namespace,
        "--service-discovery-port", str(pool_spec["port"]),
        # A pod of its own shares no cores with the engines, and runs without CAP_SYS_NICE.
        "--cpu-priority", "normal",
    ]
    for i, _ in enumerate((spec.get("apiKeys") or {}).get("keys", ())):
        args += ["--api-key", f"$(KVGATE_API_KEY_{i})"]
    if spec["routing"].get("stateSecretName"):
        args += ["--state-url", f"$({STATE_URL_ENV})"]
    return args


def render_gateway(owner: Owner, spec: dict[str, Any], refs: Refs = Refs()) -> list[dict[str, Any]]:
    """The children of a KVGateway.

    Args:
        owner: the KVGateway.
        spec: its defaulted spec.
        refs: `engine_pool`, the EnginePool of `spec.enginePoolRef`.

    Returns:
        Manifests: ConfigMap, ServiceAccount, Role, RoleBinding, Deployment,
        Service and the PodDisruptionBudget when enabled.

    Raises:
        DependencyError: the EnginePool is not in `refs`.
    """
    if refs.engine_pool is None:
        raise DependencyError(f"EnginePool {spec['enginePoolRef']['name']!r} not found")
    match = selector_labels(owner, COMPONENT)
    rbac_name = f"{owner.name}-gateway"
    config_text = yaml.safe_dump(gateway_config(spec), sort_keys=True)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(owner, f"{owner.name}-config", COMPONENT),
        "data": {"gateway.yaml": config_text},
    }
    env = pod_downward_env()
    for i, key in enumerate((spec.get("apiKeys") or {}).get("keys", ())):
        ref = {"name": spec["apiKeys"]["secretName"], "key": key}
        env.append({"name": f"KVGATE_API_KEY_{i}", "valueFrom": {"secretKeyRef": ref}})
    if spec["routing"].get("stateSecretName"):
        ref = {"name": spec["routing"]["stateSecretName"], "key": "url"}
        env.append({"name": STATE_URL_ENV, "valueFrom": {"secretKeyRef": ref}})
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": config_map["metadata"]["name"]}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    if spec["routing"].get("tokenizerVolumeClaim"):
        claim = {"claimName": spec["routing"]["tokenizerVolumeClaim"], "readOnly": True}
        volumes.append({"name": "models", "persistentVolumeClaim": claim})
        mounts.append({"name": "models", "mountPath": "/models", "readOnly": True})
    lifecycle = spec["lifecycle"]
    container = {
        "name": "gateway",
        "image": spec["image"],
        "args": gateway_args(owner, spec, refs.engine_pool),
        "env": env,
        "ports": [{"name": "http", "containerPort": spec["port"], "protocol": "TCP"}],
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": resources(spec["resources"], requests={"cpu": "500m", "memory": "512Mi"}),
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
        "lifecycle": prestop_sleep(lifecycle["preStopDelaySeconds"]),
    }
    if not container["lifecycle"]:
        del container["lifecycle"]
    pod_spec = place(
        {"serviceAccountName": rbac_name, "terminationGracePeriodSeconds": lifecycle["terminationGracePeriodSeconds"],
         "containers": [container], "volumes": volumes},
        spec["placement"],
        match,
    )
    digest = hashlib.sha256(config_text.encode()).hexdigest()[:16]
    template_meta = {"labels": child_metadata(owner, "", COMPONENT)["labels"],
                     "annotations": {CONFIG_HASH_ANNOTATION: digest}}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(owner, owner.name, COMPONENT),
        "spec": {
            "replicas": spec["replicas"],
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "selector": {"matchLabels": match},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }
    service_meta = child_metadata(owner, owner.name, COMPONENT)
    if spec["service"].get("annotations"):
        service_meta["annotations"] = dict(spec["service"]["annotations"])
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": service_meta,
        "spec": {
            "type": spec["service"]["type"],
            "selector": match,
            "ports": [{"name": "http", "port": spec["service"]["port"], "targetPort": "http", "protocol": "TCP"}],
        },
    }
    children = [config_map, *pod_reader(owner, rbac_name, COMPONENT), deployment, service]
    budget = disruption_budget(owner, COMPONENT, spec["podDisruptionBudget"])
    return children + ([budget] if budget else [])
