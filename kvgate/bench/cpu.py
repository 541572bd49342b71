"""CPU accounting from /proc: who used the machine's cores while a run was replayed.

On a small shared machine a run is only as good as the CPU it got. Sampling,
before and after each replay, the machine's busy time (`/proc/stat`), the
engines' process groups, the router process and this process tells how much
of the cores went to the router and how much to work outside the benchmark
altogether (`CpuUse.others_share`): a run where others took a large share is
noise, not a result.

The router's run-queue wait (`/proc/<pid>/task/*/schedstat`: time its threads
were ready to run but had no core) is sampled too. When the engines keep the
cores busy, every wake-up of the router (a request, a chunk, a KV event, a
scrape) may wait for a core before it is handled, and that wait is part of
the client's TTFT the router adds, whatever its own CPU time.

Linux only; elsewhere every figure is None. Called by `kvgate.bench.runner`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: /proc/stat columns counted as busy: user, nice, system, irq, softirq, steal.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def _ticks_per_second() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def machine_busy_seconds() -> float | None:
    """Busy CPU seconds of all cores since boot, or None without /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return sum(int(first[1 + i]) for i in _BUSY_COLUMNS) / _ticks_per_second()
    except (OSError, ValueError, IndexError):
        return None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # fields from `state` on (the name may hold spaces)


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of one process (all its threads), or None if unknown."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    try:
        return (int(fields[11]) + int(fields[12])) / _ticks_per_second()
    except (ValueError, IndexError):
        return None


def process_wait_seconds(pid: int) -> float | None:
    """Seconds the threads of one process were runnable but not running (run-queue wait), or None if unknown.

    Threads that ended since are not counted: a difference of two samples
    is a lower bound.
    """
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended, or the kernel keeps no schedstats
    return total / 1e9


def group_cpu_seconds(pgids: Iterable[int]) -> float | None:
    """CPU seconds of the live processes of the given process groups, or None without /proc."""
    wanted = set(pgids)
    if not wanted:
        return 0.0
    try:
        entries = [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    except OSError:
        return None
    total = 0.0
    for entry in entries:
        fields = _stat_fields(int(entry.name))
        try:
            if fields is not None and int(fields[2]) in wanted:
                total += (int(fields[11]) + int(fields[12])) / _ticks_per_second()
        except (ValueError, IndexError):
            continue
    return total


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Cumulative CPU seconds at one moment."""

    at: float
    machine: float | None
    engines: float | None
    router: float | None
    bench: float
    router_wait: float | None = None


def sample(engine_pgids: Iterable[int], router_pid: int | Iterable[int] | None) -> CpuSample:
    """Sample the machine, the engines' process groups, the router (its replicas, summed) and this process."""
    times = os.times()
    pids = [router_pid] if isinstance(router_pid, int) else list(router_pid or ())
    return CpuSample(
        at=time.monotonic(),
        machine=machine_busy_seconds(),
        engines=group_cpu_seconds(engine_pgids),
        router=_summed(process_cpu_seconds, pids),
        bench=times.user + times.system,
        router_wait=_summed(process_wait_seconds, pids),
    )


def _summed(read: Callable[[int], float | None], pids: Sequence[int]) -> float | None:
    """`read` summed over the router's processes (its replicas); None if any is unknown."""
    values = [read(pid) for pid in pids]
    return None if not values or None in values else sum(v for v in values if v is not None)


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU used between two samples.

    Attributes:
        wall_s: seconds between the samples.
        router_s: CPU seconds of the router process.
        router_wait_s: seconds the router's threads waited for a core
            (None where the kernel keeps no schedstats).
        engines_s: CPU seconds of the engines' processes.
        others_share: share of all cores' time that went to processes outside
            the benchmark (not the engines, the router or this process).
        load_average: the 1-minute load average at the end.
    """

    wall_s: float
    router_s: float | None
    engines_s: float | None
    others_share: float | None
    load_average: float | None
    router_wait_s: float | None = None


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def between(before: CpuSample, after: CpuSample) -> CpuUse:
    """What was used from `before` to `after`."""
    wall = after.at - before.at
    machine = _delta(after.machine, before.machine)
    engines = _delta(after.engines, before.engines)
    router = _delta(after.router, before.router)
    others = None
    if machine is not None and engines is not None and wall > 0:
        ours = engines + (router or 0.0) + (after.bench - before.bench)
        others = max(machine - ours, 0.0) / (wall * (os.cpu_count() or 1))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return CpuUse(
        wall_s=wall,
        router_s=router,
        engines_s=engines,
        others_share=others,
        load_average=load,
        router_wait_s=_delta(after.router_wait, before.router_wait),
    )
