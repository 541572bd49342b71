"""The one apply step: make each rendered child exist as rendered.

`Applier.apply(manifest)` patches the child with server-side apply (field
manager `kvgate-operator`, forced, so fields the operator renders are its
own); an API server that answers 404 to the patch gets a create instead. It
also reads children back for the status. It talks through the official
`kubernetes` client, synchronously: kopf runs sync handlers in a thread pool.

`classify(exc)` maps API failures onto kopf's permanent/temporary errors.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import kopf
import urllib3
from kubernetes import client
from kubernetes.client import ApiException

FIELD_MANAGER = "kvgate-operator"

#: kind -> (API class, method suffix) of the official client.
KIND_APIS: dict[str, tuple[type, str]] = {
    "StatefulSet": (client.AppsV1Api, "stateful_set"),
    "Deployment": (client.AppsV1Api, "deployment"),
    "Service": (client.CoreV1Api, "service"),
    "ConfigMap": (client.CoreV1Api, "config_map"),
    "ServiceAccount": (client.CoreV1Api, "service_account"),
    "Pod": (client.CoreV1Api, "pod"),
    "PodDisruptionBudget": (client.PolicyV1Api, "pod_disruption_budget"),
    "Role": (client.RbacAuthorizationV1Api, "role"),
    "RoleBinding": (client.RbacAuthorizationV1Api, "role_binding"),
}

#: API statuses worth retrying: conflicts, throttling, server trouble.
TEMPORARY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


@dataclasses.dataclass(frozen=True, slots=True)
class Applier:
    """Creates, patches and reads namespaced objects through one API client.

    Attributes:
        api: the official client's ApiClient (in-cluster or kubeconfig).
    """

    api: client.ApiClient

    def _method(self, kind: str, verb: str) -> Any:
        api_class, suffix = KIND_APIS[kind]
        return getattr(api_class(self.api), f"{verb}_namespaced_{suffix}")

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Make the object `manifest` describes exist with the rendered fields.

        Args:
            manifest: a complete namespaced object (apiVersion, kind, metadata).

        Returns:
            The object as the API server stored it.

        Raises:
            ApiException: the API server refused (see `classify`).
        """
        meta = manifest["metadata"]
        kind, name, namespace = manifest["kind"], meta["name"], meta["namespace"]
        try:
            result = self._method(kind, "patch")(
                name, namespace, dict(manifest), field_manager=FIELD_MANAGER, force=True,
                _content_type="application/apply-patch+yaml", _preload_content=False,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            # A server-side apply creates missing objects; an API server without it answers 404.
            try:
                result = self._method(kind, "create")(namespace, dict(manifest), _preload_content=False)
            except ApiException as conflict:
                if conflict.status != 409:
                    raise
                # Created meanwhile (by a concurrent reconcile): patch it after all.
                result = self._method(kind, "patch")(
                    name, namespace, dict(manifest), field_manager=FIELD_MANAGER, force=True,
                    _content_type="application/apply-patch+yaml", _preload_content=False,
                )
        return _json(result)

    def read(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The object as stored, or None when it does not exist."""
        try:
            return _json(self._method(kind, "read")(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def read_custom(self, plural: str, name: str, namespace: str) -> dict[str, Any] | None:
        """A kvgate.io/v1alpha1 custom resource, or None when it does not exist."""
        api = client.CustomObjectsApi(self.api)
        try:
            return api.get_namespaced_custom_object("kvgate.io", "v1alpha1", namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def pods(self, namespace: str, match: Mapping[str, str]) -> list[dict[str, Any]]:
        """The pods of `namespace` whose labels include `match`.

        NOTE: the label selector is also checked here, on the client side, so a
        server that ignores `labelSelector` cannot hand back foreign pods.
        """
        selector = ",".join(f"{k}={v}" for k, v in match.items())
        listed = _json(client.CoreV1Api(self.api).list_namespaced_pod(namespace, label_selector=selector,
                                                                      _preload_content=False))
        items = listed.get("items") or []
        return [p for p in items if all((p.get("metadata", {}).get("labels") or {}).get(k) == v
                                        for k, v in match.items())]


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data)


def classify(exc: BaseException, *, delay: float = 5.0) -> kopf.PermanentError | kopf.TemporaryError:
    """The kopf error a failed API call becomes: retry it later, or give up until the spec changes.

    Args:
        exc: an `ApiException` or a connection failure.
        delay: seconds before kopf retries a temporary failure.
    """
    if isinstance(exc, ApiException):
        if exc.status in TEMPORARY_STATUSES or exc.status == 403:
            # 403: RBAC may be fixed without touching the resource.
            return kopf.TemporaryError(f"API server answered {exc.status} {exc.reason}", delay=delay)
        return kopf.PermanentError(f"API server refused a child: {exc.status} {exc.reason}: {exc.body}")
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
        return kopf.TemporaryError(f"API server unreachable: {exc}", delay=delay)
    return kopf.TemporaryError(f"{type(exc).__name__}: {exc}", delay=delay)
