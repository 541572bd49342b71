"""L2 members found on Kubernetes: the Ready cache-node pods that match a label selector.

A cache node on Kubernetes announces nothing: its pod is its registration. It
becomes a member when its readiness probe passes and stops being one the
moment Kubernetes marks the pod for deletion (before the node gets SIGTERM and
hands its blocks off), or when it turns not-Ready. Cache nodes and the
engines' connectors both read the same list, so they build the same ring.

Each member is named by its pod name (stable in a StatefulSet, so a restarted
node keeps its ring points) and placed by its Kubernetes node: label `host` is
`spec.nodeName`, label `zone` the Node's `topology.kubernetes.io/zone` when it
has one. The ring then puts a block's replicas on different zones, then on
different hosts (`kvcache.ring`). Reading Nodes needs `get` on `nodes` (a
ClusterRole); without it members carry no zone and a warning says why.

`members()` is called every few seconds by its readers (the L2 client, the
node itself), so this lists pods on demand (at most once per `cache_s`)
instead of keeping a watch open: a list is always a consistent snapshot, and
there is no resourceVersion to keep. The official `kubernetes` client is
synchronous, so every call runs in a worker thread.

Not here: the gateway's engine-pod watch (`router.discovery.kubernetes`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from kvcache.errors import ConfigError, TierUnavailable
from kvcache.ring import NodeId, NodeInfo

log = logging.getLogger(__name__)

PORT_ANNOTATION = "kvgate.io/port"
ZONE_LABEL = "topology.kubernetes.io/zone"
#: Where a pod finds its own namespace (mounted with its service account token).
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_TIMEOUT_S = 5.0


def parse_selector(text: str) -> dict[str, str]:
    """``K=V[,K=V]`` as a label map.

    Raises:
        ConfigError: an item without ``=`` or an empty key, or no label at all.
    """
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad selector item {part!r}: expected KEY=VALUE")
        labels[key.strip()] = value.strip()
    if not labels:
        raise ConfigError("Kubernetes membership needs a selector: KEY=VALUE[,KEY=VALUE]")
    return labels


def api_client(api_url: str = "") -> client.ApiClient:
    """A client of the API server: `api_url` when given, else in-cluster, else kubeconfig.

    Raises:
        ConfigError: no API server is configured.
    """
    configuration = client.Configuration()
    try:
        if api_url:
            configuration.host = api_url.rstrip("/")
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException:
                config.load_kube_config(client_configuration=configuration)  # honours KUBECONFIG
    except ConfigException as exc:
        raise ConfigError(f"no Kubernetes API server: not in a cluster and no usable kubeconfig ({exc})") from exc
    return client.ApiClient(configuration)


def own_namespace(default: str = "default") -> str:
    """The namespace this process runs in (in a pod), else `default`."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


def serving(pod: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    """Whether `pod` carries the selector's labels, is Ready, has an IP and is not being deleted."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    labels = meta.get("labels") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    return (
        all(labels.get(key) == value for key, value in selector.items())
        and not meta.get("deletionTimestamp")
        and ready
        and bool(status.get("podIP"))
    )


class KubernetesMembership:
    """Members: the serving pods of a namespace that match a selector.

    Args:
        api: client of the API server (closed by `aclose`).
        namespace: the cache nodes' namespace.
        selector: labels the cache-node pods carry.
        port: their gRPC port when a pod has no `kvgate.io/port` annotation
            (0: the annotation is required).
        cache_s: an answer is reused for this long (readers poll).
    """

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        selector: Mapping[str, str],
        port: int = 0,
        cache_s: float = 1.0,
    ) -> None:
        self._api = api
        self._core = client.CoreV1Api(api)
        self.namespace = namespace
        self.selector = dict(selector)
        self.port = port
        self.cache_s = cache_s
        self._label_selector = ",".join(f"{k}={v}" for k, v in self.selector.items())
        self._zones: dict[str, str] = {}
        self._withdrawn: set[NodeId] = set()
        self._cached: tuple[float, list[NodeInfo]] | None = None
        self._zones_denied = False

    async def members(self) -> list[NodeInfo]:
        """The serving cache-node pods, as ring members.

        Raises:
            TierUnavailable: the API server cannot be read.
        """
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.cache_s:
            nodes = self._cached[1]
        else:
            try:
                nodes = await asyncio.to_thread(self._read)
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                raise TierUnavailable("membership", f"kubernetes: {_describe(exc)}") from exc
            self._cached = (now, nodes)
        return [node for node in nodes if node.node_id not in self._withdrawn]

    async def labels_of(self, pod_name: str) -> tuple[tuple[str, str], ...]:
        """The placement labels (`host`, `zone`) members give the pod `pod_name`.

        A cache node calls this at start so that its own `NodeInfo` equals the
        one its peers and clients build, hence they all compute one ring.

        Raises:
            TierUnavailable: the API server cannot be read.
        """
        try:
            return await asyncio.to_thread(self._labels_of, pod_name)
        except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise TierUnavailable("membership", f"kubernetes: {_describe(exc)}") from exc

    async def register(self, node: NodeInfo) -> None:
        """Nothing to announce (the pod's readiness does); undoes a local `deregister`."""
        self._withdrawn.discard(node.node_id)

    async def deregister(self, node_id: NodeId) -> None:
        """Leave this process's view at once; peers see the pod's deletionTimestamp."""
        self._withdrawn.add(node_id)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._api.close)

    def _read(self) -> list[NodeInfo]:
        response = self._core.list_namespaced_pod(
            self.namespace, label_selector=self._label_selector, _preload_content=False, _request_timeout=_TIMEOUT_S
        )
        try:
            items = json.loads(response.data).get("items") or []
        finally:
            response.release_conn()
        nodes = []
        for pod in items:
            if not serving(pod, self.selector):
                continue
            node = self._node_info(pod)
            if node is not None:
                nodes.append(node)
        return nodes

    def _node_info(self, pod: Mapping[str, Any]) -> NodeInfo | None:
        meta = pod.get("metadata") or {}
        name = meta.get("name") or "?"
        text = (meta.get("annotations") or {}).get(PORT_ANNOTATION)
        try:
            port = int(text) if text is not None else self.port
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            log.warning("cache-node pod %s has no usable port (annotation %s=%r); leaving it out", name, PORT_ANNOTATION, text)
            return None
        ip = pod["status"]["podIP"]
        host = f"[{ip}]" if ":" in ip else ip
        return NodeInfo(NodeId(name), f"{host}:{port}", self._placement(pod))

    def _labels_of(self, pod_name: str) -> tuple[tuple[str, str], ...]:
        response = self._core.read_namespaced_pod(
            pod_name, self.namespace, _preload_content=False, _request_timeout=_TIMEOUT_S
        )
        try:
            pod = json.loads(response.data)
        finally:
            response.release_conn()
        return self._placement(pod)

    def _placement(self, pod: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        node_name = (pod.get("spec") or {}).get("nodeName") or ""
        host = node_name or (pod.get("status") or {}).get("podIP") or ""
        labels = {"host": host}
        zone = self._zone(node_name) if node_name else ""
        if zone:
            labels["zone"] = zone
        return tuple(sorted(labels.items()))

    def _zone(self, node_name: str) -> str:
        if node_name in self._zones:
            return self._zones[node_name]
        zone = ""
        if not self._zones_denied:
            try:
                response = self._core.read_node(node_name, _preload_content=False, _request_timeout=_TIMEOUT_S)
                try:
                    node = json.loads(response.data)
                finally:
                    response.release_conn()
                zone = ((node.get("metadata") or {}).get("labels") or {}).get(ZONE_LABEL, "")
            except ApiException as exc:
                if exc.status in (401, 403):
                    self._zones_denied = True
                    log.warning("cannot read Nodes (%s): cache-node replicas are spread by host only", exc.reason)
                elif exc.status != 404:
                    raise
        self._zones[node_name] = zone
        return zone


def _describe(exc: Exception) -> str:
    return f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)


def from_options(
    *, selector: str, namespace: str = "default", port: int = 0, api_url: str = "", cache_s: float = 1.0
) -> KubernetesMembership:
    """Build the membership from command-line or connector settings.

    Raises:
        ConfigError: a bad selector, or no API server configured.
    """
    return KubernetesMembership(
        api_client(api_url),
        namespace=namespace or own_namespace(),
        selector=parse_selector(selector),
        port=port,
        cache_s=cache_s,
    )
