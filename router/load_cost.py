"""What loading a prompt token from the shared KV cache costs, in tokens computed, learned from the engines.

kv-aware prices a pod's uncached prompt tokens in prefill-token units: a
token computed costs 1, a token loaded from the shared cache costs `ratio`
(`router.shared_tier.TierMatch`). The ratio depends on the hardware, the model
and where the cache nodes are, so it is learned online from what every
engine reports on its /metrics, not set:

- `vllm:request_prefill_time_seconds` (sum and count): seconds from a
  request's scheduling to its first token, which includes the connector's
  synchronous loads;
- `vllm:prompt_tokens_by_source_total{source="local_compute"}`: tokens computed;
- `vllm:external_prefix_cache_hits_total`: tokens loaded by the connector.

Per pod, scrapes are summed into windows; a window closes when the engine is
idle (nothing running or waiting: every request counted in it has also
finished its prefill, so tokens and seconds line up) or once it holds
`window_requests` prefills (the few requests straddling its edges are then
a small error). Each window is one observation of

    prefill seconds = c1 x computed tokens + c2 x loaded tokens

and the coefficients are fitted by least squares with exponential forgetting,
pooled over the fleet, regularised towards the prior (c2 = `prior_ratio` x
c1), so the estimate is defined before any load and moves only as far as
the data says. The ratio is c2 / c1, clamped to
[`MIN_RATIO`, `MAX_RATIO`]. One ratio for the whole fleet: the shortlist's
bound (`router.policies.kv_aware`) needs every pod priced alike.

NOTE: no per-request term. Measured here (scripts/measure_shared_tier.py)
a fit with one put the engines' per-request overhead of a loaded machine
(scheduling, sampling, a forward over a few tokens) at about the whole
time of a request that loads, and the ratio at its floor; whatever window
shapes a workload yields, the overhead and the load cost are hard to tell
apart. Without it the overhead is shared out over both kinds of token,
which only errs towards pricing loads higher.

NOTE: concurrent prefills on one engine share steps, so their prefill times
overlap and the seconds per token come out high; both token kinds are
inflated alike, which the ratio cancels to first order.

Not here: reading /metrics (`router.scrape`), the cost (`router.policies.kv_aware`).
"""

from __future__ import annotations

from dataclasses import dataclass

from router.pods import EngineStats, PodId

#: Bounds of the learned ratio: loading is never free, and never priced above twice a prefill.
MIN_RATIO = 0.01
MAX_RATIO = 2.0
#: Features are scaled to these units so the normal equations stay well conditioned.
_TOKENS = 1000.0


@dataclass(slots=True)
class _Window:
    requests: float = 0.0
    computed: float = 0.0
    loaded: float = 0.0
    seconds: float = 0.0


class LoadCostEstimator:
    """Online fit of prefill seconds on computed and loaded tokens, pooled over pods.

    Args:
        prior_ratio: the ratio before data (and what it is pulled towards).
        prior_weight: strength of the prior, in windows' worth of evidence.
        forget: weight kept by past windows at each new one (0..1; 0.98 is
            a half-life of about 35 windows).
        window_requests: prefills that close a window on a pod never idle.
    """

    def __init__(
        self, prior_ratio: float = 0.1, *, prior_weight: float = 1.0, forget: float = 0.98, window_requests: int = 32
    ) -> None:
        self.prior_ratio = min(max(prior_ratio, MIN_RATIO), MAX_RATIO)
        self._prior_weight = prior_weight
        self._forget = forget
        self._window_requests = window_requests
        self._xx = [[0.0] * 2 for _ in range(2)]
        self._xy = [0.0] * 2
        self._windows: dict[PodId, _Window] = {}
        self._mass = 0.0  # windows fitted, discounted as the sums are
        self.observations = 0
        """Windows fitted so far."""
        self.ratio = self.prior_ratio
        """The current estimate (tokens computed per token loaded)."""

    def observe(self, pod: PodId, before: EngineStats, after: EngineStats) -> None:
        """Add one scrape's deltas to `pod`'s window, and fit it if it closes.

        Counters that went backwards (a restarted engine) discard the window.
        """
        window = self._windows.setdefault(pod, _Window())
        deltas = (
            after.prefill_requests - before.prefill_requests,
            after.computed_tokens - before.computed_tokens,
            after.external_hits - before.external_hits,
            after.prefill_seconds - before.prefill_seconds,
        )
        if min(deltas) < 0:
            self._windows[pod] = _Window()
            return
        window.requests += deltas[0]
        window.computed += deltas[1]
        window.loaded += deltas[2]
        window.seconds += deltas[3]
        idle = after.running == 0 and after.waiting == 0
        if window.requests and (idle or window.requests >= self._window_requests):
            self._fit(window)
            self._windows[pod] = _Window()

    def forget(self, pod: PodId) -> None:
        """Drop `pod`'s open window (it left)."""
        self._windows.pop(pod, None)

    def _fit(self, window: _Window) -> None:
        x = (window.computed / _TOKENS, window.loaded / _TOKENS)
        y = window.seconds
        for i in range(2):
            self._xy[i] = self._forget * self._xy[i] + x[i] * y
            for j in range(2):
                self._xx[i][j] = self._forget * self._xx[i][j] + x[i] * x[j]
        self._mass = self._forget * self._mass + 1.0
        self.observations += 1
        self.ratio = self._solve()

    def _solve(self) -> float:
        """The ratio c2 / c1 of the regularised fit (the prior where the data cannot tell)."""
        (a, b), (_, d) = self._xx
        # Anchor: the fit of seconds on (computed + prior x loaded), one coefficient.
        scale = a + 2 * b * self.prior_ratio + d * self.prior_ratio**2
        guess = (self._xy[0] + self._xy[1] * self.prior_ratio) / scale if scale > 0 else 0.0
        if guess <= 0:
            return self.prior_ratio
        # Ridge towards (guess, prior x guess), as strong as `prior_weight` average windows.
        ridge = [self._prior_weight * max(self._xx[i][i] / max(self._mass, 1.0), 1e-6) for i in range(2)]
        a, d = a + ridge[0], d + ridge[1]
        e = self._xy[0] + ridge[0] * guess
        f = self._xy[1] + ridge[1] * guess * self.prior_ratio
        det = a * d - b * b
        if det <= 0:
            return self.prior_ratio
        c1, c2 = (e * d - b * f) / det, (a * f - b * e) / det
        if c1 <= 0:
            return self.prior_ratio
        return min(max(c2 / c1, MIN_RATIO), MAX_RATIO)
