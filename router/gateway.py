"""The gateway's request path: check, tokenise, route, proxy, account.

`Gateway.complete` serves one /v1/completions or /v1/chat/completions call:

1. check the body (`router.schema`), find the user and the policy;
2. tokenise the prompt as the engine will (`router.prompts`), hash its blocks
   and match them against the prefix index;
3. acquire a pod (`router.routing`: policy argmin and in-flight count in one
   step, or a wait in the VTC admission queue);
4. proxy (`router.proxy`); if the pod fails before any byte reached the
   client (unreachable, timed out, a 5xx or 429 answer: a `retryable`
   error), release it and try another pod; every attempt's verdict goes to
   outlier detection (`router.outliers`), which backs off from overloaded
   pods and ejects broken ones; a pod's other error answers reach the client
   OpenAI-shaped (`router.pod_errors`);
5. charge the user's counter for the output and count the outcome.

Background tasks (discovery, the monitor's per-pod loops) run under
`router.supervise`, so none of them can end silently.

Not here: HTTP wiring (`router.app`), health and scraping (`router.monitor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from typing import Any

import aiohttp
from aiohttp import web

from kvcache.keys import BlockHash

from router.body import request_body
from router.decisions import DecisionLog
from router.discovery import Discovery
from router.errors import GatewayError, ModelNotFound, NoCapacity, Unauthorized
from router.fairness import VirtualTokenCounters
from router.fleet_order import IndexOccupancy
from router.index import PrefixIndex
from router.kv_events import KVEventListener, parse_event_sources
from router.load_cost import LoadCostEstimator
from router.metrics import GatewayMetrics
from router.monitor import Monitor
from router.outliers import Outliers, Verdict, verdict_of
from router.pod_errors import is_error, read_error
from router.pods import EngineStats, Pod, PodEndpoint, PodId, PodSet, UserId
from router.policies import PolicyBook, PolicyDeps, RouteRequest
from router.prompts import ByteEncoder, PromptEncoder, tokenize
from router.proxy import Outcome, Proxy
from router.routing import Router
from router.schema import Kind, parse_call
from router.settings import Settings
from router.shared_tier import DECISIONS, FEED_MASKS, SharedCacheUse, SharedTier, TierMetrics
from router.state import FleetView, RoutingState, open_state
from router.supervise import Guard, supervise

log = logging.getLogger(__name__)

STRATEGY_HEADER = "x-routing-strategy"
USER_HEADER = "x-user-id"


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Gateway:
    """Everything one gateway process keeps, wired from `Settings`.

    Args:
        settings: all settings.
        discovery: where pods come from.
        encoder: the model's tokenizer; bytes stand in when None.
        rng: randomness for tie-breaks and random policies (seeded in tests).
        state: routing state shared with other replicas; from `settings.state` when None.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        discovery: Discovery,
        encoder: PromptEncoder | None = None,
        rng: random.Random | None = None,
        state: RoutingState | None = None,
    ) -> None:
        self.settings = settings
        self.discovery = discovery
        self.encoder: PromptEncoder = encoder or ByteEncoder()
        self.rng = rng or random.Random()
        self.pods = PodSet()
        self.index = PrefixIndex(settings.routing.default_capacity_blocks)
        self.counters = VirtualTokenCounters(settings.admission.input_weight, settings.admission.output_weight)
        self.metrics = GatewayMetrics(pods=lambda: list(self.pods))
        self.state: RoutingState = state or open_state(settings.state, self.metrics.registry)
        self.counters.observer = self.state
        # `kvgate serve` has checked at start-up that the file opens (`router.startup.check_settings`).
        log_path = settings.routing.decision_log
        self.decision_log = DecisionLog(log_path) if log_path is not None else None
        self.router = Router(
            self.pods,
            self.index,
            self.counters,
            settings.admission,
            self.metrics,
            self.rng,
            self.state,
            decision_log=self.decision_log,
        )
        self.policies = PolicyBook(PolicyDeps(settings.routing, self.counters, self.rng))
        tier = settings.shared_tier
        self.shared = SharedTier(tier.capacity_blocks, tier.feed)  # type: ignore[arg-type]
        self.shared_use = SharedCacheUse(tier.mode)  # type: ignore[arg-type]
        self.load_cost = LoadCostEstimator(tier.load_ratio_prior)
        self.tier_metrics = TierMetrics(self.metrics.registry)
        self.tier_metrics.load_ratio.set(self.load_cost.ratio)
        self.policies.get(settings.routing.policy)  # fail at start-up on a bad default
        self.outliers = Outliers(self.pods, settings.outliers, self.metrics.registry)
        self.guard = Guard(self.metrics.registry)
        self.session: aiohttp.ClientSession | None = None
        self.monitor: Monitor | None = None
        self.proxy: Proxy | None = None
        self.kv_events: KVEventListener | None = None
        self._discovery_task: asyncio.Task | None = None
        self._discovered_events: dict[PodId, str] = {}
        self.draining = False

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        # Bodies are handed over as sent (a stream is relayed byte for byte), so pods are asked for
        # none compressed: vLLM's restricted metrics page, for one, is gzipped whenever allowed.
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"Accept-Encoding": "identity"},
        )
        self.monitor = Monitor(
            self.pods,
            self.index,
            self.session,
            self.settings.discovery,
            self.settings.scrape,
            self.outliers,
            self.guard,
            on_pod_up=self.router.dispatch_waiting,
            on_scrape=self._scraped,
            on_scraped=self.router.limit_update,
            on_pod_gone=self._pod_gone,
        )
        self.proxy = Proxy(self.session, self.settings.upstream, self.metrics)
        self._discovery_task = asyncio.create_task(
            supervise("discovery", lambda: self.discovery.run(self._pods_changed), self.guard), name="discovery"
        )
        await self.state.start(FleetView(self.pods, self.index, self.counters, self.router.dispatch_waiting))
        sources = parse_event_sources(self.settings.discovery.kv_event_sources)
        if sources:
            self.kv_events = KVEventListener(self.index, sources, lambda: self.block_size, self._stored)
            self.kv_events.start()
        self._choose_feed()

    def _choose_feed(self) -> None:
        """Believe the shared cache holds what the configured feed says; routed prompts when no engine sends events."""
        feed = self.settings.shared_tier.feed
        self.shared.mask = DECISIONS if feed == "events" and self.kv_events is None else FEED_MASKS[feed]

    def _scraped(self, pod: Pod, before: EngineStats, after: EngineStats) -> None:
        """A pod's fresh figures: detect its connector, learn the load cost, count the engine's loads."""
        self.shared_use.scraped(pod.id, after)
        self.load_cost.observe(pod.id, before, after)
        self.tier_metrics.load_ratio.set(self.load_cost.ratio)
        self.tier_metrics.scraped(pod.id, before, after)

    def _stored(self, pod_id: PodId, hashes: list[BlockHash]) -> None:
        """An engine stored blocks: its connector saved them to the shared cache too, unless it has none."""
        pod = self.pods.get(pod_id)
        if pod is not None and not self.shared_use.without(pod):
            self.shared.confirm(hashes)
            self.tier_metrics.blocks.set(len(self.shared))

    def _pods_changed(self, endpoints: frozenset[PodEndpoint]) -> None:
        """Discovery's news: update the pod table and follow the KV events of the pods that publish them."""
        assert self.monitor is not None
        self.monitor.set_pods(endpoints)
        for pod in self.pods:
            self.state.attach(pod)
        publishing = {endpoint.id: endpoint.kv_events for endpoint in endpoints if endpoint.kv_events}
        if publishing and self.kv_events is None:
            self.kv_events = KVEventListener(self.index, {}, lambda: self.block_size, self._stored)
            self.kv_events.start()
            self._choose_feed()
        if self.kv_events is not None:
            for pod in self._discovered_events.keys() - publishing.keys():
                self.kv_events.remove(pod)
            for pod, endpoint in publishing.items():
                self.kv_events.add(pod, endpoint)
        self._discovered_events = publishing

    async def stop(self) -> None:
        await self.state.stop()
        if self._discovery_task is not None:
            self._discovery_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery_task
        if self.kv_events is not None:
            await self.kv_events.stop()
        if self.monitor is not None:
            await self.monitor.stop()
        if self.session is not None:
            await self.session.close()
        if self.decision_log is not None:
            self.decision_log.close()

    @property
    def block_size(self) -> int:
        learned = self.monitor.block_size if self.monitor else None
        return learned or self.settings.routing.block_size

    def ready(self) -> bool:
        return not self.draining and self.state.synced and bool(self.pods.healthy())

    def models(self) -> list[dict[str, Any]]:
        served = self.pods.models()
        out = []
        for model, pods in sorted(served.items()):
            lens = [p.max_model_len for p in pods if p.max_model_len]
            entry: dict[str, Any] = {"id": model, "object": "model", "owned_by": "kvgate", "created": 0}
            if lens:
                entry["max_model_len"] = min(lens)
            out.append(entry)
        return out

    def authenticate(self, request: web.Request) -> None:
        keys = self.settings.server.api_keys
        if keys and _bearer(request) not in keys:
            raise Unauthorized("missing or invalid API key (send 'Authorization: Bearer <key>')")

    def _user(self, call_user: str | None, request: web.Request) -> UserId:
        # NOTE: user ids are shown on /metrics and /dashboard, so an API key
        # standing in for the user is named by a digest, never by itself.
        token = _bearer(request)
        by_key = f"key-{hashlib.sha256(token.encode()).hexdigest()[:12]}" if token else None
        return UserId(call_user or request.headers.get(USER_HEADER) or by_key or "anonymous")

    def _check_model(self, model: str) -> None:
        if self.pods.serves(model):
            return
        known = self.pods.model_names()
        if known:
            raise ModelNotFound(f"model {model!r} is not served here; known: {', '.join(known)}", param="model")
        raise NoCapacity("no pod is up yet; retry shortly")

    def _max_model_len(self, model: str) -> int | None:
        """The longest context a healthy pod serving `model` reports: a longer prompt fits none of them.

        NOTE: the largest, not the smallest (which `/v1/models` advertises):
        one pod configured shorter must not make the gateway refuse what the
        others serve; a prompt routed to it gets that pod's own 400.
        """
        return self.pods.max_model_len(model)

    async def complete(self, kind: Kind, request: web.Request) -> web.StreamResponse:
        """Serve one completion or chat completion call. Raises `GatewayError` for the app to render."""
        arrived = time.perf_counter()
        self.authenticate(request)
        raw = await request_body(request)
        vocab_size = getattr(self.encoder, "vocab_size", None)
        call = parse_call(kind, raw, max_tokens_limit=self.settings.server.max_tokens_limit, vocab_size=vocab_size)
        self._check_model(call.model)
        spec = request.headers.get(STRATEGY_HEADER) or self.settings.routing.policy
        policy = self.policies.get(spec)
        # Metric label: a policy's name, or "mix" (weights from headers would
        # make label values unbounded).
        if spec not in self.policies.names:
            spec = "mix"
        user = self._user(call.user, request)

        block_size = self.block_size
        adapter = call.model if self.pods.is_adapter(call.model) else None
        prompt = await tokenize(self.encoder, call, block_size, lora_name=adapter, max_model_len=self._max_model_len(call.model))
        if prompt.unkeyed is not None:
            self.metrics.unkeyed_prompts.labels(prompt.unkeyed).inc()
        route = RouteRequest(
            user=user,
            model=call.model,
            prompt_tokens=prompt.total_tokens,
            block_size=block_size,
            block_hashes=prompt.block_hashes,
            matched_blocks=self.index.match(prompt.block_hashes),
            occupancy=IndexOccupancy(self.index.eviction_price, self.pods),
            session_key=request.headers.get(self.settings.routing.session_header),
            max_tokens=call.max_tokens,
            tiers=self.shared.match(prompt.block_hashes, prompt.total_tokens, block_size, self.load_cost.ratio, self.shared_use)
            if self.shared_use.active
            else None,
        )
        assert self.proxy is not None and self.monitor is not None
        self.counters.arrive(user)
        tried: set[PodId] = set()
        last_error: GatewayError | None = None
        try:
            for _ in range(self.settings.upstream.retries + 1):
                lease = await self.router.acquire(route, policy, spec, exclude=tried)
                pod = lease.pod
                self._routed(route, lease.pod, lease.matched_blocks)
                outcome: Outcome | None = None
                try:
                    # Other replicas hear of the reservation before the pod sees the request.
                    await self.state.flush()
                    upstream = await self.proxy.open(lease, call, raw, request.headers)
                    if is_error(upstream.status):
                        answer = await read_error(pod.id, upstream)
                        if isinstance(answer, GatewayError):
                            raise answer
                        response, outcome = answer, Outcome(upstream.status)
                    elif call.stream and upstream.status == 200:
                        response, outcome = await self.proxy.relay_stream(lease, call, upstream, request)
                    else:
                        response, outcome = await self.proxy.relay_whole(lease, upstream)
                except GatewayError as exc:
                    if exc.status < 500 and not exc.retryable:
                        raise  # the client's fault, not the pod's
                    verdict = verdict_of(exc)
                    self.outliers.report(pod, verdict)
                    if verdict is Verdict.OVERLOADED:
                        self.router.limits.overloaded(pod)  # the engine itself said it has too many
                    self.metrics.record_outcome(pod.id, spec, exc.status)
                    if not exc.retryable:
                        raise
                    last_error = exc
                    tried.add(pod.id)
                    self.metrics.retries.labels(pod.id).inc()
                    log.info("retrying on another pod: %s", exc.message)
                    continue
                finally:
                    lease.release()
                    if outcome is not None:
                        self._account(user, pod.id, spec, outcome, arrived)
                self.outliers.report(pod, Verdict.BROKEN if outcome.broken else Verdict.OK)
                return response
            assert last_error is not None
            raise last_error
        except NoCapacity:
            if last_error is not None:
                raise last_error from None
            raise
        finally:
            self.counters.leave(user)

    def _pod_gone(self, pod_id: PodId) -> None:
        """The pod left the table: what every part kept of it goes too."""
        self.router.forget_pod(pod_id)
        self.metrics.forget_pod(pod_id)
        self.load_cost.forget(pod_id)
        self.shared_use.forget(pod_id)
        self.tier_metrics.forget(pod_id)

    def _routed(self, route: RouteRequest, pod: Pod, matched: int) -> None:
        """The pod will compute the prompt's blocks and save them; count what each belief expected it to load.

        Recorded from the first request (before any pod is detected as loading), unless the pod is known
        to have no connector.
        """
        if self.shared_use.without(pod):
            return
        if route.tiers is not None and self.shared_use(pod):
            miss = max(route.prompt_tokens - matched * route.block_size, 0)
            self.tier_metrics.routed(pod.id, route.tiers, matched, miss)
        self.shared.predict(route.block_hashes)
        self.tier_metrics.blocks.set(len(self.shared))

    def _account(self, user: UserId, pod: PodId, spec: str, outcome: Outcome, arrived: float) -> None:
        self.metrics.record_outcome(pod, spec, outcome.status)
        if outcome.broken:
            self.metrics.stream_errors.labels(pod).inc()
        if outcome.first_byte_at is not None:
            self.metrics.record_first_byte(spec, outcome.first_byte_at - arrived)
        if outcome.completion_tokens:
            self.counters.charge(user, output_tokens=outcome.completion_tokens)
