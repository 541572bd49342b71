"""The operator against kmock's in-memory Kubernetes API, for loopback tests.

`operator_env()` starts kmock's KubernetesEmulator on 127.0.0.1 with the
resources the operator touches registered, runs the real operator (kopf and
the official client) against it, and stops both. The emulator stores objects
and serves list, watch, get, create, patch and delete, but does no
defaulting, no garbage collection and ignores label selectors. `Emulator`
adds what the operator and kopf rely on: a UID and a resourceVersion on
creation, and a generation that grows with each spec change.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import dataclasses
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import kopf
from kubernetes import client

from operators.apply import Applier
from operators.handlers import OperatorContext, ReconcileSettings, build_registry
from operators.schema import KINDS

#: Built-in resources the operator reads or writes, and what kopf needs to start.
BUILTINS = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/pods": {"kind": "Pod", "namespaced": True},
    "v1/services": {"kind": "Service", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/serviceaccounts": {"kind": "ServiceAccount", "namespaced": True},
    "apps/v1/statefulsets": {"kind": "StatefulSet", "namespaced": True},
    "apps/v1/deployments": {"kind": "Deployment", "namespaced": True},
    "policy/v1/poddisruptionbudgets": {"kind": "PodDisruptionBudget", "namespaced": True},
    "rbac.authorization.k8s.io/v1/roles": {"kind": "Role", "namespaced": True},
    "rbac.authorization.k8s.io/v1/rolebindings": {"kind": "RoleBinding", "namespaced": True},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {"kind": "CustomResourceDefinition", "namespaced": False},
}

VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]

#: resource path of each child kind, as kmock keys its objects.
CHILD_RESOURCES = {info["kind"]: path for path, info in BUILTINS.items()}


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with UIDs, resourceVersions and generations, as an API server assigns them."""

    async def _handle(self, request):  # type: ignore[override]
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault("resourceVersion", "1")
            elif request.action == kmock.action.UPDATE and "spec" in request.data and request.subresource is None:
                try:
                    stored = self.objects[request.resource, request.namespace, request.name]
                except KeyError:
                    stored = None  # the emulator answers 404
                if stored is not None and not stored.deleted:
                    meta["generation"] = int(stored.get("metadata", {}).get("generation", 1)) + 1
        return await super()._handle(request)


@dataclasses.dataclass
class OperatorEnv:
    """A running emulator with the operator attached."""

    emulator: kmock.KubernetesEmulator
    url: str
    api: client.ApiClient
    thread: threading.Thread
    failure: list[BaseException]

    def operator_alive(self) -> bool:
        """Whether the operator still runs (no crash)."""
        return self.thread.is_alive() and not self.failure

    def obj(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """The stored object (a plain dict), or None if absent or deleted."""
        resource = KINDS[kind].resource if kind in KINDS else CHILD_RESOURCES[kind]
        try:
            stored = self.emulator.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if stored.deleted else stored.raw

    def children(self, namespace: str = "default") -> list[dict[str, Any]]:
        """Every stored object of `namespace` that the operator renders (not pods, events, CRs)."""
        kinds = set(CHILD_RESOURCES) - {"Event", "Namespace", "Pod", "CustomResourceDefinition"}
        return [o.raw for (_, ns, _), o in self.emulator.objects.items()
                if ns == namespace and not o.deleted and o.raw.get("kind") in kinds]

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a custom resource; returns it as stored (with its uid)."""
        body = dict(body)
        meta = dict(body["metadata"])
        meta.setdefault("namespace", "default")
        body["metadata"] = meta
        kind = KINDS[body["kind"]]
        api = client.CustomObjectsApi(self.api)
        await asyncio.to_thread(api.create_namespaced_custom_object, "kvgate.io", "v1alpha1",
                                meta["namespace"], kind.plural, body)
        stored = self.obj(body["kind"], meta["name"], meta["namespace"])
        assert stored is not None
        return stored

    async def update_spec(self, kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
        """Merge `spec` into a custom resource's spec (the emulator bumps its generation)."""
        api = client.CustomObjectsApi(self.api)
        await asyncio.to_thread(api.patch_namespaced_custom_object, "kvgate.io", "v1alpha1", namespace,
                                KINDS[kind].plural, name, {"spec": spec})

    def put(self, kind: str, body: dict[str, Any]) -> None:
        """Store a built-in object (e.g. a Pod) directly, with a uid."""
        meta = body["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        self.emulator.objects[CHILD_RESOURCES[kind], meta.get("namespace", "default"), meta["name"]] = body

    def patch(self, kind: str, name: str, changes: dict[str, Any], namespace: str = "default") -> None:
        """Change a stored built-in object (as a controller would, e.g. its status)."""
        self.emulator.objects[CHILD_RESOURCES[kind], namespace, name].patch(changes)


async def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            value = predicate()
        except (KeyError, TypeError, IndexError, StopIteration):
            value = None
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def operator_env(
    settings: ReconcileSettings | None = None, namespaces: tuple[str, ...] = ()
) -> AsyncIterator[OperatorEnv]:
    """Start the emulator and the operator (standalone; cluster-wide unless `namespaces`); stop both on exit."""
    settings = settings or ReconcileSettings(resync_interval_s=0.5, retry_delay_s=0.2, scrape_timeout_s=1.0)
    async with contextlib.AsyncExitStack() as stack:
        emulator = await stack.enter_async_context(Emulator())
        server = await stack.enter_async_context(kmock.Server(emulator))
        for path, info in BUILTINS.items():
            emulator.resources[path] = {**info, "verbs": VERBS}
        for kind in KINDS.values():
            emulator.resources[kind.resource] = {"kind": kind.kind, "namespaced": True, "verbs": VERBS,
                                                 "subresources": ["status"]}
        url = str(server.url).rstrip("/")
        configuration = client.Configuration(host=url)
        api = client.ApiClient(configuration)

        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url)

        def tune(kopf_settings: kopf.OperatorSettings) -> None:
            # Retry the emulator quickly rather than with kopf's production backoffs (seconds).
            kopf_settings.networking.error_backoffs = [0.1, 0.2, 0.5]
            # Exact namespace names need no scanning (the emulator cannot list namespaces).
            kopf_settings.scanning.disabled = bool(namespaces)

        ctx = OperatorContext(Applier(api), settings, login=login, tune=tune)
        stop, ready = threading.Event(), threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            # NOTE: kopf runs in a thread with its own event loop (as kopf's KopfRunner does): on
            # exit it waits for, then cancels, every task of its loop, which must not be the
            # emulator's.
            try:
                asyncio.run(kopf.operator(registry=build_registry(ctx), clusterwide=not namespaces,
                                          namespaces=namespaces, standalone=True, stop_flag=stop,
                                          ready_flag=ready))
            except BaseException as exc:  # reported by the test that owns the operator
                failure.append(exc)

        thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
        thread.start()
        try:
            assert await asyncio.to_thread(ready.wait, 20), "the operator did not start"
            yield OperatorEnv(emulator, url, api, thread, failure)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 30)
            api.close()
            # NOTE: kopf leaves an HTTP session of its loop unclosed on exit; collect it here, where
            # its ResourceWarning is expected, rather than in a later test.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
        assert not thread.is_alive(), "the operator did not stop"
        assert not failure, failure
