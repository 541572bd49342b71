"""Pod placement and pod-level pieces every renderer shares.

Anti-affinity on the hostname, topology spread over zones, node selectors and
tolerations come from the `placement` block of a spec; the PodDisruptionBudget
from `podDisruptionBudget`. Pure functions of the (defaulted) spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from operators.meta import Owner, child_metadata, selector_labels

HOSTNAME = "kubernetes.io/hostname"


def affinity(placement: Mapping[str, Any], match: Mapping[str, str]) -> dict[str, Any] | None:
    """The pod affinity block for `placement.antiAffinity` (None for `none`).

    Args:
        placement: the defaulted `placement` block.
        match: the selector labels of the pods to keep apart.
    """
    term = {"labelSelector": {"matchLabels": dict(match)}, "topologyKey": HOSTNAME}
    mode = placement["antiAffinity"]
    if mode == "required":
        return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    if mode == "preferred":
        weighted = {"weight": 100, "podAffinityTerm": term}
        return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [weighted]}}
    return None


def topology_spread(placement: Mapping[str, Any], match: Mapping[str, str]) -> list[dict[str, Any]]:
    """The topology spread constraints for `placement.topologySpread` (empty when disabled)."""
    spread = placement["topologySpread"]
    if not spread["enabled"]:
        return []
    return [
        {
            "maxSkew": spread["maxSkew"],
            "topologyKey": spread["topologyKey"],
            "whenUnsatisfiable": spread["whenUnsatisfiable"],
            "labelSelector": {"matchLabels": dict(match)},
        }
    ]


def place(pod_spec: dict[str, Any], placement: Mapping[str, Any], match: Mapping[str, str]) -> dict[str, Any]:
    """Add affinity, topology spread, node selector and tolerations to `pod_spec` (returned)."""
    chosen = affinity(placement, match)
    if chosen:
        pod_spec["affinity"] = chosen
    spread = topology_spread(placement, match)
    if spread:
        pod_spec["topologySpreadConstraints"] = spread
    if placement.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(placement["nodeSelector"])
    if placement.get("tolerations"):
        pod_spec["tolerations"] = [dict(t) for t in placement["tolerations"]]
    return pod_spec


def disruption_budget(owner: Owner, component: str, budget: Mapping[str, Any]) -> dict[str, Any] | None:
    """The PodDisruptionBudget of one component (None when disabled)."""
    if not budget["enabled"]:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(owner, owner.name, component),
        "spec": {
            "maxUnavailable": budget["maxUnavailable"],
            "selector": {"matchLabels": selector_labels(owner, component)},
        },
    }


def resources(spec_resources: Mapping[str, Any], **defaults: Mapping[str, str]) -> dict[str, Any]:
    """Container resources: the spec's, over `defaults` (`requests=..., limits=...`)."""
    result: dict[str, Any] = {}
    for section in ("requests", "limits"):
        merged = {**defaults.get(section, {}), **(spec_resources.get(section) or {})}
        if merged:
            result[section] = {key: str(value) for key, value in merged.items()}
    return result


def pod_downward_env() -> list[dict[str, Any]]:
    """POD_NAME, POD_NAMESPACE, POD_IP and NODE_NAME from the downward API."""
    fields = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP",
              "NODE_NAME": "spec.nodeName"}
    return [{"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}} for name, path in fields.items()]
