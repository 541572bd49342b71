"""Values shared by the renderers: the owner of the children, labels, quantities.

`Owner` is what a renderer knows of the custom resource it renders;
`child_metadata` gives every child the recommended `app.kubernetes.io/*`
labels and a controller ownerReference, so deleting the custom resource
deletes its children (Kubernetes' garbage collector does it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from operators.errors import SpecError
from operators.schema import API_VERSION

MANAGER = "kvgate-operator"

#: Annotations engine pods carry for the gateway's pod discovery.
PORT_ANNOTATION = "kvgate.io/port"
KV_EVENTS_PORT_ANNOTATION = "kvgate.io/kv-events-port"


@dataclasses.dataclass(frozen=True, slots=True)
class Owner:
    """The custom resource whose children are rendered.

    Attributes:
        kind: `KVCache`, `EnginePool` or `KVGateway`.
        name: its name (children's names derive from it).
        namespace: its namespace (children live there too).
        uid: its UID, for the ownerReferences.
        generation: its `metadata.generation`.
    """

    kind: str
    name: str
    namespace: str
    uid: str
    generation: int = 1

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Owner:
        """The owner described by a custom resource's body."""
        meta = body["metadata"]
        return cls(body["kind"], meta["name"], meta.get("namespace") or "default", meta.get("uid", ""),
                   int(meta.get("generation") or 1))


def selector_labels(owner: Owner, component: str) -> dict[str, str]:
    """The labels that select the pods of one component of `owner` (stable for its lifetime)."""
    return {
        "app.kubernetes.io/name": "kvgate",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
    }


def labels(owner: Owner, component: str) -> dict[str, str]:
    """The recommended labels of a child of `owner`."""
    return {
        **selector_labels(owner, component),
        "app.kubernetes.io/part-of": "kvgate",
        "app.kubernetes.io/managed-by": MANAGER,
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    """The controller ownerReference that ties a child to `owner`."""
    return {
        "apiVersion": API_VERSION,
        "kind": owner.kind,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(owner: Owner, name: str, component: str, **extra: Any) -> dict[str, Any]:
    """The metadata of a child object named `name`."""
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [owner_reference(owner)],
        **extra,
    }


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?$")
_FACTORS = {
    None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def quantity_bytes(value: str | int, field: str) -> int:
    """Bytes in a Kubernetes quantity such as `4Gi`, `512M` or `1073741824`.

    Args:
        value: the quantity.
        field: its path in the spec, for the error message.

    Raises:
        SpecError: not a positive byte quantity.
    """
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise SpecError(f"{field}: {value!r} is not a byte quantity such as 4Gi or 512M")
    result = int(float(match.group(1)) * _FACTORS[match.group(2)])
    if result <= 0:
        raise SpecError(f"{field}: {value!r} must be positive")
    return result


def format_mib(count: int) -> str:
    """`count` bytes as a whole-MiB quantity (rounded up), e.g. `1280Mi`."""
    return f"{-(-count // 2**20)}Mi"
