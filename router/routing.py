"""The router: picks a pod for a request and accounts for it until it finishes.

`Router.acquire` prices the candidate pods with a policy, takes the cheapest and
counts the request on it (in flight, queued prefill, predicted prefix blocks)
in one synchronous step, so concurrent arrivals see each other and spread. When
every candidate is at its concurrency limit (`router.concurrency`: adaptive,
following the engine's figures, or fixed at `max_inflight_per_pod`; adaptive
limits hold only users served more than others, `Router.held_to_limit`), the
request waits in the admission queue and is handed a pod as soon as one has a
free slot, smallest VTC counter first: when a lease is released, when a
pod's limit grows (or resets, idle) and when a pod comes up. A pod backing
off as overloaded never holds a waiter: it is passed over only while another
pod has a free slot.
The returned `Lease` must be released exactly once (it is idempotent).

On a fleet larger than `shortlist_above` pods, a policy that offers a
shortlist (`kv-aware`, `least-request`, mixes of them) prices only the pods
holding a prefix of the request and the least loaded ones, kept ordered as
load changes (`router.fleet_order`), so a decision costs tens of pods, not
the fleet; what that keeps exact is stated there. Other policies, and small
fleets, price every eligible pod.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from router.admission import AdmissionQueue, Waiter
from router.concurrency import ConcurrencyLimits, Decision, Step
from router.decisions import DECISIONS_KEPT, DecisionLog, DecisionRecord
from router.errors import NoCapacity
from router.fairness import VirtualTokenCounters
from router.fleet_order import FleetOrder
from router.index import PrefixIndex
from router.metrics import GatewayMetrics
from router.pods import Pod, PodId, PodSet, UserId
from router.policies import Policy
from router.policies.base import RouteRequest
from router.settings import AdmissionSettings
from router.slot_holds import SlotHolds
from router.state.base import RoutingState
from router.state.local import LocalState

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Lease:
    """A request's claim on a pod. Created by `Router`; released by the caller."""

    router: "Router"
    pod: Pod
    request: RouteRequest
    policy_name: str
    uncached_tokens: int
    matched_blocks: int
    decoding: bool = False
    released: bool = False
    sent_at: float = 0.0
    """`time.monotonic()` when the pod was picked (the start of the request's time to first token)."""
    ahead: int = 0
    """Uncached prompt tokens already queued on the pod when it was picked (every replica's): the prefill
    this request's first token waits for besides its own."""

    def first_token(self, timed: bool = True) -> None:
        """The pod answered: its prefill for this request is done.

        Args:
            timed: now is when the pod's first token came (a stream's first chunk), so the
                time since `sent_at` is its TTFT; False for a whole answer, whose first byte
                is its last.
        """
        if self.decoding or self.released:
            return
        if timed:
            # Timed against all the prefill it waited for: the router chose to queue it behind `ahead`.
            self.router.limits.first_token(self.pod, time.monotonic() - self.sent_at, self.ahead + self.uncached_tokens)
        self.decoding = True
        self.pod.pending_prefill -= self.uncached_tokens
        self.pod.decoding += 1
        self.router.state.first_token(self.pod.id, self.uncached_tokens)

    async def finish(self) -> None:
        """The pod's answer is all in: release, and let other replicas know before the client sees the end.

        A client's next request can reach another replica as soon as it has
        this answer; that replica must see the pod free, or it prices the
        pod's finished prefill as still queued and sends the prefix elsewhere.
        """
        self.release()
        await self.router.state.settle()

    def release(self) -> None:
        """Give the slot back (idempotent) and let the next waiter in."""
        if self.released:
            return
        self.released = True
        if self.decoding:
            self.pod.decoding -= 1
        else:
            self.pod.pending_prefill -= self.uncached_tokens
        self.pod.in_flight -= 1
        self.router.state.released(self.pod.id, self.uncached_tokens, self.decoding)
        self.router.metrics.record_release(self.pod.id, self.pod.in_flight)
        self.router.slot_freed(self.request.user, self.pod)


@dataclass(slots=True, eq=False)
class _Ask:
    request: RouteRequest
    policy: Policy
    policy_name: str
    exclude: Collection[PodId]


class Router:
    """Pod selection, accounting and the admission queue.

    Adaptive limits (`router.concurrency`) decide when a pod takes another
    request, never where one goes: every pod under the cap is priced, and a
    request whose cheapest pod is at its limit waits in the queue for a slot
    there. Its cost already counts the work queued on that pod. Sending it
    to the next cheapest instead would recompute its prefix elsewhere (and
    the requests held are those of users served more than the others, whose
    prefixes are the hot ones): measured on `kvgate bench`'s mixed workload,
    before this 22 of 160 grouped requests were sent away from the only pod
    holding their prefix because it was at its limit. Fixed limits
    (`adaptive: false`) are capacities: a pod at one is not priced.

    Args:
        pods: the pod table (shared with discovery and the monitor).
        index: the prefix index.
        counters: VTC counters (shared with the `vtc-basic` policy).
        settings: admission limits.
        metrics: where decisions are counted.
        rng: tie-breaks.
        state: where other gateway replicas hear of each reservation (none by default).
        shortlist_above: fleets larger than this many pods are shortlisted
            (`router.fleet_order`) by policies that can; smaller ones are
            priced whole (default 32: below it a full scan costs under 20 µs
            and breaks ties over every pod).
        decision_log: where every decision is also written (none by default).
    """

    def __init__(
        self,
        pods: PodSet,
        index: PrefixIndex,
        counters: VirtualTokenCounters,
        settings: AdmissionSettings,
        metrics: GatewayMetrics,
        rng: random.Random | None = None,
        state: RoutingState | None = None,
        shortlist_above: int = 32,
        decision_log: DecisionLog | None = None,
    ) -> None:
        self.pods = pods
        self.decision_log = decision_log
        self.fleet = FleetOrder(pods, index.eviction_price)
        self.shortlist_above = shortlist_above
        self.state: RoutingState = state or LocalState()
        self.index = index
        self.counters = counters
        self.settings = settings
        self.metrics = metrics
        self.queue = AdmissionQueue(counters, settings.max_queue)
        self.limits = ConcurrencyLimits(settings, metrics.registry, lambda: list(self.pods))
        """Each pod's concurrency limit; `limit_update` evaluates one after a scrape."""
        self.holds = SlotHolds(settings.hold_for_return_s, self.dispatch_waiting)
        """Slots kept a moment for users whose next request is about to come (`router.slot_holds`)."""
        self._rng = rng or random.Random()
        self.decisions: deque[DecisionRecord] = deque(maxlen=DECISIONS_KEPT)
        """The most recent decisions, for the live dashboard (`router.decisions.decision` reads one)."""
        metrics.watch_users(counters)
        metrics.queue_limit.set(settings.max_queue)

    def candidates(
        self, model: str, exclude: Collection[PodId] = (), limit: int | Callable[[Pod], int] | None = None
    ) -> list[Pod]:
        """Healthy, not ejected pods serving `model` (pods whose models are not yet known count as serving it).

        Args:
            model: the model asked for.
            exclude: pods already tried for this request.
            limit: leave out pods with this many requests in flight (every replica's), or
                with as many as this function of the pod says (`ConcurrencyLimits.limit`).

        Pods backing off as overloaded (`router.outliers`) are left out while another pod can serve.
        """
        cap = (lambda pod: limit) if limit is None or isinstance(limit, int) else limit
        pods = [
            pod
            for pod in self.pods
            if pod.healthy
            and not pod.ejected
            and pod.id not in exclude
            and (not pod.models or model in pod.models)
            and (limit is None or pod.fleet_in_flight < cap(pod))
        ]
        now = time.monotonic()
        rested = [pod for pod in pods if pod.backoff_until <= now]
        return rested or pods

    def serves(self, model: str, exclude: Collection[PodId] = ()) -> bool:
        """Whether any healthy pod serves `model` (stops at the first)."""
        return any(
            pod.healthy and not pod.ejected and pod.id not in exclude and (not pod.models or model in pod.models)
            for pod in self.pods
        )

    def try_acquire(
        self, request: RouteRequest, policy: Policy, policy_name: str, exclude: Collection[PodId] = ()
    ) -> Lease | None:
        """Pick a pod with a free slot and count the request on it, or return None if none has one.

        Side effects: the chosen pod's in-flight and pending-prefill counts grow,
        the prompt's blocks are recorded on it in the prefix index, and the
        user's VTC counter is charged for the prompt.
        """
        started = time.perf_counter()
        user, limits, holds = request.user, self.limits.limit, self.holds
        held: bool | None = None  # whether the request is held to the limits, asked only of a pod at its limit
        # An adaptive limit says when a pod takes more, not where a request is best served: a pod at
        # it is still priced, and if it wins, the request waits for it (see `Router`).
        waits = self.settings.adaptive

        def kept(pod: Pod) -> int:
            """Slots the pod keeps for other users' next requests (`router.slot_holds`)."""
            return holds.held(pod.id, user) if holds else 0

        def limit(pod: Pod) -> int:
            nonlocal held
            slots = kept(pod)
            bound = limits(pod)
            if pod.fleet_in_flight >= bound - slots:
                if held is None:
                    held = self.held_to_limit(request)
                if not held:
                    bound = self.settings.max_inflight_per_pod
            return bound - slots

        def reach(pod: Pod) -> int:
            """What a pod may have in flight to be priced at all: the cap, or with fixed limits the limit."""
            return self.settings.max_inflight_per_pod - kept(pod) if waits else limit(pod)

        shortlist = getattr(policy, "shortlist", None)
        if shortlist is not None and len(self.pods) > self.shortlist_above:
            model = request.model

            now = time.monotonic()

            def eligible(pod: Pod) -> bool:
                return (
                    pod.healthy
                    and not pod.ejected
                    and pod.fleet_in_flight < reach(pod)
                    and pod.id not in exclude
                    and (not pod.models or model in pod.models)
                )

            def rested(pod: Pod) -> bool:
                return pod.backoff_until <= now and eligible(pod)

            self.fleet.sync()
            # Pods backing off as overloaded only when no other pod can take the request.
            pods = shortlist(request, self.fleet, rested) or shortlist(request, self.fleet, eligible)
        else:
            pods = self.candidates(request.model, exclude, reach)
        if not pods:
            return None
        costs = policy.costs(request, pods)
        best = min(range(len(pods)), key=lambda i: (costs[i], pods[i].in_flight, self._rng.random()))
        pod = pods[best]
        if waits and pod.fleet_in_flight >= limit(pod):
            if self.decision_log is not None:
                self.decision_log.write(_record(request, policy_name, pod, pods, costs), waits=True)
            return None  # the best pod is at its limit: wait in the queue for a slot there
        matched = request.matched_blocks.get(pod.id, 0)
        record = _record(request, policy_name, pod, pods, costs)
        self.decisions.append(record)
        if self.decision_log is not None:
            self.decision_log.write(record)
        # Queued prefill work on the pod: tokens it will load from a shared KV cache count at their load ratio.
        uncached = round(request.prefill_work(pod, matched))
        ahead = max(pod.fleet_pending_prefill, 0)
        pod.in_flight += 1
        pod.pending_prefill += uncached
        self.limits.dispatched(pod)
        if request.block_hashes:
            self.index.insert(pod.id, request.block_hashes, reused=matched)
        self.state.reserved(pod.id, request.block_hashes, uncached)
        self.holds.took(request.user, pod.id)
        self.counters.charge(request.user, input_tokens=request.prompt_tokens)
        self.metrics.record_decision(
            pod=pod.id,
            policy=policy_name,
            seconds=time.perf_counter() - started,
            matched_tokens=min(matched * request.block_size, request.prompt_tokens),
            prompt_tokens=request.prompt_tokens,
            in_flight=pod.in_flight,
        )
        return Lease(self, pod, request, policy_name, uncached, matched, sent_at=time.monotonic(), ahead=ahead)

    async def acquire(
        self,
        request: RouteRequest,
        policy: Policy,
        policy_name: str,
        *,
        exclude: Collection[PodId] = (),
        timeout: float | None = None,
    ) -> Lease:
        """Like `try_acquire`, but wait in the admission queue while every pod is full.

        Raises:
            NoCapacity: no healthy pod serves the model, or the wait timed out.
            OverLimit: the admission queue is full.
        """
        if not self.serves(request.model, exclude):
            raise NoCapacity(f"no healthy pod serves model {request.model!r}")
        self.holds.arrived(request.user)
        if not len(self.queue) or (not self.held_to_limit(request) and self.held_to_limit(self.queue.head().payload.request)):
            # Nobody waits, or only users ahead wait (for the limit) and this one is not held to it.
            lease = self.try_acquire(request, policy, policy_name, exclude)
            if lease is not None:
                return lease
        waiter = Waiter(request.user, _Ask(request, policy, policy_name, exclude))
        self.queue.push(waiter)
        self.metrics.queue_length.set(len(self.queue))
        self.dispatch_waiting()
        limit = self.settings.queue_timeout_s if timeout is None else timeout
        queued_at = time.perf_counter()
        # NOTE: asyncio.wait, not wait_for: wait never cancels the future, and a
        # cancellation that races the hand-over still raises here, so the lease
        # handed over in that instant is given back below, never lost.
        try:
            done, _ = await asyncio.wait((waiter.future,), timeout=limit)
        except asyncio.CancelledError:
            self._give_up(waiter)
            raise
        finally:
            self.metrics.admission_wait_seconds.observe(time.perf_counter() - queued_at)
        if not done:
            self._give_up(waiter)
            raise NoCapacity(f"no pod had a free slot within {limit:g}s; retry later")
        return waiter.future.result()

    def _give_up(self, waiter: Waiter) -> None:
        self.queue.remove(waiter)
        self.metrics.queue_length.set(len(self.queue))
        if waiter.future.done() and not waiter.future.cancelled():
            waiter.future.result().release()  # handed a pod just as we gave up
        else:
            waiter.future.cancel()

    def limit_update(self, pod: Pod) -> Decision | None:
        """Evaluate `pod`'s concurrency limit on its fresh figures (the monitor calls this after each scrape).

        Side effects: when the limit grew, waiters are dispatched to the new slots.
        """
        decision = self.limits.update(pod)
        if decision is not None and decision.step is not Step.HOLD:
            log.debug("pod %s limit %s to %d: %s", pod.id, decision.step.value, decision.limit, decision.why)
        if decision is not None and decision.step in (Step.GROW, Step.RESET):
            self.dispatch_waiting()
        return decision

    def held_to_limit(self, request: RouteRequest) -> bool:
        """Whether `request` is held to its pods' concurrency limits (else only to the cap).

        With fixed limits, always. With adaptive ones, only when its user has been served
        more than the least-served active user by more than this request's own cost: holding
        a request at the gateway costs it latency and the engine batching, and pays only when
        a less-served user may overtake it. A user level with the others (or alone) goes to
        the pods, where its requests queue first-come first-served, as they would at the
        gateway; a user ahead waits while the engines are saturated, in VTC order.
        """
        if not self.settings.adaptive:
            return True
        least = self.counters.least_active()
        if least is None:
            return False
        cost = self.counters.cost(input_tokens=request.prompt_tokens, output_tokens=request.max_tokens or 0)
        return self.counters.get(request.user) - least > cost

    def _cap(self, pod: Pod) -> int:
        return self.settings.max_inflight_per_pod

    def forget_pod(self, pod_id: PodId) -> None:
        """The pod left the table: drop its limit and the slots kept on it."""
        self.limits.forget(pod_id)
        self.holds.forget_pod(pod_id)

    def slot_freed(self, user: UserId, pod: Pod) -> None:
        """A request of `user` on `pod` ended: keep the slot a moment for the user's next request
        when it would be served before every waiter (`router.slot_holds`), else hand it to the queue."""
        if self.holds.released(user, pod.id, first=self._goes_first(user)):
            return
        self.dispatch_waiting()

    def _goes_first(self, user: UserId) -> bool:
        """Whether others wait and `user`, with nothing waiting itself, would be served before all of them."""
        if not len(self.queue) or self.queue.depth(user):
            return False
        head = self.queue.head()
        return (self.counters.get(user), user) < (self.counters.get(head.user), head.user)

    def dispatch_waiting(self) -> None:
        """Hand free slots to waiters, smallest VTC counter first. Called when a slot may have freed."""
        while len(self.queue):
            # Under saturation every release frees one slot for one waiter:
            # without this, finding that nobody else fits would try every
            # waiting user on every pod, per release. (Nobody is served before
            # the head: if it cannot fit, nobody after it can.)
            head: _Ask = self.queue.head().payload
            limit = self.limits.limit if self.held_to_limit(head.request) else self._cap
            if not any(pod.healthy and pod.fleet_in_flight < limit(pod) for pod in self.pods):
                break
            for waiter in self.queue.in_order():
                ask: _Ask = waiter.payload
                if waiter.future.done():
                    self.queue.remove(waiter)
                    break
                lease = self.try_acquire(ask.request, ask.policy, ask.policy_name, ask.exclude)
                if lease is not None:
                    self.queue.remove(waiter)
                    waiter.future.set_result(lease)
                    break
            else:
                break  # nobody could be placed
        self.metrics.queue_length.set(len(self.queue))


def _record(request: RouteRequest, policy_name: str, pod: Pod, pods: Sequence[Pod], costs: Sequence[float]) -> DecisionRecord:
    """A decision as `router.decisions` keeps it; in-flight counts as they are now, before the choice counts."""
    return (time.time(), request, policy_name, pod.id, pods, tuple(costs), [p.in_flight for p in pods])
