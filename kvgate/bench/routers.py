"""The routers under test: how each is launched, checked for readiness, scraped and stopped.

A router is named `family:policy`:

- `kvgate:<policy>`: a real `kvgate serve` subprocess with the model's
  tokenizer (`--tokenizer MODEL_DIR`), any policy of `router.policies`, fed
  the engines' KV events (`--kv-events`) as `kvgate up` does, unless told not to;
- `sglang:<policy>`: `sglang-router launch` (`cache_aware`, `round_robin`, ...);
- `vllm-router:<policy>`: `vllm-router` (`cache_aware`, `kv_aware`, ...). Its
  `kv_aware` policy is fed the engines' ZMQ KV events (`--kv-event-source`)
  and asks each engine to render the prompt to tokens
  (`/v1/chat/completions/render`, served with `--enable-scale-out`).

A name may end in `*N` (N replicas, each request sent to the next one in
turn, as a load balancer in front of them does) and, for kvgate, `+state`
(the replicas share routing state through Redis, `--state-url`):
`kvgate:kv-aware*3+state`, `kvgate:kv-aware*3` (three independent replicas),
`sglang:cache_aware*3`, `kvgate:kv-aware+state` (one replica paying the cost
of sharing). `kvgate.bench.replicas` runs such a group.

Every router runs in its own process group on 127.0.0.1, optionally pinned
to CPUs with `taskset`, and is stopped with SIGTERM, then SIGKILL. The peers
(SGLang's router, vllm-router) are test-time dependencies: a missing one is
reported by `missing_executable`, never installed here.

Called by `kvgate.bench.runner` and `kvgate.bench.overhead`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from kvgate.engines import free_ports
from kvgate.model import SERVED_MODEL_NAME

#: Family -> policies accepted by name (kvgate's come from its own registry).
PEER_POLICIES: Mapping[str, tuple[str, ...]] = {
    "sglang": ("cache_aware", "round_robin", "random", "power_of_two"),
    "vllm-router": ("cache_aware", "kv_aware", "round_robin", "random", "power_of_two", "consistent_hash"),
}

#: Routers a full run compares, in report order.
DEFAULT_ROUTERS: tuple[str, ...] = (
    "kvgate:kv-aware",
    "kvgate:prefix-cache",
    "kvgate:least-request",
    "kvgate:round-robin",
    "sglang:cache_aware",
    "sglang:round_robin",
    "vllm-router:cache_aware",
    "vllm-router:kv_aware",
)

#: Gateways measured against the stub engine.
DEFAULT_OVERHEAD_ROUTERS: tuple[str, ...] = ("kvgate:kv-aware", "sglang:cache_aware", "vllm-router:cache_aware")

#: Metric name prefixes worth keeping from each family's own /metrics, per run.
_KEPT_METRICS: Mapping[str, tuple[str, ...]] = {
    "kvgate": (
        "kvgate_predicted_prefix_hit_tokens_total",
        "kvgate_prompt_tokens_total",
        "kvgate_routing_decision_seconds_sum",
        "kvgate_routing_decision_seconds_count",
        "kvgate_time_to_first_byte_seconds_sum",
        "kvgate_time_to_first_byte_seconds_count",
        "kvgate_admission_wait_seconds_sum",
        "kvgate_upstream_retries_total",
        "kvgate_stream_errors_total",
    ),
    "sglang": (),
    "vllm-router": ("vllm_router_kv_placement_lookups_total", "vllm_router_prefix_routing_decisions_total"),
}

_READY_POLL_S = 0.1


class RouterError(RuntimeError):
    """A router could not be started, did not become ready, or is not installed."""


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """A router under test, `family:policy[*replicas][+state][+fixed][@config]`.

    Attributes:
        family: kvgate, sglang or vllm-router.
        policy: the family's routing policy.
        replicas: router processes behind a round-robin client (1: one router).
        shared_state: kvgate replicas share routing state (`--state-url`).
        fixed_admission: kvgate with its per-pod limit fixed at the cap
            (`--no-adaptive-admission`), to compare with the adaptive default.
        config: a kvgate settings file for this row only (`kvgate serve
            --config`, after any `--kvgate-arg`), so settings are compared
            in one run on the same engines: `kvgate:kv-aware@stickier.yaml`.
    """

    family: str
    policy: str
    replicas: int = 1
    shared_state: bool = False
    fixed_admission: bool = False
    config: str | None = None

    @property
    def name(self) -> str:
        """`family:policy`, then `*N` for N replicas, `+state` for shared state, `+fixed`, `@config`."""
        name = f"{self.family}:{self.policy}"
        if self.replicas > 1:
            name += f"*{self.replicas}"
        return name + self._suffix(self.shared_state)

    @property
    def single(self) -> RouterSpec:
        """One replica of this router, without shared state: what each process of a group runs."""
        return RouterSpec(self.family, self.policy, fixed_admission=self.fixed_admission, config=self.config)

    def _suffix(self, shared_state: bool) -> str:
        return (
            ("+state" if shared_state else "")
            + ("+fixed" if self.fixed_admission else "")
            + (f"@{self.config}" if self.config else "")
        )

    def with_replicas(self, replicas: int, *, shared_state: bool) -> RouterSpec:
        """The same router as a group of `replicas` (shared state only for kvgate).

        Raises:
            ValueError: shared state asked of a router other than kvgate, or fewer than one replica.
        """
        return RouterSpec.parse(f"{self.family}:{self.policy}*{replicas}{self._suffix(shared_state)}")

    @classmethod
    def parse(cls, name: str) -> RouterSpec:
        """Parse `family:policy[*N][+state][+fixed][@config]`.

        Raises:
            ValueError: an unknown family or policy, a bad replica count,
                `+state`, `+fixed` or `@config` on a router other than kvgate,
                or a config file that is not there.
        """
        text, at, config = name.strip().partition("@")
        if at and not config:
            raise ValueError(f"router {name!r}: a settings file must follow '@'")
        if config and not Path(config).is_file():
            raise ValueError(f"router {name!r}: no settings file {config}")
        fixed = text.endswith("+fixed")
        if fixed:
            text = text[: -len("+fixed")]
        shared = text.endswith("+state")
        if shared:
            text = text[: -len("+state")]
        replicas = 1
        if "*" in text:
            text, _, count = text.rpartition("*")
            if not count.isdigit() or not 1 <= int(count) <= 64:
                raise ValueError(f"router {name!r}: replicas after '*' must be a number from 1 to 64")
            replicas = int(count)
        family, sep, policy = text.partition(":")
        if not sep or not policy:
            raise ValueError(f"router {name!r} is not family:policy (e.g. kvgate:kv-aware, sglang:cache_aware)")
        if shared and family != "kvgate":
            raise ValueError(f"router {name!r}: only kvgate replicas share state (+state)")
        if fixed and family != "kvgate":
            raise ValueError(f"router {name!r}: only kvgate has adaptive admission to fix (+fixed)")
        if config and family != "kvgate":
            raise ValueError(f"router {name!r}: only kvgate rows take a settings file (@config)")
        if family == "kvgate":
            from router.errors import InvalidRequest
            from router.policies import parse_spec

            try:
                parse_spec(policy)
            except InvalidRequest as exc:
                raise ValueError(f"router {name!r}: {exc.message}") from exc
        elif family in PEER_POLICIES:
            if policy not in PEER_POLICIES[family]:
                raise ValueError(f"router {name!r}: {family} policies are {', '.join(PEER_POLICIES[family])}")
        else:
            raise ValueError(f"router {name!r}: family must be kvgate, sglang or vllm-router")
        return cls(
            family=family,
            policy=policy,
            replicas=replicas,
            shared_state=shared,
            fixed_admission=fixed,
            config=config or None,
        )

    @property
    def needs_kv_events(self) -> bool:
        """Whether the engines must publish KV events for this router."""
        return self.family == "vllm-router" and self.policy == "kv_aware"


@dataclass(frozen=True, slots=True)
class LaunchContext:
    """What every router launch needs besides its spec.

    Attributes:
        worker_urls: the engines (or the stub) behind it.
        model_dir: the model directory (kvgate's `--tokenizer`).
        log_dir: where the router's log goes.
        kv_event_endpoints: engine URL -> ZMQ endpoint, for `kv_aware`.
        block_size: the engines' KV block size, for `kv_aware`.
        kvgate_args: extra `kvgate serve` arguments (e.g. `--config FILE`).
        kvgate_kv_events: give kvgate the engines' KV events (`--kv-events`),
            when the engines publish them, so its prefix index is confirmed.
        cpus: `taskset -c` CPU list to pin the router to; None leaves it free.
    """

    worker_urls: tuple[str, ...]
    model_dir: Path
    log_dir: Path
    kv_event_endpoints: Mapping[str, str] = field(default_factory=dict)
    block_size: int = 128
    kvgate_args: tuple[str, ...] = ()
    kvgate_kv_events: bool = True
    cpus: str | None = None


def _executable(name: str, module: str) -> list[str]:
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-m", module]


#: Peer family -> (console script, Python module, pip package).
_PEERS: Mapping[str, tuple[str, str, str]] = {
    "sglang": ("sglang-router", "sglang_router", "sglang-router"),
    "vllm-router": ("vllm-router", "vllm_router", "vllm-router"),
}


def missing_executable(spec: RouterSpec) -> str | None:
    """Why `spec`'s router cannot run here, or None if it can."""
    import importlib.util

    if spec.family not in _PEERS:
        return None
    script, module, package = _PEERS[spec.family]
    if shutil.which(script) or importlib.util.find_spec(module) is not None:
        return None
    return f"{spec.family} is not installed (pip install {package})"


def command(spec: RouterSpec, ctx: LaunchContext, port: int, metrics_port: int) -> list[str]:
    """The router's command line (without CPU pinning).

    Args:
        spec: which router.
        ctx: workers and files.
        port: HTTP port to serve on.
        metrics_port: Prometheus port for the peers (kvgate serves /metrics on `port`).
    """
    urls = list(ctx.worker_urls)
    if spec.family == "kvgate":
        events = []
        if ctx.kvgate_kv_events:
            for url in urls:
                if url in ctx.kv_event_endpoints:
                    events += ["--kv-events", f"{url}={ctx.kv_event_endpoints[url]}"]
        return [
            sys.executable, "-m", "kvgate", "serve",
            "--worker-urls", *urls,
            "--policy", spec.policy,
            "--host", "127.0.0.1", "--port", str(port),
            "--tokenizer", str(ctx.model_dir),
            "--log-level", "WARNING",
            *events,
            *(["--no-adaptive-admission"] if spec.fixed_admission else []),
            *ctx.kvgate_args,
            *(["--config", spec.config] if spec.config else []),
        ]  # fmt: skip
    if spec.family == "sglang":
        return [
            *_executable("sglang-router", "sglang_router.launch_router"),
            *(["launch"] if shutil.which("sglang-router") else []),
            "--worker-urls", *urls,
            "--policy", spec.policy,
            "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            "--worker-startup-check-interval", "1",
            "--shutdown-grace-period-secs", "1",
            "--log-level", "warn",
        ]  # fmt: skip
    argv = [
        *_executable("vllm-router", "vllm_router.launch_router"),
        "--worker-urls", *urls,
        "--policy", spec.policy,
        "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        "--worker-startup-check-interval", "1",
        "--log-level", "warning",
    ]  # fmt: skip
    if spec.needs_kv_events:
        for url in urls:
            argv += ["--kv-event-source", f"{url}={ctx.kv_event_endpoints[url]}"]
        argv += ["--kv-event-block-size", str(ctx.block_size), "--kv-event-model", SERVED_MODEL_NAME]
    return argv


def file_label(name: str) -> str:
    """A router's name as a file name part: `kvgate:kv-aware*3+state` -> `kvgate-kv-aware-x3-state`.

    A settings file (`@dir/stickier.yaml`) shows as its name without suffix (`-at-stickier`).
    """
    name, at, config = name.partition("@")
    label = name.replace(":", "-").replace("*", "-x").replace("+", "-")
    return label + (f"-at-{Path(config).stem}" if at else "")


class RouterProcess:
    """One router subprocess: start, wait until it routes, scrape, stop.

    Args:
        spec: which router.
        ctx: workers and files.
    """

    def __init__(self, spec: RouterSpec, ctx: LaunchContext, *, log_name: str | None = None) -> None:
        self.spec = spec
        self.ctx = ctx
        self.port, self.metrics_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = ctx.log_dir / f"router-{log_name or file_label(spec.name)}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        """Where the router's own Prometheus metrics are served."""
        if self.spec.family == "kvgate":
            return f"{self.url}/metrics"
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """Process id (and process group id) once started."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Spawn the router in its own process group; returns at once.

        Raises:
            RouterError: its executable is missing.
        """
        reason = missing_executable(self.spec)
        if reason:
            raise RouterError(reason)
        argv = command(self.spec, self.ctx, self.port, self.metrics_port)
        if self.ctx.cpus is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", self.ctx.cpus, *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _log_tail(self, limit: int = 2000) -> str:
        with contextlib.suppress(OSError):
            data = self.log_path.read_bytes()
            return data[-limit:].decode("utf-8", errors="replace")
        return ""

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 60.0) -> float:
        """Poll until the router serves and sees every worker.

        kvgate: `/ready` reports every pod healthy, then two scrape intervals
        pass so it has learnt the engines' KV capacity. Peers: `/readiness`
        answers 200 (they wait for their workers before serving).

        Returns:
            Seconds from start until ready.

        Raises:
            RouterError: it exited or was not ready in time.
        """
        assert self._proc is not None, "start() first"
        started = time.monotonic()
        path = "/ready" if self.spec.family == "kvgate" else "/readiness"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RouterError(f"{self.spec.name} exited with status {code}; log:\n{self._log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                async with http.get(self.url + path, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        if self.spec.family != "kvgate":
                            return time.monotonic() - started
                        body = await response.json()
                        if body.get("healthy_pods") == len(self.ctx.worker_urls):
                            await asyncio.sleep(1.2)
                            return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise RouterError(f"{self.spec.name} not ready after {timeout:.0f} s; log:\n{self._log_tail()}")
            await asyncio.sleep(_READY_POLL_S)

    async def scrape(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """The router's own figures worth keeping (see `_KEPT_METRICS`), by series.

        Returns:
            Series (name with labels) -> value; empty if nothing is kept or
            the router serves no metrics.
        """
        prefixes = _KEPT_METRICS.get(self.spec.family, ())
        if not prefixes:
            return {}
        try:
            async with http.get(self.metrics_url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return {}
        kept: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(prefixes):
                series, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    kept[series] = float(value)
        return kept

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL after `grace` seconds. Safe to call twice.

        Returns:
            The exit status, or None if never started.
        """
        if self._proc is None:
            return None
        if self._proc.poll() is not None:
            return self._proc.returncode
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            return self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            return self._proc.wait()


def parse_routers(names: Sequence[str]) -> list[RouterSpec]:
    """Parse router names, keeping order and dropping repeats.

    Raises:
        ValueError: an unknown family or policy.
    """
    specs: list[RouterSpec] = []
    for name in names:
        spec = RouterSpec.parse(name)
        if spec not in specs:
            specs.append(spec)
    return specs
