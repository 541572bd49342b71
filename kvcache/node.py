"""``kvgate cache-node``: run one L2 cache node until told to stop.

On SIGTERM (or SIGINT) the node leaves gracefully: it withdraws from the
membership, refuses new writes, hands each block to its new owner, then exits
0. Killed without warning, it costs the ring only its share of misses.

Start-up contract for launchers: with ``--ready-file F`` the node writes F
(atomically) once it serves, as JSON ``{"node_id", "address", "spec"}``;
``spec`` is the string to put in clients' static peer lists. With ``--port 0``
this is how a launcher learns the port.

Access (`kvcache.auth`): ``--token-file`` (or the environment variable
``KVGATE_CACHE_TOKEN``) gives the cluster token, ``--tenant-tokens-file`` the
tenants' tokens, ``--tls-cert``/``--tls-key`` turn on TLS. A node bound to
anything but loopback refuses to start without a token unless told
``--allow-unauthenticated``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from prometheus_client import CollectorRegistry, start_http_server

from kvcache.auth import read_tenant_tokens, read_token_file
from kvcache.client import DEFAULT_MAX_MESSAGE_BYTES
from kvcache.errors import ConfigError, TierUnavailable
from kvcache.eviction import DEFAULT_POLICY, POLICIES
from kvcache.membership import make_membership
from kvcache.metrics import NodeMetrics
from kvcache.ring import DEFAULT_VNODES, NodeInfo
from kvcache.server import CacheNode, NodeSettings

log = logging.getLogger("kvcache.node")

#: Environment variable holding the cluster token when ``--token-file`` is not given.
TOKEN_ENV = "KVGATE_CACHE_TOKEN"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """Parse a byte count such as ``1073741824``, ``512M`` or ``2GiB``."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)] if unit else value
    try:
        result = int(float(number) * _UNITS[unit])
    except (ValueError, OverflowError):  # OverflowError: "inf", "1e999"
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if result <= 0:
        raise argparse.ArgumentTypeError(f"byte count must be positive: {text!r}")
    return result


def parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """Parse ``host=h1,zone=z1`` into sorted pairs."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"bad label {item!r}: expected NAME=VALUE")
        pairs.append((name, value))
    return tuple(sorted(pairs))


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line: the problem, and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _CannotListen(Exception):
    """A port of the node is in use or not allowed (exit 1)."""


def _check_listen(host: str, port: int, flag: str) -> None:
    """Bind `host:port` once, so a port in use is one clear line before gRPC reports it its own way."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"{flag} {port} is not a TCP port; give 1-65535, or 0 for any free port")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} does not resolve ({exc}); give an address of this machine") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            hint = "stop the process using it or pick another" if exc.errno == errno.EADDRINUSE else "pick another"
            raise _CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint} {flag}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``kvgate cache-node``."""
    parser = _Parser(prog="kvgate cache-node", description="Run an L2 KV cache node (gRPC).")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    parser.add_argument("--advertise-host", default="", help="host clients use to reach this node")
    parser.add_argument("--node-id", default="", help="unique node name (default: HOST:PORT)")
    parser.add_argument("--labels", type=parse_labels, default=(), help="where it runs: host=H,zone=Z")
    parser.add_argument("--capacity-bytes", type=parse_bytes, default=1 << 30, help="byte budget (default 1G)")
    parser.add_argument("--policy", choices=sorted(POLICIES), default=DEFAULT_POLICY, help="eviction policy")
    parser.add_argument("--replicas", type=int, default=1, help="replication factor clients use (default 1)")
    parser.add_argument("--vnodes", type=int, default=DEFAULT_VNODES, help="ring points per node (default 160)")
    parser.add_argument(
        "--peers", action="append", default=[],
        help="static members [ID=]HOST:PORT[?host=H&zone=Z], comma-separated or repeated",
    )
    parser.add_argument(
        "--membership", choices=("static", "redis", "kubernetes"), default=None,
        help="where members are found (default: redis with --redis-url, else static)",
    )
    parser.add_argument("--redis-url", default=None, help="register in this Redis (heartbeat + expiry) instead")
    parser.add_argument("--selector", default="", help="kubernetes: labels of the cache-node pods, K=V[,K=V]")
    parser.add_argument(
        "--namespace", default="", help="kubernetes: the cache nodes' namespace (default: this pod's own, else 'default')"
    )
    parser.add_argument(
        "--kubernetes-api-url", default="", help="kubernetes: API server URL (else in-cluster, else kubeconfig)"
    )
    parser.add_argument("--cluster", default="default", help="ring name within the Redis (default 'default')")
    parser.add_argument("--ttl-s", type=float, default=10.0, help="registration lifetime without heartbeat")
    parser.add_argument("--heartbeat-s", type=float, default=2.0, help="registration renewal period")
    parser.add_argument("--max-message-bytes", type=parse_bytes, default=DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument("--handoff-timeout-s", type=float, default=60.0, help="deadline of the hand-off on leave")
    parser.add_argument(
        "--max-block-bytes", type=parse_bytes, default=256 << 20, help="largest frame accepted (default 256M)"
    )
    parser.add_argument(
        "--upload-budget-bytes", type=parse_bytes, default=256 << 20,
        help="memory for frames still being streamed in, over all callers (default 256M)",
    )
    parser.add_argument(
        "--token-file", type=Path, default=None,
        help=f"file holding the cluster token (default: ${TOKEN_ENV}; none leaves the node open)",
    )
    parser.add_argument(
        "--tenant-tokens-file", type=Path, default=None,
        help="file of 'TENANT TOKEN' lines: each tenant's blocks are kept apart (needs a cluster token)",
    )
    parser.add_argument("--tls-cert", default="", help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", default="", help="PEM roots to verify other nodes with (default: --tls-cert)")
    parser.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="serve a non-loopback interface without a token (anyone reaching the port reads and writes every block)",
    )
    parser.add_argument(
        "--data-port", type=int, default=0,
        help="port of the framed data protocol (bulk puts and gets beside gRPC); 0 picks a free one (default), -1 serves none",
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics here (0: off)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write JSON here once serving")
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    )
    return parser


def _write_ready(path: Path, info: NodeInfo) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"node_id": info.node_id, "address": info.address, "spec": info.spec()}))
    os.replace(tmp, path)


def _tokens(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The cluster token and the tenant tokens the command line names.

    Raises:
        ConfigError: an unreadable file, or an open node on a non-loopback
            interface without ``--allow-unauthenticated``.
    """
    token = read_token_file(args.token_file) if args.token_file else environ.get(TOKEN_ENV, "").strip()
    tenants = read_tenant_tokens(args.tenant_tokens_file) if args.tenant_tokens_file else {}
    if not token and args.host not in _LOOPBACK and not args.allow_unauthenticated:
        raise ConfigError(
            f"refusing to serve {args.host} without a token: give --token-file (or ${TOKEN_ENV}), "
            "or --allow-unauthenticated if the network is trusted"
        )
    return token, tuple(sorted(tenants.items()))


async def _run(args: argparse.Namespace) -> int:
    kind = args.membership or ("redis" if args.redis_url else "static")
    if kind == "kubernetes" and not (args.selector and args.node_id):
        raise ConfigError("--membership kubernetes needs --selector and --node-id (the pod's name)")
    if kind == "redis" and not args.redis_url:
        raise ConfigError("--membership redis needs --redis-url")
    peers = [NodeInfo.parse(spec) for item in args.peers for spec in item.split(",") if spec.strip()]
    membership = make_membership(
        peers=peers if kind == "static" else (),
        redis_url=args.redis_url if kind == "redis" else None,
        cluster=args.cluster,
        ttl_s=args.ttl_s,
        heartbeat_s=args.heartbeat_s,
        kubernetes_selector=args.selector if kind == "kubernetes" else "",
        kubernetes_namespace=args.namespace,
        kubernetes_port=args.port,
        kubernetes_api_url=args.kubernetes_api_url,
    )
    labels = args.labels
    if kind == "kubernetes" and not labels:
        from kvcache.membership.kubernetes import KubernetesMembership

        assert isinstance(membership, KubernetesMembership)
        # Place this node as its peers and clients see its pod (host = its Kubernetes node, zone).
        try:
            labels = await membership.labels_of(args.node_id)
        except TierUnavailable as exc:
            raise ConfigError(f"cannot read this node's pod {args.node_id!r}: {exc}") from exc
    token, tenants = _tokens(args, os.environ)
    settings = NodeSettings(
        node_id=args.node_id,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        labels=labels,
        capacity_bytes=args.capacity_bytes,
        policy=args.policy,
        replicas=args.replicas,
        vnodes=args.vnodes,
        max_message_bytes=args.max_message_bytes,
        handoff_timeout_s=args.handoff_timeout_s,
        max_block_bytes=args.max_block_bytes,
        upload_budget_bytes=args.upload_budget_bytes,
        cluster_token=token,
        tenant_tokens=tenants,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_ca_file=args.tls_ca,
        data_plane=args.data_port >= 0,
        data_port=max(0, args.data_port),
    )
    registry = CollectorRegistry()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host, registry=registry)
    node = CacheNode(settings, membership=membership, metrics=NodeMetrics(registry))
    try:
        info = await node.start()
    except BaseException:
        await node.stop(0)  # it may be serving already: stop it, and close the membership's connections
        raise
    print(f"kvgate cache-node {info.node_id} serving on {info.address}", flush=True)
    if args.ready_file is not None:
        _write_ready(args.ready_file, info)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("leaving the ring")
    try:
        report = await node.leave()  # bounded by --handoff-timeout-s; never raises for a slow peer
    finally:
        await node.stop()
    print(
        f"kvgate cache-node {info.node_id} left: {report.sent} block copies handed off, "
        f"{report.failed} failed, {report.skipped} already placed",
        flush=True,
    )
    return 0 if report.failed == 0 else 1


def main(argv: Sequence[str]) -> int:
    """Entry point of ``kvgate cache-node``.

    Args:
        argv: arguments after the sub-command name.

    Returns:
        0 after a graceful leave that lost nothing, 1 if some blocks found no
        new owner or the node could not start (port in use, Redis not
        answering), 2 on bad arguments; each failure is one line on stderr.
    """
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _check_listen(args.host, args.port, "--port")
        if args.metrics_port:
            _check_listen(args.host, args.metrics_port, "--metrics-port")
        if args.redis_url is not None and not args.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"--redis-url {args.redis_url!r} is not a Redis URL; expected redis://HOST:PORT/DB")
        return asyncio.run(_run(args))
    except ConfigError as exc:
        print(f"kvgate cache-node: {exc}", file=sys.stderr)
        return 2
    except _CannotListen as exc:
        print(f"kvgate cache-node: {exc}", file=sys.stderr)
        return 1
    except TierUnavailable as exc:
        where = f"Redis at {args.redis_url}" if args.redis_url else "the membership"
        print(f"kvgate cache-node: cannot register in {where}: {str(exc).rstrip('.')}; start it, or fix --redis-url", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
