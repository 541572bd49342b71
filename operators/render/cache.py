"""Render a KVCache: a StatefulSet of `kvgate cache-node` pods and what they need.

Children: the headless Service `<name>-nodes` (stable DNS names
`<name>-<i>.<name>-nodes.<ns>.svc`), the StatefulSet `<name>` (stable pod
names are the ring's node IDs, so a rolling update moves only the restarted
node's share), the ServiceAccount/Role/RoleBinding `<name>-cache` that lets
nodes find each other by label (`--membership kubernetes`), and the
PodDisruptionBudget `<name>`.
"""

from __future__ import annotations

from typing import Any

from operators.meta import PORT_ANNOTATION, Owner, child_metadata, format_mib, quantity_bytes, selector_labels
from operators.placement import disruption_budget, place, pod_downward_env, resources
from operators.render.base import Refs, pod_reader

COMPONENT = "cache"

#: Memory a cache node needs besides its block budget (bytes): Python, gRPC buffers.
NODE_OVERHEAD_BYTES = 256 << 20

#: Seconds of the grace period kept back from the hand-off for the process to exit.
EXIT_MARGIN_S = 15


#: Where cache nodes and engines mount the cluster token of a KVCache with `auth`.
TOKEN_DIR = "/etc/kvgate/cache-token"
TOKEN_FILE = f"{TOKEN_DIR}/token"


def token_volume(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The (volume, mount) of the KVCache's token Secret, or None without `auth`."""
    auth = spec.get("auth")
    if not auth:
        return None
    volume = {"name": "cache-token",
              "secret": {"secretName": auth["secretName"], "items": [{"key": auth["key"], "path": "token"}]}}
    return volume, {"name": "cache-token", "mountPath": TOKEN_DIR, "readOnly": True}


def member_selector(name: str) -> str:
    """The label selector (`K=V,...`) of the cache-node pods of KVCache `name`."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(Owner("KVCache", name, "", ""), COMPONENT).items())


def headless_service_name(name: str) -> str:
    """The headless Service that gives the nodes of KVCache `name` their DNS names."""
    return f"{name}-nodes"


def cache_node_args(owner: Owner, spec: dict[str, Any]) -> list[str]:
    """The `kvgate cache-node` command line of every node (after the image's `kvgate`)."""
    args = [
        "cache-node",
        "--host", "0.0.0.0",
        "--port", str(spec["port"]),
        "--node-id", "$(POD_NAME)",
        "--advertise-host", "$(POD_IP)",
        "--capacity-bytes", str(quantity_bytes(spec["capacityPerNode"], "spec.capacityPerNode")),
        "--policy", spec["evictionPolicy"],
        "--replicas", str(spec["replicationFactor"]),
        "--vnodes", str(spec["vnodes"]),
        "--membership", "kubernetes",
        "--selector", member_selector(owner.name),
        "--namespace", owner.namespace,
        "--handoff-timeout-s", str(max(5, spec["terminationGracePeriodSeconds"] - EXIT_MARGIN_S)),
    ]
    args += ["--token-file", TOKEN_FILE] if spec.get("auth") else ["--allow-unauthenticated"]
    if spec["metricsPort"]:
        args += ["--metrics-port", str(spec["metricsPort"])]
    return args


def render_cache(owner: Owner, spec: dict[str, Any], refs: Refs = Refs()) -> list[dict[str, Any]]:
    """The children of a KVCache.

    Args:
        owner: the KVCache.
        spec: its defaulted spec (`operators.specs.load_spec`).
        refs: unused (a KVCache refers to nothing).

    Returns:
        Manifests: Service, ServiceAccount, Role, RoleBinding, StatefulSet,
        and the PodDisruptionBudget when enabled.
    """
    match = selector_labels(owner, COMPONENT)
    rbac_name = f"{owner.name}-cache"
    ports = [{"name": "grpc", "containerPort": spec["port"], "protocol": "TCP"}]
    if spec["metricsPort"]:
        ports.append({"name": "metrics", "containerPort": spec["metricsPort"], "protocol": "TCP"})
    memory = format_mib(quantity_bytes(spec["capacityPerNode"], "spec.capacityPerNode") + NODE_OVERHEAD_BYTES)
    container = {
        "name": "cache-node",
        "image": spec["image"],
        "args": cache_node_args(owner, spec),
        "env": pod_downward_env(),
        "ports": ports,
        "readinessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 10, "failureThreshold": 6},
        "resources": resources(spec["resources"], requests={"cpu": "500m", "memory": memory}),
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }
    pod: dict[str, Any] = {
        "serviceAccountName": rbac_name,
        "terminationGracePeriodSeconds": spec["terminationGracePeriodSeconds"],
        "containers": [container],
    }
    token = token_volume(spec)
    if token:
        pod["volumes"] = [token[0]]
        container["volumeMounts"] = [token[1]]
    pod_spec = place(pod, spec["placement"], match)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, headless_service_name(owner.name), COMPONENT),
        "spec": {
            "clusterIP": "None",
            # Nodes must resolve each other while they start, before they are Ready.
            "publishNotReadyAddresses": True,
            "selector": match,
            "ports": [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]} for p in ports],
        },
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": child_metadata(owner, owner.name, COMPONENT),
        "spec": {
            "replicas": spec["replicas"],
            "serviceName": headless_service_name(owner.name),
            # Nodes join the ring independently; ordered start-up would only slow it.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": match},
            "template": {
                "metadata": {
                    "labels": child_metadata(owner, "", COMPONENT)["labels"],
                    # Kubernetes membership reads a member's port here.
                    "annotations": {PORT_ANNOTATION: str(spec["port"])},
                },
                "spec": pod_spec,
            },
        },
    }
    children = [service, *pod_reader(owner, rbac_name, COMPONENT), statefulset]
    budget = disruption_budget(owner, COMPONENT, spec["podDisruptionBudget"])
    return children + ([budget] if budget else [])
