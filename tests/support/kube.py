"""A Kubernetes API for loopback tests: kmock's emulator, and Pod and Node objects.

`kube_api()` serves kmock's in-memory Kubernetes emulator on 127.0.0.1 (a real
HTTP API that the official client talks to). The emulator assigns no `uid` and
no `resourceVersion` and ignores `labelSelector`, so the objects built here
carry their own and the code under test must filter labels itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kmock

NAMESPACE = "llm"
PODS = "v1/pods"
NODES = "v1/nodes"
_versions = itertools.count(100)
GONE = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "code": 410, "reason": "Expired", "message": "too old"}}


def next_version() -> str:
    """A fresh resourceVersion (the emulator assigns none)."""
    return str(next(_versions))


def pod(
    name: str,
    uid: str,
    *,
    port: int,
    ready: bool = True,
    ip: str = "127.0.0.1",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    """A Pod object whose engine listens on `ip:port` (the `kvgate.io/port` annotation)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": uid,
            "resourceVersion": next_version(),
            "labels": dict(labels if labels is not None else {"app": "engine"}),
            "annotations": {"kvgate.io/port": str(port), **(annotations or {})},
        },
        "spec": {"containers": [{"name": "engine", "image": "vllm"}], **({"nodeName": node} if node else {})},
        "status": {"phase": "Running", "podIP": ip, "conditions": [ready_condition(ready)]},
    }


def ready_condition(ready: bool) -> dict[str, str]:
    return {"type": "Ready", "status": "True" if ready else "False"}


def node(name: str, zone: str | None = None) -> dict[str, Any]:
    """A Node object, in `zone` when given (label `topology.kubernetes.io/zone`)."""
    labels = {"kubernetes.io/hostname": name, **({"topology.kubernetes.io/zone": zone} if zone else {})}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels, "uid": f"node-{name}"}}


@dataclass
class KubeAPI:
    """The emulator, its URL, and a client for the test's own changes."""

    emulator: kmock.KubernetesEmulator
    url: str
    http: aiohttp.ClientSession

    def _pods(self, name: str = "") -> str:
        return f"{self.url}/api/v1/namespaces/{NAMESPACE}/pods" + (f"/{name}" if name else "")

    async def _check(self, response: aiohttp.ClientResponse) -> dict[str, Any]:
        async with response:
            body = await response.json()
            assert response.status < 300, body
            return body

    async def create_pod(self, obj: Mapping[str, Any]) -> None:
        await self._check(await self.http.post(self._pods(), json=obj))

    async def patch_pod(self, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch pod `name` with a new resourceVersion."""
        patch = {**patch, "metadata": {**patch.get("metadata", {}), "resourceVersion": next_version()}}
        headers = {"content-type": "application/merge-patch+json"}
        await self._check(await self.http.patch(self._pods(name), json=patch, headers=headers))

    async def delete_pod(self, name: str) -> None:
        await self._check(await self.http.delete(self._pods(name)))

    async def create_node(self, obj: Mapping[str, Any]) -> None:
        await self._check(await self.http.post(f"{self.url}/api/v1/nodes", json=obj))

    def end_first_watch(self, *events: dict[str, Any]) -> asyncio.Event:
        """The first pod watch stays silent until the returned event is set, sends `events`, then its connection ends."""
        release = asyncio.Event()

        async def hold() -> None:
            await release.wait()

        self.emulator[kmock.action.WATCH, kmock.resource(PODS)][0:1] << (b"", hold, *events)
        return release

    def expire_second_watch(self) -> None:
        """The second pod watch is refused with 410 Gone, as for a resourceVersion too old to resume from."""
        self.emulator[kmock.action.WATCH, kmock.resource(PODS)][1:2] << (GONE,)

    def requests(self, action: kmock.action) -> list[kmock.Request]:
        """The pod requests of one kind (list, watch, ...) the API has served, oldest first."""
        return [r for r in self.emulator if r.action == action and r.resource is not None and r.resource.plural == "pods"]


@contextlib.asynccontextmanager
async def kube_api() -> AsyncIterator[KubeAPI]:
    """Serve the emulator with pods and nodes registered; yields its `KubeAPI`."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources[PODS] = {"kind": "Pod", "namespaced": True}
        emulator.resources[NODES] = {"kind": "Node", "namespaced": False}
        api = KubeAPI(emulator, str(server.url).rstrip("/"), aiohttp.ClientSession())
        try:
            yield api
        finally:
            await api.http.close()
