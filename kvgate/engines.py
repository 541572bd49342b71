"""Real vLLM CPU engines as subprocesses: start, wait until ready, measure, stop.

`kvgate up`, the benchmarks and the end-to-end tests run real engines on the
tiny local model (`kvgate.model`) with random weights. One engine is a process
group: the API server, its engine-core child, a worker and a resource tracker.
`Engine.stop` signals the whole group, so no engine core outlives its server.

Every engine runs with `--load-format dummy --dtype float32 --enforce-eager
--enable-prefix-caching` on 127.0.0.1, one OpenMP thread and no CPU pinning
(several engines share two cores), and `VLLM_SERVER_DEV_MODE=1` so that
`POST /reset_prefix_cache` answers instead of 404.

Not here: deciding how many engines to run or which connector to load (the
cluster and the tests do), or talking to the engines (the gateway does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import aiohttp

#: Environment every engine gets; `EngineSpec.extra_env` may override it.
ENGINE_ENV: Mapping[str, str] = MappingProxyType(
    {
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_SERVER_DEV_MODE": "1",
        # Nothing may be fetched at run time: no hub look-ups, no usage reports.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
)

_LOG_TAIL_BYTES = 4000


class EngineError(Exception):
    """An engine did not start, or died. The message ends with its log's tail."""


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """How to run one vLLM CPU engine.

    Attributes:
        model_dir: the model directory (`kvgate.model.build_model`).
        port: TCP port of the OpenAI server on `host`.
        served_model_name: model name clients send (`tiny-llama`).
        num_gpu_blocks: fixed KV capacity in blocks (`--num-gpu-blocks-override`),
            so cache pressure is the same on every machine; None lets vLLM size
            it from `kvcache_space_gib`.
        max_model_len: longest prompt plus output in tokens.
        block_size: tokens per KV block; None keeps vLLM's CPU default (128).
        kvcache_space_gib: `VLLM_CPU_KVCACHE_SPACE`, the KV memory vLLM
            reserves (GiB, default 1); with `num_gpu_blocks` only that many
            blocks are used.
        host: address the server binds.
        extra_args: further command-line arguments, e.g. `--kv-transfer-config
            JSON` or `--kv-events-config JSON`.
        extra_env: further environment variables, overriding `ENGINE_ENV`.
        python: interpreter that runs vLLM.
    """

    model_dir: Path
    port: int
    served_model_name: str = "tiny-llama"
    num_gpu_blocks: int | None = None
    max_model_len: int = 4096
    block_size: int | None = None
    kvcache_space_gib: int = 1
    host: str = "127.0.0.1"
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable

    @property
    def url(self) -> str:
        """Base URL of the engine's HTTP server, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        """The engine's command line."""
        args = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--load-format", "dummy",
            "--dtype", "float32",
            "--enforce-eager",
            "--enable-prefix-caching",
            "--max-model-len", str(self.max_model_len),
        ]  # fmt: skip
        if self.num_gpu_blocks is not None:
            args += ["--num-gpu-blocks-override", str(self.num_gpu_blocks)]
        if self.block_size is not None:
            args += ["--block-size", str(self.block_size)]
        return args + list(self.extra_args)

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The engine's environment: `base`, then `ENGINE_ENV`, then `extra_env`."""
        return {
            **base,
            **ENGINE_ENV,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kvcache_space_gib),
            **self.extra_env,
        }


def add_engine_arg_option(parser: argparse.ArgumentParser, *, where: str = "") -> None:
    """Add `--engine-arg ARG` (repeatable; into `engine_args`): a further argument for every vLLM engine."""
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        dest="engine_args",
        metavar="ARG",
        help=f"further argument for every vLLM engine{where} (repeat, with '=': e.g."
        " --engine-arg=--long-prefill-token-threshold=256)",
    )


def kv_events_args(port: int, *, topic: str = "kv", host: str = "127.0.0.1") -> tuple[str, ...]:
    """Engine arguments that send its KV cache events (ZMQ PUB) to a gateway listening on `host:port`.

    vLLM connects its publisher when the endpoint names a host (it binds only
    wildcards), so the gateway listens: `--kv-events URL=listen:tcp://host:port`
    (`kv_events_endpoint`). It keeps the prefix index confirmed by what the
    engine really stores and evicts.
    """
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://{host}:{port}", "topic": topic}
    return ("--kv-events-config", json.dumps(config))


def kv_events_endpoint(extra_args: Sequence[str]) -> str | None:
    """The gateway's side of an engine's KV events (`listen:tcp://...`), if the engine sends them."""
    args = list(extra_args)
    if "--kv-events-config" not in args:
        return None
    return "listen:" + json.loads(args[args.index("--kv-events-config") + 1])["endpoint"]


def vllm_missing() -> str | None:
    """Why vLLM's OpenAI server cannot be started from this Python, or None if it can.

    Looks for the module's file without importing vLLM (that takes seconds).
    """
    spec = importlib.util.find_spec("vllm")
    places = (spec.submodule_search_locations or []) if spec is not None else []
    if not any(Path(place, "entrypoints", "openai", "api_server.py").is_file() for place in places):
        return f"vLLM is not installed for {sys.executable}: run scripts/install.sh (vLLM for CPU) or pip install vllm"
    return None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct TCP ports that were free a moment ago.

    All sockets stay bound until every port is chosen, so the ports differ from
    each other; another process may still take one before the engine binds it.

    Args:
        count: how many ports.
        host: address to probe.

    Returns:
        `count` distinct port numbers.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port that was free a moment ago (see `free_ports`)."""
    return free_ports(1, host)[0]


class Engine:
    """Handle on one engine subprocess (and its process group).

    Args:
        spec: how to run it.
        log_path: file that receives the engine's stdout and stderr (appended).
        base_env: environment the engine starts from. None passes this
            process's environment through, so the engine finds the same
            interpreter, libraries and temporary directory.
    """

    def __init__(self, spec: EngineSpec, *, log_path: Path, base_env: Mapping[str, str] | None = None) -> None:
        self.spec = spec
        self.log_path = Path(log_path)
        # NOTE: passing the parent's environment through is not configuration:
        # nothing here is decided by what the environment says.
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at: float | None = None
        self.ready_after: float | None = None

    @property
    def url(self) -> str:
        """Base URL of the engine, e.g. `http://127.0.0.1:8001`."""
        return self.spec.url

    @property
    def pid(self) -> int | None:
        """Process id of the API server (also the process group id), once started."""
        return self._proc.pid if self._proc is not None else None

    def __repr__(self) -> str:
        return f"Engine({self.url}, pid={self.pid})"

    def start(self) -> None:
        """Spawn the engine in a new process group; returns at once.

        Raises:
            RuntimeError: if this handle was already started.
        """
        if self._proc is not None:
            raise RuntimeError(f"{self!r} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.spec.argv(),
                env=self.spec.env(self._base_env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._started_at = time.monotonic()

    def returncode(self) -> int | None:
        """Exit status of the API server, or None while it runs (or before start)."""
        return self._proc.poll() if self._proc is not None else None

    def log_tail(self, limit: int = _LOG_TAIL_BYTES) -> str:
        """The last `limit` bytes of the engine's log, decoded leniently."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - limit))
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if self._proc is None:
            raise EngineError(f"{self!r} was never started")
        code = self._proc.poll()
        if code is not None:
            raise EngineError(self._failure(f"exited with status {code}"))

    def _failure(self, what: str) -> str:
        return f"engine at {self.url} {what}; log {self.log_path}:\n{self.log_tail()}"

    def _mark_ready(self) -> float:
        assert self._started_at is not None
        self.ready_after = time.monotonic() - self._started_at
        return self.ready_after

    async def wait_ready(self, timeout: float = 240.0, *, interval: float = 0.5) -> float:
        """Poll `GET /health` until the engine answers 200.

        Args:
            timeout: seconds to wait before giving up.
            interval: seconds between polls.

        Returns:
            Seconds from `start()` until the engine was ready (also kept in
            `ready_after`).

        Raises:
            EngineError: if the engine exits or is not ready within `timeout`.
        """
        deadline = time.monotonic() + timeout
        client_timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=client_timeout) as session:
            while True:
                self._check_alive()
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            return self._mark_ready()
                if time.monotonic() >= deadline:
                    raise EngineError(self._failure(f"not ready after {timeout:.0f} s"))
                await asyncio.sleep(interval)

    def wait_ready_sync(self, timeout: float = 240.0, *, interval: float = 0.5) -> float:
        """Blocking twin of `wait_ready`, for code without an event loop."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return self._mark_ready()
            if time.monotonic() >= deadline:
                raise EngineError(self._failure(f"not ready after {timeout:.0f} s"))
            time.sleep(interval)

    def _group_pids(self) -> list[int]:
        if self._proc is None:
            return []
        pgid = self._proc.pid
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError):
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
        return pids

    def signal(self, signum: int) -> None:
        """Send `signum` to the engine's process group, if any of it still runs.

        The group id is the server's pid; it is only signalled while the server
        is unreaped or a group member is alive, so a recycled pid is never hit.
        """
        if self._proc is None:
            return
        if self._proc.poll() is None or self._group_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signum)

    def memory(self) -> dict[str, int]:
        """Resident memory of the engine's whole process group, from /proc (Linux).

        Returns:
            `{"rss": bytes, "pss": bytes, "processes": n}`: the sum of each
            process's RSS (counts shared pages once per process) and PSS
            (shares them out, so PSS sums to the real footprint).
        """
        totals = {"rss": 0, "pss": 0, "processes": 0}
        for pid in self._group_pids():
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                for line in text.splitlines():
                    key, _, rest = line.partition(":")
                    if key in ("Rss", "Pss"):
                        totals[key.lower()] += int(rest.split()[0]) * 1024
                totals["processes"] += 1
        return totals

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the whole process group: SIGTERM, then SIGKILL after `grace` seconds.

        Safe to call twice and on a handle that never started.

        Args:
            grace: seconds to wait for a clean exit before killing.

        Returns:
            The API server's exit status, or None if it was never started.
        """
        if self._proc is None:
            return None
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self._proc.poll() is not None and not self._group_pids():
                break
            time.sleep(0.1)
        # The engine core or worker may linger after the server exits.
        self.signal(signal.SIGKILL)
        return self._proc.wait()


async def start_engines(engines: Sequence[Engine], *, timeout: float = 240.0) -> list[float]:
    """Start several engines at once and wait until all are ready.

    Args:
        engines: handles not yet started.
        timeout: seconds each may take to become ready.

    Returns:
        Seconds each engine took to become ready, in order.

    Raises:
        EngineError: if any engine fails; then every engine is stopped.
    """
    try:
        for engine in engines:
            engine.start()
        return list(await asyncio.gather(*(engine.wait_ready(timeout) for engine in engines)))
    except BaseException:
        stop_engines(engines, grace=5.0)
        raise


def start_engines_sync(engines: Sequence[Engine], *, timeout: float = 240.0) -> list[float]:
    """Blocking twin of `start_engines`, for fixtures and scripts."""
    return asyncio.run(start_engines(engines, timeout=timeout))


def stop_engines(engines: Iterable[Engine], *, grace: float = 10.0) -> None:
    """SIGTERM every engine first, then wait for each, so they shut down in parallel.

    Args:
        engines: handles, started or not.
        grace: seconds each may take before it is killed.
    """
    engines = list(engines)
    for engine in engines:
        engine.signal(signal.SIGTERM)
    for engine in engines:
        engine.stop(grace)
