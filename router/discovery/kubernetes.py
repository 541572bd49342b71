"""Kubernetes discovery: the engine pods that match a label selector, from a pod watch.

`KubernetesDiscovery` lists the pods of one namespace that carry the selector's
labels, then watches them from the list's resourceVersion and calls its
`OnChange` each time the set of routable pods changes. A pod is routable while
it is Ready, has an IP and has no deletionTimestamp: the moment Kubernetes
marks a pod for deletion (before its engine gets SIGTERM) it gets no new
request, while requests already on it finish. Pods are keyed by UID, so a new
pod that reuses an address starts with an empty prefix-index entry.

The watch resumes from the last resourceVersion it saw when its connection
drops or times out, and lists again when the API server answers 410 Gone (that
version is too old). Until the first list has arrived there are no pods, so
the gateway's `/ready` answers 503.

Annotations a pod may carry: `kvgate.io/port` (the engine's port, else the
`--service-discovery-port`) and `kvgate.io/kv-events-port` (where its engine
publishes KV events; the gateway subscribes to `tcp://POD_IP:PORT`).

The official `kubernetes` client is synchronous: each list runs in a worker
thread, and each watch connection is read by a thread that hands events to the
event loop, so nothing here blocks the loop. Labels are checked here too, so
an API server that ignores `labelSelector` cannot slip in other pods.

Not here: health probes and load (`router.monitor`), RBAC (the operator grants
`get`, `list` and `watch` on pods).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from router.discovery.base import OnChange
from router.pods import PodEndpoint
from router.settings import DiscoverySettings

log = logging.getLogger(__name__)

PORT_ANNOTATION = "kvgate.io/port"
KV_EVENTS_PORT_ANNOTATION = "kvgate.io/kv-events-port"
#: Where a pod finds its own namespace (mounted with its service account token).
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_GONE = 410
_MAX_BACKOFF_S = 30.0
_CONNECT_TIMEOUT_S = 10.0


def parse_selector(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`KEY=VAL` items (each may hold several, comma-separated) as a label map.

    Raises:
        ValueError: an item without `=` or with an empty key, or no label at all.
    """
    labels: dict[str, str] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"bad selector {part!r}: expected KEY=VALUE")
            labels[key.strip()] = value.strip()
    if not labels:
        raise ValueError("Kubernetes discovery needs a selector: --selector KEY=VALUE[,KEY=VALUE]")
    return labels


def _port(text: str | None, default: int, pod: str, what: str) -> int | None:
    if text is None:
        return default
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        log.warning("pod %s: annotation %s=%r is not a port; ignoring the pod", pod, what, text)
        return None
    return port


def endpoint_of(pod: Mapping[str, Any], *, selector: Mapping[str, str], default_port: int) -> PodEndpoint | None:
    """The endpoint of a pod that should receive new requests, else None.

    Args:
        pod: the Pod object as the API serves it (JSON).
        selector: labels the pod must carry.
        default_port: the engine's port when the pod has no port annotation.

    Returns:
        None for a pod that lacks a selector label, is not Ready, has no IP, is
        being deleted, or has a malformed port annotation.
    """
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    labels = meta.get("labels") or {}
    if any(labels.get(key) != value for key, value in selector.items()):
        return None
    if meta.get("deletionTimestamp"):
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    ip = status.get("podIP")
    if not ready or not ip:
        return None
    name = meta.get("name") or "?"
    annotations = meta.get("annotations") or {}
    port = _port(annotations.get(PORT_ANNOTATION), default_port, name, PORT_ANNOTATION)
    if port is None:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    kv_events = None
    if KV_EVENTS_PORT_ANNOTATION in annotations:
        events_port = _port(annotations[KV_EVENTS_PORT_ANNOTATION], 0, name, KV_EVENTS_PORT_ANNOTATION)
        if events_port:
            kv_events = f"tcp://{host}:{events_port}"
    return PodEndpoint(f"http://{host}:{port}", uid=meta.get("uid"), kv_events=kv_events, name=name)


def api_client(api_url: str = "") -> client.ApiClient:
    """A client of the API server: `api_url` when given, else in-cluster, else kubeconfig.

    Raises:
        ConfigException: no API server is configured.
    """
    configuration = client.Configuration()
    if api_url:
        configuration.host = api_url.rstrip("/")
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            config.load_kube_config(client_configuration=configuration)  # honours KUBECONFIG
    return client.ApiClient(configuration)


def own_namespace(default: str = "default") -> str:
    """The namespace this process runs in (in a pod), else `default`."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class KubernetesDiscovery:
    """Engine pods from a Kubernetes pod watch.

    Args:
        api: client of the API server.
        namespace: namespace whose pods are watched.
        selector: labels a pod must carry.
        port: the engine port of pods without a `kvgate.io/port` annotation.
        watch_timeout_s: a watch is re-opened (from its resourceVersion) after this long.
        retry_backoff_s: first wait after a failed list or watch; doubles up to 30 s.
    """

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        selector: Mapping[str, str],
        port: int,
        watch_timeout_s: float = 300.0,
        retry_backoff_s: float = 1.0,
    ) -> None:
        self._api = api
        self._core = client.CoreV1Api(api)
        self.namespace = namespace
        self.selector = dict(selector)
        self.port = port
        self.watch_timeout_s = watch_timeout_s
        self.retry_backoff_s = retry_backoff_s
        self._label_selector = ",".join(f"{k}={v}" for k, v in self.selector.items())
        self._pods: dict[str, Mapping[str, Any]] = {}
        self._published: frozenset[PodEndpoint] | None = None
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        """Set once the first list has been applied."""
        self.lists = 0
        """Lists made so far (the first, then one after each 410 Gone or breakage)."""

    @classmethod
    def from_settings(cls, settings: DiscoverySettings) -> KubernetesDiscovery:
        """Build from the `discovery` settings group.

        Raises:
            ValueError: no or a malformed selector, or no API server configured.
        """
        selector = parse_selector(settings.selector)
        try:
            api = api_client(settings.kubernetes_api_url)
        except ConfigException as exc:
            raise ValueError(f"no Kubernetes API server: not in a cluster and no usable kubeconfig ({exc})") from exc
        return cls(
            api,
            namespace=settings.namespace or own_namespace(),
            selector=selector,
            port=settings.pod_port,
            watch_timeout_s=settings.watch_timeout_s,
            retry_backoff_s=settings.retry_backoff_s,
        )

    async def run(self, on_change: OnChange) -> None:
        try:
            await self._follow(on_change)
        finally:
            await asyncio.to_thread(self._api.close)

    async def _follow(self, on_change: OnChange) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.retry_backoff_s
        while True:
            try:
                if self.resource_version is None:
                    await self._list(on_change)
                opened = loop.time()
                await self._watch(on_change)
                if loop.time() - opened > 1.0:
                    backoff = self.retry_backoff_s
                    continue
                # A watch the server ends at once, again and again, must not
                # turn into a busy loop against the API server.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except _Gone:
                log.info("pod watch expired (410 Gone); listing again")
                self.resource_version = None
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                why = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)
                log.warning("pod discovery in %s failed: %s; retrying in %.1fs", self.namespace, why, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            except Exception:
                # NOTE: a watch that died for good would freeze the pod set
                # while the gateway looked healthy; anything unforeseen (an
                # odd object, a client bug) is logged with its stack and the
                # watch starts over from a fresh list.
                log.exception("pod discovery in %s broke; listing again in %.1fs", self.namespace, backoff)
                self.resource_version = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _list(self, on_change: OnChange) -> None:
        def fetch() -> dict[str, Any]:
            response = self._core.list_namespaced_pod(
                self.namespace,
                label_selector=self._label_selector,
                _preload_content=False,
                _request_timeout=(_CONNECT_TIMEOUT_S, self.watch_timeout_s),
            )
            try:
                return json.loads(response.data)
            finally:
                response.release_conn()

        body = await asyncio.to_thread(fetch)
        self.lists += 1
        items = body.get("items") or []
        self._pods = {_key(pod): pod for pod in items}
        self.resource_version = (body.get("metadata") or {}).get("resourceVersion")
        log.info("listed %d pods in %s matching %s", len(items), self.namespace, self._label_selector)
        self._publish(on_change)
        self.synced.set()

    async def _watch(self, on_change: OnChange) -> None:
        """Follow one watch connection until it ends; raises `_Gone` on 410."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stream = watch.Watch(return_type="object")  # events as plain JSON objects
        done = object()

        def hand_over(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                pass  # the loop is gone: nobody is listening any more

        def pump() -> None:
            try:
                for event in stream.stream(
                    self._core.list_namespaced_pod,
                    self.namespace,
                    label_selector=self._label_selector,
                    resource_version=self.resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=max(1, int(self.watch_timeout_s)),
                    # The read deadline is a backstop for a server that never
                    # honours timeoutSeconds; the watch then resumes.
                    _request_timeout=(_CONNECT_TIMEOUT_S, self.watch_timeout_s + 30),
                ):
                    hand_over(event)
            except BaseException as exc:  # noqa: BLE001 - every failure is handed to the loop
                hand_over(exc)
            else:
                hand_over(done)

        thread = threading.Thread(target=pump, name=f"pod watch {self.namespace}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, ApiException) and item.status == _GONE:
                    raise _Gone from item
                if isinstance(item, BaseException):
                    raise item
                self._apply(item)
                self._publish(on_change)
        finally:
            # stop() shuts the socket down, so a blocked read returns at once;
            # it is repeated because the thread may still be connecting.
            for _ in range(25):
                stream.stop()
                await asyncio.to_thread(thread.join, 0.2)
                if not thread.is_alive():
                    break

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        pod = event.get("raw_object") or event.get("object") or {}
        version = (pod.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self._pods[_key(pod)] = pod
        elif kind == "DELETED":
            self._pods.pop(_key(pod), None)
        elif kind != "BOOKMARK":
            log.debug("ignoring pod watch event %r", kind)
            return
        if version:
            self.resource_version = version

    def _publish(self, on_change: OnChange) -> None:
        endpoints = frozenset(
            endpoint
            for pod in self._pods.values()
            if (endpoint := endpoint_of(pod, selector=self.selector, default_port=self.port)) is not None
        )
        if endpoints != self._published:
            self._published = endpoints
            log.info("routable pods: %s", ", ".join(sorted(e.name or e.url for e in endpoints)) or "none")
            on_change(endpoints)


def _key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
