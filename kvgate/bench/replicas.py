"""Several replicas of one router behind a round-robin client, as a load balancer runs them.

`RouterGroup` starts `spec.replicas` router processes of the same family and
policy (each a `RouterProcess`, on its own ports and log). For kvgate with
`+state` every replica gets `--state-url URL --state-cluster NAME`, with a
cluster name fresh for the group, so the replicas of one run share routing
state with each other and with nothing else (not an earlier run's placements
on engines whose caches were reset since); the group deletes its keys from
the store when it stops. Without `+state` the replicas are independent, as
SGLang's routers (or kvgate without `--state-url`) run today.

The group offers what the runner and the overhead measurement use of a
single router (`start`, `wait_ready`, `scrape`, `stop`, `url`), plus `urls`
(every replica, for the load generator to spread requests over) and `pids`
(for CPU accounting). Scraped figures are summed over the replicas.

Called by `kvgate.bench.runner` and `kvgate.bench.overhead`; it knows nothing
of workloads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence

import aiohttp

from kvgate.bench.routers import LaunchContext, RouterError, RouterProcess, RouterSpec, file_label
from kvgate.gateways import forget_cluster

#: Where shared-state replicas meet when the benchmark is given no other store.
DEFAULT_STATE_URL = "redis://127.0.0.1:6379/0"


class RouterGroup:
    """`spec.replicas` processes of `spec.single`; shared routing state with `spec.shared_state`.

    Args:
        spec: the router and its replica count.
        ctx: workers and files, as for one router.
        state_url: the store shared-state replicas meet in.
    """

    def __init__(self, spec: RouterSpec, ctx: LaunchContext, *, state_url: str = DEFAULT_STATE_URL) -> None:
        self.spec = spec
        self.state_url = state_url
        self.cluster: str | None = None
        member_ctx = ctx
        if spec.shared_state:
            self.cluster = f"bench-{uuid.uuid4().hex[:12]}"
            extra = ("--state-url", state_url, "--state-cluster", self.cluster)
            member_ctx = dataclasses.replace(ctx, kvgate_args=(*ctx.kvgate_args, *extra))
        label = file_label(spec.name)
        self.members = [
            RouterProcess(spec.single, member_ctx, log_name=label if spec.replicas == 1 else f"{label}-{i}")
            for i in range(spec.replicas)
        ]

    @property
    def urls(self) -> list[str]:
        """Every replica's base URL, in the order requests go round."""
        return [member.url for member in self.members]

    @property
    def url(self) -> str:
        """The first replica's base URL."""
        return self.members[0].url

    @property
    def pids(self) -> list[int]:
        """Process ids of the replicas started so far."""
        return [member.pid for member in self.members if member.pid is not None]

    def start(self) -> None:
        """Spawn every replica; returns at once.

        Raises:
            RouterError: the executable is missing (the replicas already spawned are stopped).
        """
        try:
            for member in self.members:
                member.start()
        except RouterError:
            self.stop()
            raise

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 60.0) -> float:
        """Wait until every replica routes (see `RouterProcess.wait_ready`); seconds until the last was ready.

        Raises:
            RouterError: a replica exited or was not ready in time.
        """
        times = await asyncio.gather(*(member.wait_ready(http, timeout) for member in self.members))
        return max(times)

    async def scrape(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """The replicas' kept figures, summed per series."""
        total: dict[str, float] = {}
        for figures in await asyncio.gather(*(member.scrape(http) for member in self.members)):
            for series, value in figures.items():
                total[series] = total.get(series, 0.0) + value
        return total

    def stop(self, grace: float = 5.0) -> None:
        """Stop every replica, then delete the group's keys from the store. Safe to call twice."""
        for member in self.members:
            member.stop(grace)
        if self.cluster is not None:
            self._forget()

    def _forget(self) -> None:
        """Delete what the replicas left in the store (the stream, the counters)."""
        assert self.cluster is not None
        forget_cluster(self.state_url, self.cluster)


def replica_rows(routers: Sequence[RouterSpec], replicas: int) -> list[RouterSpec]:
    """`routers`, each followed by its groups of `replicas`: kvgate with and without shared state, a peer alone.

    Routers that already are groups stay as they are; repeats are dropped.

    Raises:
        ValueError: `replicas` below 2.
    """
    if replicas < 2:
        raise ValueError("replica groups need at least 2 replicas")
    out: list[RouterSpec] = []
    for spec in routers:
        group = [spec]
        if spec.replicas == 1 and not spec.shared_state:
            if spec.family == "kvgate":
                group.append(spec.with_replicas(replicas, shared_state=True))
            group.append(spec.with_replicas(replicas, shared_state=False))
        out += [g for g in group if g not in out]
    return out


def overhead_rows(gateways: Sequence[RouterSpec]) -> list[RouterSpec]:
    """`gateways`, each kvgate one followed by the same gateway with shared state (`+state`)."""
    out: list[RouterSpec] = []
    for spec in gateways:
        group = [spec]
        if spec.family == "kvgate" and spec.replicas == 1 and not spec.shared_state:
            group.append(spec.with_replicas(1, shared_state=True))
        out += [g for g in group if g not in out]
    return out
