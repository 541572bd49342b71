"""`kvgate serve`: run the gateway until SIGTERM or SIGINT, then drain and exit 0.

Flags follow the SGLang and vLLM routers (`--worker-urls`, `--policy`,
`--host`, `--port`) so users can switch with nothing to relearn; every setting
can also come from `--config FILE` (YAML, see `router.settings`), flags
winning. On SIGTERM `/ready` fails at once, new API calls answer 503
(`Connection: close`), requests and streams in flight get up to
`drain_grace_s` to finish, and the process exits 0 as soon as none is left,
and within the grace period in any case (what is still running near its end
is cancelled).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from router import settings as settings_module
from router.app import GATEWAY, IN_FLIGHT, create_app
from router.connections import GatewayRunner
from router.cpu_priority import PRIORITIES, raise_priority
from router.discovery import Discovery, make_discovery
from router.errors import StartupError
from router.policies import REGISTRY
from router.prompts import PromptEncoder
from router.settings import Settings
from router.startup import CommandParser, check_listen, check_settings

log = logging.getLogger("kvgate")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="kvgate serve", description="Run the kvgate gateway in front of vLLM pods.")
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
        "--decision-log", type=Path, metavar="FILE", help="append every routing decision to FILE as a JSON line"
    )
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
    parser.add_argument(
        "--max-inflight-per-pod", type=int, help="requests in flight per pod at most before requests queue (64)"
    )
    parser.add_argument(
        "--adaptive-admission",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each pod's limit follows its engine's waiting queue, KV usage and TTFT, under --max-inflight-per-pod (default on)",
    )
    parser.add_argument("--max-queue", type=int, help="requests allowed to wait before 429")
    parser.add_argument("--api-key", action="append", dest="api_keys", help="accepted bearer token (repeatable)")
    parser.add_argument("--drain-grace", type=float, help="seconds in-flight requests get after SIGTERM")
    parser.add_argument(
        "--cpu-priority",
        choices=PRIORITIES,
        help="how the gateway asks to be scheduled beside busy engines (default realtime, needs CAP_SYS_NICE)",
    )
    parser.add_argument(
        "--state-url",
        metavar="URL",
        help="redis://HOST:PORT/DB shared by gateway replicas so they route as one (default: this replica alone)",
    )
    parser.add_argument(
        "--state-cluster", metavar="NAME", help="replica group name in the state store (default 'default')"
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=_LOG_LEVELS, help="logging level (default INFO)"
    )
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
    put("routing", "decision_log", args.decision_log)
    put("server", "host", args.host)
    put("server", "port", args.port)
    put("server", "api_keys", args.api_keys)
    put("server", "drain_grace_s", args.drain_grace)
    put("server", "cpu_priority", args.cpu_priority)
    put("admission", "max_inflight_per_pod", args.max_inflight_per_pod)
    put("admission", "max_queue", args.max_queue)
    put("admission", "adaptive", args.adaptive_admission)
    put("state", "url", args.state_url)
    put("state", "cluster", args.state_cluster)
    return settings_module.load(args.config, overrides)


def load_encoder(settings: Settings) -> PromptEncoder | None:
    """The model's tokenizer when `routing.tokenizer` names a model directory.

    Raises:
        StartupError: the directory cannot be loaded (no tokenizer.json, a bad template).
    """
    if settings.routing.tokenizer is None:
        return None
    from router.tokenize import PromptTokenizer, TokenizerLoadError

    try:
        return PromptTokenizer.from_model_dir(settings.routing.tokenizer)
    except TokenizerLoadError as exc:
        raise StartupError(
            f"--tokenizer {settings.routing.tokenizer}: {exc}; give the model directory (tokenizer.json, tokenizer_config.json)"
        ) from None


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
    grace = settings.server.drain_grace_s
    # What is still running when the drain loop ends is cancelled within
    # `closing` (and aiohttp waits at most twice that), so exit stays within the grace.
    closing = min(1.0, grace / 4)
    runner = GatewayRunner(
        app,
        limits=settings.server,
        metrics=app[GATEWAY].metrics,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=closing,
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
        # stop sending, and a request still on its way gets a clean 503.
        log.info("draining: %d requests in flight", app[IN_FLIGHT]["n"])
        deadline = time.monotonic() + grace - 2 * closing
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
    """`kvgate serve ...`: check everything given, then serve until SIGTERM.

    Returns:
        0 after a clean drain; 2 for a mistake in flags or config, 1 when the
        machine refuses (the port is in use), each said in one line on stderr.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        check_settings(settings)
        try:
            discovery = make_discovery(settings.discovery)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        encoder = load_encoder(settings)
        check_listen(settings.server.host, settings.server.port)
    except settings_module.SettingsError as exc:
        print(f"kvgate serve: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"kvgate serve: {exc}", file=sys.stderr)
        return exc.exit_status
    # Once every check has passed (a mistake is one line), on the thread that will run the event loop.
    wanted = settings.server.cpu_priority
    applied = raise_priority(wanted)
    log.info("CPU priority: %s (asked for %s)", applied, wanted)
    if applied == "normal" and wanted != "normal":
        log.warning(
            "the gateway runs at normal CPU priority: beside busy engines on the same host, its added latency "
            "grows (grant CAP_SYS_NICE, or set server.cpu_priority: normal to silence this)"
        )
    _install_uvloop()
    try:
        return asyncio.run(serve(settings, discovery=discovery, encoder=encoder))
    except OSError as exc:  # the port was taken between the check and the bind
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        where = f"{settings.server.host}:{settings.server.port}"
        print(f"kvgate serve: cannot listen on {where}: {exc.strerror or exc}; pick another --port", file=sys.stderr)
        return 1
