"""What renderers share: the `Refs` value and the pod-discovery RBAC trio."""

from __future__ import annotations

import dataclasses
from typing import Any

from operators.meta import Owner, child_metadata


@dataclasses.dataclass(frozen=True, slots=True)
class Refs:
    """The referenced custom resources a renderer needs, already defaulted.

    Attributes:
        engine_pool: (name, spec) of the EnginePool a KVGateway routes to.
        kv_cache: (name, spec) of the KVCache an EnginePool uses.
    """

    engine_pool: tuple[str, dict[str, Any]] | None = None
    kv_cache: tuple[str, dict[str, Any]] | None = None


def pod_reader(owner: Owner, name: str, component: str) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding that let pods watch pods of their namespace.

    Gateways discover engine pods and cache nodes discover each other this
    way; the Role is namespaced, so the pods see nothing of other namespaces.
    """
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": child_metadata(owner, name, component)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": child_metadata(owner, name, component),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": child_metadata(owner, name, component),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
        },
    ]


def prestop_sleep(seconds: int) -> dict[str, Any]:
    """A container lifecycle whose preStop waits `seconds` before the container gets SIGTERM.

    NOTE: the `sleep` action (Kubernetes 1.30+) needs no shell or `sleep`
    binary in the image, unlike an exec hook.
    """
    return {"preStop": {"sleep": {"seconds": seconds}}} if seconds > 0 else {}
