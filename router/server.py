"""`kvgate serve`: run the gateway until SIGTERM or SIGINT, then drain and exit 0.

Flags follow the SGLang and vLLM routers (`--worker-urls`, `--policy`,
`--host`, `--port`) so users can switch with nothing to relearn; every setting
can also come from `--config FILE` (YAML, see `router.settings`), flags
winning. On SIGTERM `/ready` fails at once, requests and streams in flight get
up to `drain_grace_s` to finish, and the process exits 0 as soon as none is
left (or the grace period is over).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from router import settings as settings_module
from router.app import GATEWAY, IN_FLIGHT, RUNNER_OPTIONS, create_app
from router.discovery import Discovery, make_discovery
from router.kv_events import parse_event_sources
from router.policies import REGISTRY
from router.prompts import PromptEncoder
from router.settings import Settings

log = logging.getLogger("kvgate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvgate serve", description="Run the kvgate gateway in front of vLLM pods.")
    parser.add_argument("--worker-urls", nargs="+", metavar="URL", help="base URLs of the vLLM pods")
    parser.add_argument(
        "--policy",
        help=f"routing policy or weighted mix (name:weight,...); names: {', '.join(sorted(REGISTRY))} (default kv-aware)",
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8000; 0 picks one)")
    parser.add_argument("--tokenizer", type=Path, help="model directory with tokenizer.json and the chat template")
    parser.add_argument("--config", type=Path, help="YAML settings file; flags override it")
    parser.add_argument(
        "--kv-events",
        action="append",
        metavar="URL=ENDPOINT",
        help="a pod's vLLM KV event endpoint (ZMQ), confirming the prefix index (repeatable)",
    )
    parser.add_argument(
        "--service-discovery", action="store_true", default=None, help="find the pods on Kubernetes by label selector"
    )
    parser.add_argument(
        "--selector", nargs="+", metavar="KEY=VAL[,KEY=VAL]", help="labels the engine pods carry (service discovery)"
    )
    parser.add_argument("--service-discovery-namespace", metavar="NS", help="namespace to watch (default: our own)")
    parser.add_argument(
        "--service-discovery-port", type=int, metavar="P", help="engine port without a kvgate.io/port annotation (8000)"
    )
    parser.add_argument("--max-inflight-per-pod", type=int, help="requests in flight per pod before requests queue")
    parser.add_argument("--max-queue", type=int, help="requests allowed to wait before 429")
    parser.add_argument("--api-key", action="append", dest="api_keys", help="accepted bearer token (repeatable)")
    parser.add_argument("--drain-grace", type=float, help="seconds in-flight requests get after SIGTERM")
    parser.add_argument(
        "--state-url",
        metavar="URL",
        help="redis://HOST:PORT/DB shared by gateway replicas so they route as one (default: this replica alone)",
    )
    parser.add_argument(
        "--state-cluster", metavar="NAME", help="replica group name in the state store (default 'default')"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults, then `--config`, then the flags given."""
    overrides: dict[str, dict[str, Any]] = {}

    def put(group: str, name: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(group, {})[name] = value

    put("discovery", "worker_urls", args.worker_urls)
    put("discovery", "kv_event_sources", args.kv_events)
    put("discovery", "kind", "kubernetes" if args.service_discovery else None)
    put("discovery", "selector", args.selector)
    put("discovery", "namespace", args.service_discovery_namespace)
    put("discovery", "pod_port", args.service_discovery_port)
    put("routing", "policy", args.policy)
    put("routing", "tokenizer", args.tokenizer)
    put("server", "host", args.host)
    put("server", "port", args.port)
    put("server", "api_keys", args.api_keys)
    put("server", "drain_grace_s", args.drain_grace)
    put("admission", "max_inflight_per_pod", args.max_inflight_per_pod)
    put("admission", "max_queue", args.max_queue)
    put("state", "url", args.state_url)
    put("state", "cluster", args.state_cluster)
    return settings_module.load(args.config, overrides)


def load_encoder(settings: Settings) -> PromptEncoder | None:
    """The model's tokenizer when `routing.tokenizer` names a model directory."""
    if settings.routing.tokenizer is None:
        return None
    from router.tokenize import PromptTokenizer

    return PromptTokenizer.from_model_dir(settings.routing.tokenizer)


async def serve(
    settings: Settings,
    *,
    discovery: Discovery,
    encoder: PromptEncoder | None = None,
    on_listening: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serve until `stop` is set (or SIGTERM/SIGINT), then drain.

    Args:
        settings: all settings.
        discovery: where pods come from.
        encoder: the model's tokenizer.
        on_listening: called with the gateway's base URL once it listens.
        stop: set to begin draining; signals set it too.

    Returns:
        0 after a clean drain.
    """
    app = create_app(settings, discovery=discovery, encoder=encoder)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=settings.server.drain_grace_s, **RUNNER_OPTIONS
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port, backlog=2048)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    (on_listening or (lambda u: print(f"gateway: {u}", flush=True)))(url)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        gateway = app[GATEWAY]
        gateway.draining = True
        # Keep listening while draining: /ready now fails, so load balancers
        # stop sending, but a request already on its way is still served.
        log.info("draining: %d requests in flight", app[IN_FLIGHT]["n"])
        deadline = time.monotonic() + settings.server.drain_grace_s
        while app[IN_FLIGHT]["n"] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if app[IN_FLIGHT]["n"]:
            log.warning("grace period over with %d requests still in flight", app[IN_FLIGHT]["n"])
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except settings_module.SettingsError as exc:
        print(f"kvgate serve: {exc}", file=sys.stderr)
        return 2
    try:
        parse_event_sources(settings.discovery.kv_event_sources)
    except ValueError as exc:
        print(f"kvgate serve: {exc}", file=sys.stderr)
        return 2
    try:
        discovery = make_discovery(settings.discovery)
    except ValueError as exc:
        print(f"kvgate serve: {exc}", file=sys.stderr)
        return 2
    encoder = load_encoder(settings)
    _install_uvloop()
    return asyncio.run(serve(settings, discovery=discovery, encoder=encoder))
