"""kopf handlers: receive the event, render, apply, write the status.

`build_registry(ctx)` registers, for each kind, one reconcile handler (on
create, on spec update, on operator resume) and one timer that reconciles
again and refreshes the status from the children (drift correction, and
statuses that follow pods). Both call `reconcile`, which is the whole
control loop: load the spec, resolve references, render the children, apply
them, observe them. A bad spec becomes a `Reconciled=False/InvalidSpec`
condition and a kopf PermanentError (no retry until the spec changes); a
missing reference or a failing API call a TemporaryError (retried).
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, MutableMapping
from typing import Any

import kopf
import urllib3
from kubernetes.client import ApiException

from operators.apply import Applier, classify
from operators.errors import DependencyError, OperatorError, SpecError
from operators.meta import PORT_ANNOTATION, Owner, selector_labels
from operators.render import RENDERERS, Refs
from operators.schema import ENGINEPOOL, GROUP, KINDS, KVCACHE, VERSION
from operators.specs import load_spec
from operators.status import (
    READY,
    RECONCILED,
    cache_status,
    condition,
    engine_status,
    gateway_status,
    merge_conditions,
    parse_cache_config,
    pod_ready,
)


@dataclasses.dataclass(frozen=True, slots=True)
class ReconcileSettings:
    """How often and how patiently the operator reconciles."""

    resync_interval_s: float = 10.0
    """Seconds between timer reconciles of each object (status refresh, drift correction). Default 10."""
    retry_delay_s: float = 5.0
    """Seconds before a temporary failure (API error, missing reference) is retried. Default 5."""
    scrape_timeout_s: float = 2.0
    """Seconds to wait for an engine's /metrics when reading its block size. Default 2."""


@dataclasses.dataclass(frozen=True, slots=True)
class OperatorContext:
    """What the handlers work with.

    Attributes:
        applier: the API access for children and references.
        settings: timing.
        login: kopf login handler (kopf's own `login_via_client` in production).
        tune: called with kopf's settings at start-up, after the operator's own.
    """

    applier: Applier
    settings: ReconcileSettings = ReconcileSettings()
    login: Callable[..., Any] | None = None
    tune: Callable[[kopf.OperatorSettings], None] | None = None


def _refs(ctx: OperatorContext, kind: str, spec: dict[str, Any], namespace: str) -> Refs:
    """The referenced resources a renderer needs, defaulted; missing ones are left out."""
    if kind == "EnginePool" and spec.get("kvCacheRef"):
        name = spec["kvCacheRef"]["name"]
        cache = ctx.applier.read_custom(KVCACHE.plural, name, namespace)
        return Refs(kv_cache=(name, load_spec("KVCache", cache.get("spec"))) if cache else None)
    if kind == "KVGateway":
        name = spec["enginePoolRef"]["name"]
        pool = ctx.applier.read_custom(ENGINEPOOL.plural, name, namespace)
        return Refs(engine_pool=(name, load_spec("EnginePool", pool.get("spec"))) if pool else None)
    return Refs()


def _engine_report(ctx: OperatorContext, pods: list[dict[str, Any]], default_port: int) -> dict[str, int]:
    """Block size and KV capacity from the first Ready engine that answers its /metrics."""
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        if not ip or not pod_ready(pod):
            continue
        port = ((pod.get("metadata") or {}).get("annotations") or {}).get(PORT_ANNOTATION, default_port)
        try:
            with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=ctx.settings.scrape_timeout_s) as resp:
                report = parse_cache_config(resp.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError, ValueError):
            continue
        if report:
            return report
    return {}


def _observe(
    ctx: OperatorContext, kind: str, owner: Owner, spec: dict[str, Any], refs: Refs
) -> tuple[dict[str, Any], tuple[bool, str, str]]:
    """Status fields and the Ready verdict, from the children as stored and the pods."""
    applier, ns = ctx.applier, owner.namespace
    if kind == "KVCache":
        pods = applier.pods(ns, selector_labels(owner, "cache"))
        return cache_status(spec, applier.read("StatefulSet", owner.name, ns), pods)
    if kind == "EnginePool":
        pods = applier.pods(ns, selector_labels(owner, "engine"))
        return engine_status(spec, applier.read("Deployment", owner.name, ns), _engine_report(ctx, pods, spec["port"]))
    pool_name = refs.engine_pool[0] if refs.engine_pool else spec["enginePoolRef"]["name"]
    pods = applier.pods(ns, selector_labels(Owner("EnginePool", pool_name, ns, ""), "engine"))
    return gateway_status(spec, applier.read("Deployment", owner.name, ns), pods)


def reconcile(ctx: OperatorContext, kind: str, body: Any, status: Any, patch: Any, logger: Any) -> None:
    """Render `body`'s children, apply them and write the status into `patch`.

    Args:
        ctx: the operator's context.
        kind: the custom resource's kind.
        body: the custom resource (kopf's body).
        status: its current status.
        patch: kopf's patch; `patch.status` receives the new status.
        logger: kopf's per-object logger.

    Raises:
        kopf.PermanentError: the spec is invalid, or the API refused a child.
        kopf.TemporaryError: a reference is missing or the API failed; retried.
    """
    owner = Owner.of(body)
    previous = list((status or {}).get("conditions") or [])
    out: MutableMapping[str, Any] = patch.status

    def fail(exc: OperatorError | Exception, reason: str) -> None:
        out["observedGeneration"] = owner.generation
        out["conditions"] = merge_conditions(
            previous,
            condition(RECONCILED, False, reason, str(exc), generation=owner.generation, previous=previous),
            condition(READY, False, reason, str(exc), generation=owner.generation, previous=previous),
        )

    try:
        spec = load_spec(kind, body.get("spec"))
        refs = _refs(ctx, kind, spec, owner.namespace)
        children = RENDERERS[kind](owner, spec, refs)
        for child in children:
            ctx.applier.apply(child)
        fields, (ok, reason, message) = _observe(ctx, kind, owner, spec, refs)
    except SpecError as exc:
        fail(exc, exc.reason)
        raise kopf.PermanentError(str(exc)) from exc
    except DependencyError as exc:
        fail(exc, exc.reason)
        raise kopf.TemporaryError(str(exc), delay=ctx.settings.retry_delay_s) from exc
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        fail(exc, "ApplyFailed")
        raise classify(exc, delay=ctx.settings.retry_delay_s) from exc
    out.update(fields)
    out["observedGeneration"] = owner.generation
    out["conditions"] = merge_conditions(
        previous,
        condition(RECONCILED, True, "ChildrenApplied", f"{len(children)} children applied",
                  generation=owner.generation, previous=previous),
        condition(READY, ok, reason, message, generation=owner.generation, previous=previous),
    )
    logger.debug("reconciled %s/%s: %s", owner.namespace, owner.name, message)


def build_registry(ctx: OperatorContext) -> kopf.OperatorRegistry:
    """A kopf registry with the handlers of every kvgate kind (no module-level registry).

    Args:
        ctx: what the handlers use.
    """
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING
        settings.execution.max_workers = 8
        # A resync that is running when the operator stops gets this long to finish (seconds).
        settings.background.instant_exit_timeout = 5.0
        if ctx.tune is not None:
            ctx.tune(settings)

    if ctx.login is not None:
        kopf.on.login(registry=registry)(ctx.login)

    for kind in KINDS.values():
        def handler(body: Any, status: Any, patch: Any, logger: Any, _kind: str = kind.kind, **_: Any) -> None:
            reconcile(ctx, _kind, body, status, patch, logger)

        on = {"registry": registry, "id": "reconcile"}
        kopf.on.resume(GROUP, VERSION, kind.plural, **on)(handler)
        kopf.on.create(GROUP, VERSION, kind.plural, **on)(handler)
        kopf.on.update(GROUP, VERSION, kind.plural, field="spec", **on)(handler)

        def resync(body: Any, status: Any, patch: Any, logger: Any, stopped: Any, _kind: str = kind.kind,
                   **_: Any) -> None:
            if stopped:
                return
            try:
                reconcile(ctx, _kind, body, status, patch, logger)
            except kopf.PermanentError:
                pass  # the condition already says why; nothing to retry until the spec changes

        kopf.timer(GROUP, VERSION, kind.plural, registry=registry, id="resync",
                   interval=ctx.settings.resync_interval_s, initial_delay=ctx.settings.resync_interval_s)(resync)
    return registry
