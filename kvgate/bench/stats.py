"""Small statistics the benchmark reports: percentiles, Jain's fairness index, the VTC floor, spreads.

Pure functions on plain numbers, so each is unit-tested on hand-made inputs.
Called by `kvgate.bench.summary` and `kvgate.bench.overhead`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolating linearly between order statistics.

    The same definition as numpy's default (`linear`): rank `q/100 x (n-1)`
    in the sorted values.

    Args:
        values: the sample; need not be sorted.
        q: percentile in [0, 100].

    Returns:
        The percentile, or NaN for an empty sample.

    Raises:
        ValueError: q outside [0, 100].
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index `(sum x)^2 / (n x sum x^2)`.

    1 when every value is equal, 1/n when one party has everything.

    Args:
        values: non-negative amounts, one per party.

    Returns:
        The index in [1/n, 1]; NaN for no parties; 1 when all are zero
        (nobody got anything, equally).

    Raises:
        ValueError: a negative amount.
    """
    if not values:
        return math.nan
    if any(v < 0 for v in values):
        raise ValueError("Jain's index needs non-negative amounts")
    squares = sum(v * v for v in values)
    if squares == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * squares)


def vtc_light_share_floor(total_service: float, light_users: int, max_request_cost: float) -> float:
    """Least share of service the light users keep under VTC's fairness guarantee.

    VTC (Sheng et al., OSDI'24) bounds the service difference between any two
    continuously backlogged users over any interval by twice the largest cost
    of one request, U. With one heavy user and L light users sharing service
    S, each light user has at least W_heavy - 2U, so the heavy user has at most
    (S + 2LU) / (L + 1) and the light users together at least

        L x (S - 2U) / ((L + 1) x S)

    of the service. It is the fair share L / (L + 1) less the bound's slack.

    Args:
        total_service: S, all users' service in the window (VTC cost units).
        light_users: L.
        max_request_cost: U, the largest `w_in x prompt + w_out x max_tokens` of a request.

    Returns:
        The floor in [0, L / (L + 1)]; 0 when there is no service.
    """
    if total_service <= 0 or light_users <= 0:
        return 0.0
    slack = max(total_service - 2.0 * max_request_cost, 0.0)
    return light_users * slack / ((light_users + 1) * total_service)


@dataclass(frozen=True, slots=True)
class Spread:
    """A figure over repeated runs: the median and the range it came from.

    Attributes:
        median: the median (mean of the middle two for an even count).
        low: the smallest value.
        high: the largest value.
        count: how many values.
    """

    median: float
    low: float
    high: float
    count: int


def spread(values: Sequence[float]) -> Spread | None:
    """The median and min-max range of `values`, NaN left out.

    Args:
        values: one figure per repeat.

    Returns:
        The spread, or None when no value is a number.
    """
    present = sorted(v for v in values if not math.isnan(v))
    if not present:
        return None
    return Spread(median=statistics.median(present), low=present[0], high=present[-1], count=len(present))
