"""Render a KVCache: a StatefulSet of `kvgate cache-node` pods and what they need.

Children: the headless Service `<name>-nodes` (stable DNS names
`<name>-<i>.<name>-nodes.<ns>.svc`), the StatefulSet `<name>` (stable pod
names are the ring's node IDs, so a rolling update moves only the restarted
node's share), the ServiceAccount/Role/RoleBinding `<name>-cache` that lets
nodes find each other by label, and the PodDisruptionBudget `<name>`.
"""

from __future__ import annotations

from typing import Any

from operators.meta import Owner, child_metadata, format_mib, quantity_bytes, selector_labels
from operators.placement import disruption_budget, place, pod_downward_env, resources
from operators.render.base import Refs, pod_reader

COMPONENT = "cache"

#: Memory a cache node needs besides its block budget (bytes): Python, gRPC buffers.
NODE_OVERHEAD_BYTES = 256 << 20

#: Seconds of the grace period kept back from the hand-off for the process to exit.
EXIT_MARGIN_S = 15


#: The node's zone, for placing a block's replicas in different zones. Kubernetes (1.33+, the
#: PodTopologyLabels admission) copies the node's zone label onto the pod; elsewhere it is empty.
ZONE_ENV = {"name": "NODE_ZONE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['topology.kubernetes.io/zone']"}}}


def headless_service_name(name: str) -> str:
    """The headless Service that gives the nodes of KVCache `name` their DNS names."""
    return f"{name}-nodes"


def node_addresses(name: str, namespace: str, spec: dict[str, Any]) -> list[str]:
    """The ring members as static peer specs (`ID=HOST:PORT`), from the stable pod names.

    Args:
        name: the KVCache.
        namespace: its namespace.
        spec: its defaulted spec.
    """
    service = headless_service_name(name)
    return [f"{name}-{i}={name}-{i}.{service}.{namespace}.svc:{spec['port']}" for i in range(spec["replicas"])]


def cache_node_args(owner: Owner, spec: dict[str, Any]) -> list[str]:
    """The `kvgate cache-node` command line of every node (after the image's `kvgate`)."""
    args = [
        "cache-node",
        "--host", "0.0.0.0",
        "--port", str(spec["port"]),
        "--node-id", "$(POD_NAME)",
        "--advertise-host", f"$(POD_NAME).{headless_service_name(owner.name)}.{owner.namespace}.svc",
        "--labels", "host=$(NODE_NAME),zone=$(NODE_ZONE)",
        "--capacity-bytes", str(quantity_bytes(spec["capacityPerNode"], "spec.capacityPerNode")),
        "--policy", spec["evictionPolicy"],
        "--replicas", str(spec["replicationFactor"]),
        "--vnodes", str(spec["vnodes"]),
        "--membership", "kubernetes",
        "--selector", ",".join(f"{k}={v}" for k, v in selector_labels(owner, COMPONENT).items()),
        "--namespace", owner.namespace,
        "--handoff-timeout-s", str(max(5, spec["terminationGracePeriodSeconds"] - EXIT_MARGIN_S)),
    ]
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
        "env": pod_downward_env() + [ZONE_ENV],
        "ports": ports,
        "readinessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 10, "failureThreshold": 6},
        "resources": resources(spec["resources"], requests={"cpu": "500m", "memory": memory}),
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }
    pod_spec = place(
        {
            "serviceAccountName": rbac_name,
            "terminationGracePeriodSeconds": spec["terminationGracePeriodSeconds"],
            "containers": [container],
        },
        spec["placement"],
        match,
    )
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
            "template": {"metadata": {"labels": child_metadata(owner, "", COMPONENT)["labels"]}, "spec": pod_spec},
        },
    }
    children = [service, *pod_reader(owner, rbac_name, COMPONENT), statefulset]
    budget = disruption_budget(owner, COMPONENT, spec["podDisruptionBudget"])
    return children + ([budget] if budget else [])
