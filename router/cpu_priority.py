"""Ask the kernel to run the gateway ahead of the compute-bound processes beside it.

The gateway is on the path of every request's first token and needs little
CPU (a few ms per request), but it runs its whole data path on one event
loop: each time that loop's thread wakes (a request arrives, an engine's
first token comes back) it has to wait for a core. Beside vLLM CPU engines,
which keep every core busy, that wait is the gateway's added latency. Measured
on `kvgate bench` (3 engines on 2 cores, mixed and shared-prefix workloads,
one run, every router beside the others): at normal priority the gateway's
thread waited for a core about 50% of the time it was runnable (its event
loop fell 0.1 to 1.2 s behind 176 times in 75 s), and the client's TTFT was
193 and 198 ms above the engines' own, against 64 and 94 ms through SGLang's
router (whose worker threads wait in parallel); at nice -10, 172 and 151 ms;
with the real-time round-robin policy, 79 and 74 ms, and the waits were gone
(0.2 ms per request).

So `kvgate serve` asks, for the thread that runs the event loop and before
any other thread starts, for what `server.cpu_priority` names:

- `realtime` (default): `SCHED_RR` at the lowest real-time priority (1), so
  the waking event loop runs before any normal process. With
  `SCHED_RESET_ON_FORK`: the threads and processes it starts (DNS lookups,
  tokenising very long prompts) run at normal priority, so bulk work never
  holds a core from the engines. The kernel still keeps 5% of each second
  for normal processes (`sched_rt_runtime_us`).
- `high`: nice -10, inherited by the threads started later (what a
  `realtime` that is refused falls back to).
- `normal`: leave the scheduling as started.

Raising either needs `CAP_SYS_NICE` (root, or the capability granted to the
container); without it the gateway runs as started and says so once. Where
the gateway has cores of its own (its own Kubernetes pod with whole CPUs
under the static CPU manager) none of this changes anything.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: The values `server.cpu_priority` takes.
PRIORITIES = ("realtime", "high", "normal")
#: The nice value `high` asks for.
HIGH_NICE = -10


def raise_priority(wanted: str) -> str:
    """Apply `wanted` (one of `PRIORITIES`) to the calling thread; return what applied.

    A refused `realtime` falls back to `high`, a refused `high` to `normal`.
    """
    if wanted not in PRIORITIES:
        raise ValueError(f"cpu priority must be one of {', '.join(PRIORITIES)}, got {wanted!r}")
    if wanted == "normal":
        return "normal"
    if wanted == "realtime":
        try:
            policy = os.SCHED_RR | os.SCHED_RESET_ON_FORK
            os.sched_setscheduler(0, policy, os.sched_param(os.sched_get_priority_min(os.SCHED_RR)))
            return "realtime"
        except (AttributeError, OSError) as exc:  # no such policy here, or not permitted
            log.info("real-time scheduling refused (%s); asking for nice %d", exc, HIGH_NICE)
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > HIGH_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, HIGH_NICE)
        return "high"
    except (AttributeError, OSError) as exc:
        log.warning(
            "the gateway runs at normal CPU priority (%s): beside busy engines on the same host, "
            "its added latency grows (grant CAP_SYS_NICE, or set server.cpu_priority: normal to silence this)",
            exc,
        )
        return "normal"
