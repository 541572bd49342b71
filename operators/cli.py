"""`kvgate operator`: run the kvgate Kubernetes operator until stopped.

Connects with the in-cluster service account when it runs in a pod, else with
the standard kubeconfig (`KUBECONFIG`, `~/.kube/config`), and runs kopf with
the handlers of `operators.handlers`, watching one or more namespaces or the
whole cluster. The composition root (`kvgate.cli`) dispatches here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import kopf
from kubernetes import client, config

from operators.apply import Applier
from operators.handlers import OperatorContext, ReconcileSettings, build_registry


def build_parser() -> argparse.ArgumentParser:
    """The command line of `kvgate operator`."""
    parser = argparse.ArgumentParser(prog="kvgate operator", description="Run the kvgate Kubernetes operator.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch this namespace (repeatable; globs such as 'team-*' work)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--liveness", default=None, metavar="URL",
                        help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--resync-interval", type=float, default=ReconcileSettings.resync_interval_s,
                        help="seconds between periodic reconciles of each object (default 10)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def api_client() -> client.ApiClient:
    """An API client from the in-cluster service account, else from the kubeconfig."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def main(argv: Sequence[str]) -> int:
    """Entry point of `kvgate operator`.

    Args:
        argv: arguments after the sub-command name.

    Returns:
        0 after a clean stop (SIGTERM/SIGINT), 1 when no cluster configuration is found.
    """
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        api = api_client()
    except config.ConfigException as exc:
        print(f"kvgate operator: no in-cluster or kubeconfig credentials: {exc}", file=sys.stderr)
        return 1
    namespaces = tuple(args.namespace)
    globs = any(ch in ns for ns in namespaces for ch in "*?[")

    def tune(settings: kopf.OperatorSettings) -> None:
        # Exact namespace names need no namespace scanning (nor the RBAC to list namespaces).
        settings.scanning.disabled = bool(namespaces) and not globs

    ctx = OperatorContext(Applier(api), ReconcileSettings(resync_interval_s=args.resync_interval),
                          login=kopf.login_via_client, tune=tune)
    # NOTE: standalone (no peering): the operator runs as one replica with the Recreate strategy.
    asyncio.run(kopf.operator(
        registry=build_registry(ctx),
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,
        liveness_endpoint=args.liveness,
    ))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
