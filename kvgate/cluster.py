"""`kvgate up`: a working local cluster on this machine.

Builds the tiny model if it is missing, starts the shared KV cache (L2 cache
nodes; L3 in Redis when one answers, else a local directory), starts N real
vLLM CPU engines (one OpenMP thread each, fixed KV capacity) loading the
tiered-cache connector, waits until every one answers, then runs the gateway
in front of them with the model's own tokenizer (`--gateways N`: N replicas
sharing routing state through the same Redis, see `kvgate.gateways`). It
prints one `engine: URL` line per engine and, per gateway, one `gateway: URL`
line followed by its `dashboard: URL` line (the live page; scripts rely on
these). Once the engines are up, the gateway's event loop asks to run ahead
of them, as `kvgate serve`'s does (`router.cpu_priority`). On Ctrl-C or
SIGTERM it drains the gateway, stops every engine, then the cache nodes
(which hand their blocks off). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from kvgate.cache_tiers import CacheTiers
from kvgate.engines import (
    Engine,
    EngineError,
    EngineSpec,
    add_engine_arg_option,
    free_ports,
    kv_events_args,
    start_engines,
    stop_engines,
    vllm_missing,
)
from kvgate.gateways import engine_events_host, event_source, serve_replicas
from kvgate.model import build_model, default_model_dir
from router.cpu_priority import PRIORITIES, raise_priority
from router.discovery import StaticDiscovery
from router.errors import InvalidRequest, StartupError
from router.policies import parse_spec
from router.server import load_encoder
from router.settings import Settings
from router.startup import CommandParser, check_listen

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="kvgate up", description="Start vLLM CPU engines and the kvgate gateway on this machine.")
    parser.add_argument("--engines", type=int, default=2, help="vLLM engines to start (default 2)")
    parser.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    parser.add_argument(
        "--gateways", type=int, default=1, help="gateway replicas on --port and after, sharing state via --redis-url (default 1)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    parser.add_argument("--model", type=Path, help="model directory (built here if missing; default .kvgate/models/tiny-llama)")
    parser.add_argument("--policy", default="kv-aware", help="routing policy (default kv-aware)")
    parser.add_argument("--kv-blocks", type=int, default=256, help="KV capacity of each engine in blocks (default 256)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="longest prompt plus output (default 4096)")
    parser.add_argument("--log-dir", type=Path, help="where engine logs go (default .kvgate/logs)")
    parser.add_argument("--cache-nodes", type=int, default=2, help="L2 KV cache nodes (default 2; 0 turns L2 off)")
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="L3 in this Redis if it answers, else a local directory"
    )
    parser.add_argument("--no-kv-cache", action="store_true", help="engines without the shared KV cache")
    add_engine_arg_option(parser)
    parser.add_argument(
        "--cpu-priority",
        choices=PRIORITIES,
        default="realtime",
        help="how the gateway asks to run ahead of the engines once they are up (default realtime; as `kvgate serve`)",
    )
    return parser


def _home() -> Path:
    return Path(os.environ.get("KVGATE_HOME") or Path.cwd() / ".kvgate")


#: Tokens per KV block of vLLM's CPU backend.
CPU_BLOCK_SIZE = 128


async def run(args: argparse.Namespace) -> int:
    # vLLM refuses to start unless one request of max_model_len fits in the KV cache.
    fits = (args.kv_blocks - 1) * CPU_BLOCK_SIZE
    if args.max_model_len > fits:
        print(f"kvgate up: --max-model-len lowered to {fits} to fit {args.kv_blocks} KV blocks", file=sys.stderr)
        args.max_model_len = fits
    target = args.model or default_model_dir(_home())
    try:
        model_dir = build_model(target)
    except FileExistsError:
        if not (Path(target, "config.json").is_file() and Path(target, "tokenizer.json").is_file()):
            raise StartupError(
                f"--model {target} is neither a model directory (config.json, tokenizer.json) nor empty; give one of those"
            ) from None
        model_dir = Path(target)  # a model of the user's own: used as it is, never rebuilt
    except OSError as exc:
        raise StartupError(
            f"cannot use {target} as the model directory: {exc.strerror or exc}; give --model a new or empty directory",
            exit_status=1,
        ) from None
    log_dir = args.log_dir or _home() / "logs"
    # Until the gateway takes SIGTERM over (to drain), SIGTERM cancels start-up
    # so that what already started is stopped, not orphaned.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    tiers = CacheTiers(_home() / "cache", nodes=max(args.cache_nodes, 0), redis_url=args.redis_url or None)
    engines: list[Engine] = []
    try:
        engine_args: list[str] = []
        if not args.no_kv_cache:
            engine_args = await tiers.start()
            for spec in tiers.specs:
                print(f"cache-node: {spec}", flush=True)
            for url in tiers.metrics_urls:
                print(f"cache-node-metrics: {url}", flush=True)
            print(f"l3: {tiers.l3}", flush=True)
        ports = free_ports(2 * args.engines)
        engines = [
            Engine(
                EngineSpec(
                    model_dir=model_dir,
                    port=port,
                    num_gpu_blocks=args.kv_blocks,
                    max_model_len=args.max_model_len,
                    # Each engine reports what it stores and evicts to the gateway.
                    extra_args=(
                        *engine_args,
                        *kv_events_args(event_port, topic=f"kv@engine-{i}", host=engine_events_host(args.gateways)),
                        *args.engine_args,
                    ),
                ),
                log_path=log_dir / f"engine-{i}.log",
            )
            for i, (port, event_port) in enumerate(zip(ports[: args.engines], ports[args.engines :]))
        ]
        print(f"starting {len(engines)} vLLM CPU engines (logs in {log_dir}) ...", file=sys.stderr, flush=True)
        try:
            await start_engines(engines)
        except EngineError as exc:
            print(f"kvgate up: {exc}", file=sys.stderr)
            return 1
        for engine in engines:
            print(f"engine: {engine.url}", flush=True)
        settings = Settings()
        # Every engine is up and keeps the scheduling it started with (threads and processes started from
        # here on are reset to normal, see `router.cpu_priority`).
        log.info("CPU priority: %s (asked for %s)", raise_priority(args.cpu_priority), args.cpu_priority)
        settings.server.host = args.host
        settings.server.port = args.port
        settings.routing.policy = args.policy
        settings.routing.tokenizer = model_dir
        # Every engine loads from the shared cache: price loads from the first request on.
        settings.shared_tier.mode = "off" if args.no_kv_cache else "on"
        # Requests beyond what an engine's KV cache can run at once (about 2k
        # tokens each) only queue inside the engine; queued at the gateway
        # instead they are ordered by the VTC fairness counters.
        settings.admission.max_inflight_per_pod = min(64, max(2, args.kv_blocks * CPU_BLOCK_SIZE // 2048))
        settings.discovery.worker_urls = tuple(e.url for e in engines)
        settings.discovery.kv_event_sources = tuple(f"{e.url}={event_source(e.spec.extra_args, args.gateways)}" for e in engines)
        return await serve_replicas(
            settings,
            args.gateways,
            redis_url=args.redis_url or None,
            discovery=lambda: StaticDiscovery(settings.discovery.worker_urls),
            encoder=load_encoder(settings),
            on_listening=lambda url: print(f"gateway: {url}\ndashboard: {url}/dashboard", flush=True),
        )
    finally:
        stop_engines(engines)
        tiers.stop()


def check_args(args: argparse.Namespace) -> None:
    """Check `kvgate up`'s arguments and this machine before anything starts.

    Raises:
        StartupError: the first problem found.
    """
    if args.engines < 1 or args.kv_blocks < 2:
        raise StartupError("--engines must be at least 1 and --kv-blocks at least 2")
    if args.gateways < 1:
        raise StartupError("--gateways must be at least 1")
    if args.max_model_len < 1:
        raise StartupError("--max-model-len must be at least 1")
    try:
        parse_spec(args.policy)
    except InvalidRequest as exc:
        raise StartupError(f"--policy: {exc.message}") from None
    if args.redis_url and not args.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise StartupError(f"--redis-url {args.redis_url!r} is not a Redis URL; expected redis://HOST:PORT/DB, or '' for none")
    check_listen(args.host, args.port)
    problem = vllm_missing()
    if problem:
        raise StartupError(problem, exit_status=1)


def main(argv: Sequence[str] | None = None) -> int:
    """`kvgate up ...`.

    Returns:
        0 after a clean drain; 2 for a mistake in the flags, 1 when this
        machine cannot run the cluster (port in use, no vLLM, engines failed),
        each said in one line on stderr; 130/143 when interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except StartupError as exc:
        print(f"kvgate up: {exc}", file=sys.stderr)
        return exc.exit_status
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(run(args))
    except StartupError as exc:
        print(f"kvgate up: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:
        return 143
