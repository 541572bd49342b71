"""Status from children: conditions, readiness, and what the engines report.

Pure functions: the handlers read the children (StatefulSet, Deployment,
pods) and an engine's `/metrics` text, and these turn them into the
custom resource's `status`, following Kubernetes conventions
(`observedGeneration`; `conditions` with `type`, `status`, `reason`,
`message`, `lastTransitionTime`), so `kubectl wait --for=condition=Ready`
works.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

READY = "Ready"
RECONCILED = "Reconciled"


def condition(
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    *,
    generation: int,
    previous: Sequence[Mapping[str, Any]] = (),
    now: datetime.datetime | None = None,
) -> dict[str, Any]:
    """One status condition; `lastTransitionTime` moves only when the status changes.

    Args:
        type_: `Ready` or `Reconciled`.
        ok: whether the condition holds.
        reason: CamelCase reason.
        message: human-readable details.
        generation: the generation it was computed for.
        previous: the conditions now in the status.
        now: the time of a transition (default: now, UTC).
    """
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    if before is not None and before.get("status") == status and before.get("lastTransitionTime"):
        since = before["lastTransitionTime"]
    else:
        since = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": generation}


def merge_conditions(previous: Sequence[Mapping[str, Any]], *updates: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`previous` with the conditions of the same types replaced by `updates`, sorted by type."""
    by_type = {c["type"]: dict(c) for c in previous if "type" in c}
    by_type.update({c["type"]: dict(c) for c in updates})
    return [by_type[t] for t in sorted(by_type)]


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Whether a pod is Ready and not being deleted (the pods that receive requests)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def ring_version(members: Iterable[str], vnodes: int) -> str:
    """A short digest of the ring layout: the same members and vnodes give the same version."""
    text = f"{vnodes}|" + ",".join(sorted(members))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _replica_counts(workload: Mapping[str, Any] | None) -> tuple[int, int]:
    status = (workload or {}).get("status") or {}
    return int(status.get("replicas") or 0), int(status.get("readyReplicas") or 0)


def _ready(desired: int, ready: int, what: str) -> tuple[bool, str, str]:
    if ready >= desired:
        return True, "AllReplicasReady", f"{ready}/{desired} {what} Ready"
    return False, "ReplicasNotReady", f"{ready}/{desired} {what} Ready"


def cache_status(spec: Mapping[str, Any], statefulset: Mapping[str, Any] | None,
                 pods: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], tuple[bool, str, str]]:
    """Status fields of a KVCache and its Ready verdict (ok, reason, message)."""
    replicas, ready = _replica_counts(statefulset)
    members = sorted(p["metadata"]["name"] for p in pods if pod_ready(p))
    fields = {"replicas": replicas, "readyNodes": ready, "ringMembers": members,
              "ringVersion": ring_version(members, spec["vnodes"])}
    return fields, _ready(spec["replicas"], ready, "cache nodes")


def engine_status(spec: Mapping[str, Any], deployment: Mapping[str, Any] | None,
                  reported: Mapping[str, int]) -> tuple[dict[str, Any], tuple[bool, str, str]]:
    """Status fields of an EnginePool and its Ready verdict.

    Args:
        spec: the defaulted spec.
        deployment: the Deployment as stored (None: not there yet).
        reported: what an engine's metrics report (`block_size`, `num_gpu_blocks`).
    """
    replicas, ready = _replica_counts(deployment)
    fields: dict[str, Any] = {"replicas": replicas, "readyReplicas": ready}
    if "block_size" in reported:
        fields["blockSize"] = reported["block_size"]
    if "num_gpu_blocks" in reported:
        fields["kvCapacityBlocks"] = reported["num_gpu_blocks"]
    return fields, _ready(spec["replicas"], ready, "engines")


def gateway_status(spec: Mapping[str, Any], deployment: Mapping[str, Any] | None,
                   engine_pods: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], tuple[bool, str, str]]:
    """Status fields of a KVGateway and its Ready verdict (gateways Ready and at least one engine)."""
    replicas, ready = _replica_counts(deployment)
    engines = sum(1 for p in engine_pods if pod_ready(p))
    fields = {"replicas": replicas, "readyReplicas": ready, "enginePods": engines}
    ok, reason, message = _ready(spec["replicas"], ready, "gateways")
    if ok and engines == 0:
        return fields, (False, "NoEnginePods", "no Ready engine pod to route to")
    return fields, (ok, reason, f"{message}, {engines} engine pods")


_CACHE_CONFIG = re.compile(r"^vllm:cache_config_info\{(?P<labels>[^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_cache_config(metrics_text: str) -> dict[str, int]:
    """`block_size` and `num_gpu_blocks` from vLLM's `vllm:cache_config_info` metric (empty if absent)."""
    match = _CACHE_CONFIG.search(metrics_text)
    if match is None:
        return {}
    labels = dict(_LABEL.findall(match.group("labels")))
    return {key: int(labels[key]) for key in ("block_size", "num_gpu_blocks") if labels.get(key, "").isdigit()}
