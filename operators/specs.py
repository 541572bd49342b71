"""Check and default a custom resource's spec before anything is rendered.

An API server with the CRDs installed already defaults and validates specs;
the operator does both again from the same schema (`operators.schema`),
because an object may predate a CRD change, and adds the checks a schema
cannot express (quantities that parse, references that make sense). What
fails here is a `SpecError`: the user must edit the resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema

from operators.errors import SpecError
from operators.fields import apply_defaults, openapi
from operators.meta import quantity_bytes
from operators.schema import KINDS


def load_spec(kind: str, spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """The defaulted, checked spec of a custom resource of `kind`.

    Args:
        kind: `KVCache`, `EnginePool` or `KVGateway`.
        spec: the spec as stored.

    Returns:
        A new dict with every default in place.

    Raises:
        SpecError: the spec breaks the schema or a cross-field rule; the
            message names the field.
    """
    field = KINDS[kind].spec
    full = apply_defaults(field, dict(spec or {}))
    errors = sorted(jsonschema.Draft7Validator(openapi(field)).iter_errors(full), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.path) or "spec"
        raise SpecError(f"spec.{where}: {first.message}" if first.path else f"spec: {first.message}")
    _CHECKS[kind](full)
    return full


def _check_cache(spec: dict[str, Any]) -> None:
    if spec["replicationFactor"] > spec["replicas"]:
        raise SpecError(
            f"spec.replicationFactor ({spec['replicationFactor']}) exceeds spec.replicas ({spec['replicas']})"
        )
    l3 = spec.get("l3") or {}
    if l3.get("redis") and l3.get("pvc"):
        raise SpecError("spec.l3 takes redis or pvc, not both")
    quantity_bytes(spec["capacityPerNode"], "spec.capacityPerNode")


def _check_pool(spec: dict[str, Any]) -> None:
    quantity_bytes(spec["shmSize"], "spec.shmSize")
    if spec.get("kvCacheRef"):
        quantity_bytes(spec["kvCacheRef"]["l1Capacity"], "spec.kvCacheRef.l1Capacity")
    if spec["kvEvents"]["enabled"] and spec["kvEvents"]["port"] == spec["port"]:
        raise SpecError("spec.kvEvents.port must differ from spec.port")
    lifecycle = spec["lifecycle"]
    if lifecycle["preStopDelaySeconds"] >= lifecycle["terminationGracePeriodSeconds"]:
        raise SpecError("spec.lifecycle: preStopDelaySeconds must be shorter than terminationGracePeriodSeconds")
    reserved = {"--port", "--kv-transfer-config", "--kv-events-config", "--host"}
    clash = sorted(reserved & {arg.split("=", 1)[0] for arg in spec["engineArgs"]})
    if clash:
        raise SpecError(f"spec.engineArgs: {', '.join(clash)} are set by the operator; use the spec fields")


def _check_gateway(spec: dict[str, Any]) -> None:
    if spec.get("apiKeys") is not None and not spec["apiKeys"]["keys"]:
        raise SpecError("spec.apiKeys.keys must name at least one key of the Secret")
    lifecycle = spec["lifecycle"]
    if lifecycle["preStopDelaySeconds"] + lifecycle["drainGraceSeconds"] > lifecycle["terminationGracePeriodSeconds"]:
        raise SpecError("spec.lifecycle: preStopDelaySeconds + drainGraceSeconds exceed terminationGracePeriodSeconds")


_CHECKS = {"KVCache": _check_cache, "EnginePool": _check_pool, "KVGateway": _check_gateway}
