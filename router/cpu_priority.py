"""Ask the kernel to run the gateway ahead of the compute-bound processes beside it.

The gateway is on the path of every request's first token and needs little
CPU (a few ms per request), but it runs its whole data path on one event
loop: each time that loop's thread wakes (a request arrives, an engine's
first token comes back) it has to wait for a core. Beside vLLM CPU engines,
which keep every core busy, that wait is part of the gateway's added latency.
Measured on `kvgate bench` (3 engines on 2 cores): at normal priority the
gateway's threads waited for a core 112 to 146 ms per request, for 7 to 9
ms of running, and its loop was more than 5 ms late on a fifth of 10 ms
ticks (127 ms at the 99th percentile); under `SCHED_RR` they waited 3 to 15
ms, and the client's TTFT came 5 to 42 ms closer to the engines' own (four
runs, each beside the other row and SGLang's router; "Where the router's
added time goes" in docs/bench/studies.md).

So `kvgate serve`, once its start-up checks pass, asks for the thread that
runs the event loop what `server.cpu_priority` names:

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
container); without it `kvgate serve` runs as started and says so once.
Nothing short of real-time removes the waits: with `kvgate up` (3 engines,
2 cores) the loop's thread waited 48 to 51 ms per request at normal
priority, 46 to 70 with every engine thread at nice 10, 35 with them all
under `SCHED_IDLE`, 42 with a 0.1 ms time slice asked for the loop
(`sched_setattr`), and 0.05 under `SCHED_RR`; so no unprivileged fallback
is taken. Where the gateway has cores of its own (its own Kubernetes pod
with whole CPUs under the static CPU manager) none of this changes anything.
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

    A refused `realtime` falls back to `high`, a refused `high` to `normal`;
    the caller says what a refusal means where it runs.
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
        log.info("nice %d refused (%s)", HIGH_NICE, exc)
        return "normal"
