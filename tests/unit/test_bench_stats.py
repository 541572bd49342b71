"""Percentiles, Jain's index and the VTC floor the benchmark reports."""

from __future__ import annotations

import math

import pytest

from kvgate.bench.stats import jain_index, percentile, vtc_light_share_floor


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        pytest.param([5.0], 99, 5.0, id="single"),
        pytest.param([1.0, 2.0, 3.0, 4.0, 5.0], 50, 3.0, id="median-odd"),
        pytest.param([4.0, 1.0, 3.0, 2.0], 50, 2.5, id="median-even-unsorted"),
        pytest.param([1.0, 2.0, 3.0, 4.0, 5.0], 0, 1.0, id="min"),
        pytest.param([1.0, 2.0, 3.0, 4.0, 5.0], 100, 5.0, id="max"),
        pytest.param([1.0, 2.0, 3.0, 4.0, 5.0], 90, 4.6, id="interpolated"),
        pytest.param(list(range(1, 101)), 99, 99.01, id="p99-of-100"),
    ],
)
def test_percentile_interpolates_linearly(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_matches_numpy_definition_on_a_ragged_sample():
    sample = [0.3, 9.1, 4.4, 4.4, 7.0, 0.1, 2.2]
    # numpy.percentile(sample, 90) with the default linear method.
    assert percentile(sample, 90) == pytest.approx(7.84)


def test_percentile_of_nothing_is_nan_and_bad_q_is_refused():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([3.0, 3.0, 3.0], 1.0, id="equal"),
        pytest.param([1.0, 0.0, 0.0, 0.0], 0.25, id="one-takes-all"),
        pytest.param([12.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], 576 / 1176, id="heavy-and-six-light"),
        pytest.param([1.0, 2.0], 9 / 10, id="two"),
        pytest.param([0.0, 0.0], 1.0, id="nobody-served"),
    ],
)
def test_jain_index(values, expected):
    assert jain_index(values) == pytest.approx(expected)


def test_jain_index_is_scale_free_and_refuses_negatives():
    assert jain_index([1.0, 2.0, 3.0]) == pytest.approx(jain_index([10.0, 20.0, 30.0]))
    assert math.isnan(jain_index([]))
    with pytest.raises(ValueError):
        jain_index([1.0, -1.0])


def test_vtc_floor_is_the_fair_share_less_the_slack_of_two_requests():
    # 6 light users, service 10,000, largest request costs 500: each light user keeps at
    # least W_heavy - 1,000, so the heavy user has at most (10,000 + 6,000) / 7.
    floor = vtc_light_share_floor(10_000.0, 6, 500.0)

    assert floor == pytest.approx(6 * 9_000 / (7 * 10_000))
    assert floor < 6 / 7
    assert 1 - floor == pytest.approx((10_000 + 2 * 6 * 500) / 7 / 10_000)


@pytest.mark.parametrize(
    ("total", "light", "cost", "expected"),
    [
        pytest.param(0.0, 6, 500.0, 0.0, id="no-service"),
        pytest.param(100.0, 6, 500.0, 0.0, id="window-shorter-than-one-request"),
        pytest.param(1e12, 3, 1.0, 0.75, id="long-window-tends-to-fair"),
        pytest.param(100.0, 0, 1.0, 0.0, id="no-light-users"),
    ],
)
def test_vtc_floor_edges(total, light, cost, expected):
    assert vtc_light_share_floor(total, light, cost) == pytest.approx(expected)
