"""Tests for LRU stack distances, hit-rate curves and trace statistics in workloads.reuse."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from workloads.reuse import (
    COLD,
    fit_zipf_alpha,
    hit_rate_curve,
    miss_ratio_curve,
    simulate_lru_hit_rate,
    stack_distances,
    summarize_trace,
    unique_fraction,
)


def naive_stack_distances(trace) -> list[int]:
    """Quadratic oracle: count the distinct rows strictly between consecutive accesses."""
    trace = list(trace)
    distances = []
    for time, row in enumerate(trace):
        earlier = [position for position in range(time) if trace[position] == row]
        if not earlier:
            distances.append(COLD)
        else:
            distances.append(len(set(trace[earlier[-1] + 1 : time])))
    return distances


def lru_stack_positions(trace) -> list[int]:
    """Independent oracle: the row's index in an explicit most-recent-first LRU list."""
    stack: list[int] = []
    positions = []
    for row in trace:
        if row in stack:
            positions.append(stack.index(row))
            stack.remove(row)
        else:
            positions.append(COLD)
        stack.insert(0, row)
    return positions


def bounded_zipf_trace(alpha: float, num_rows: int, length: int, seed: int) -> np.ndarray:
    """Bounded discrete Zipf trace by inverse CDF over ranks, ranks mapped to shuffled row ids."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, num_rows + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights) / weights.sum()
    ranks = np.minimum(np.searchsorted(cdf, rng.random(length), side="right"), num_rows - 1)
    return rng.permutation(num_rows)[ranks]


def random_small_traces(count: int, seed: int):
    """Seeded variety of small traces: tiny alphabets, all-distinct, one row, Zipf-skewed."""
    rng = np.random.default_rng(seed)
    for case in range(count):
        length = int(rng.integers(0, 70))
        kind = case % 4
        if kind == 0:
            yield rng.integers(0, int(rng.integers(1, 4)), length)  # tiny alphabet
        elif kind == 1:
            yield rng.integers(0, int(rng.integers(1, 40)), length)
        elif kind == 2:
            yield rng.permutation(1000)[:length]  # all distinct
        else:
            yield np.minimum(rng.zipf(1.3, length), 50)


def test_stack_distances_match_naive_on_random_small_traces():
    """The vectorized algorithm agrees with the quadratic oracle on 400 varied traces."""
    checked = 0
    for trace in random_small_traces(400, seed=7):
        assert stack_distances(trace).tolist() == naive_stack_distances(trace.tolist())
        checked += 1
    assert checked == 400


@pytest.mark.parametrize("length", [1, 2, 3, 31, 32, 33, 64, 65, 127, 128, 129, 1000])
def test_stack_distances_match_lru_positions_at_power_of_two_edges(length):
    """Lengths around powers of two exercise partial merge-sort-tree blocks."""
    rng = np.random.default_rng(length)
    trace = rng.integers(0, max(2, length // 4), length)
    assert stack_distances(trace).tolist() == lru_stack_positions(trace.tolist())


def test_stack_distances_match_lru_positions_on_medium_zipf_trace():
    """A 4,000-access skewed trace over 300 rows matches an explicit LRU list per access."""
    trace = bounded_zipf_trace(1.0, num_rows=300, length=4000, seed=3)
    assert stack_distances(trace).tolist() == lru_stack_positions(trace.tolist())


def test_stack_distances_known_examples():
    """Hand-checked distances for cyclic, repeated and alternating patterns."""
    assert stack_distances(np.array([1, 2, 3, 1, 2, 3, 3])).tolist() == [
        COLD, COLD, COLD, 2, 2, 2, 0,
    ]
    assert stack_distances(np.array([5, 5, 5, 5])).tolist() == [COLD, 0, 0, 0]
    assert stack_distances(np.array([0, 1, 0, 1, 0])).tolist() == [COLD, COLD, 1, 1, 1]
    assert stack_distances(np.arange(10)).tolist() == [COLD] * 10
    # Repeats between two accesses count once: rows 7 and 8 are the only distinct others.
    assert stack_distances(np.array([4, 7, 7, 8, 7, 4])).tolist()[-1] == 2


def test_stack_distances_are_label_independent():
    """Arbitrary ids (huge, negative) give the same distances as their dense relabeling."""
    rng = np.random.default_rng(11)
    dense = rng.integers(0, 20, 500)
    labels = np.array([-5, 10**15, 3, 2**62, -(2**40), *range(100, 115)], dtype=np.int64)
    assert stack_distances(labels[dense]).tolist() == stack_distances(dense).tolist()


def test_stack_distances_empty_and_dtype():
    """Empty input gives an empty int64 array; other integer dtypes are accepted."""
    empty = stack_distances(np.array([], dtype=np.int64))
    assert empty.shape == (0,) and empty.dtype == np.int64
    small = stack_distances(np.array([3, 1, 3], dtype=np.uint8))
    assert small.dtype == np.int64 and small.tolist() == [COLD, COLD, 1]


def test_stack_distances_reject_bad_input():
    """2-D or non-integer traces are rejected instead of silently flattened or truncated."""
    with pytest.raises(ValueError, match="1-D"):
        stack_distances(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        stack_distances(np.array([1.0, 2.5]))


def test_simulate_lru_hit_rate_hand_checked():
    """The oracle itself: cycling 3 rows misses in a 2-row LRU cache but hits in a 3-row one."""
    cycle = np.array([0, 1, 2] * 4)
    assert simulate_lru_hit_rate(cycle, 2) == 0.0
    assert simulate_lru_hit_rate(cycle, 3) == pytest.approx(9 / 12)
    assert simulate_lru_hit_rate(cycle, 0) == 0.0
    assert simulate_lru_hit_rate(np.array([4, 4, 4, 4]), 1) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        simulate_lru_hit_rate(np.array([], dtype=np.int64), 1)


@pytest.mark.parametrize(
    "trace",
    [
        np.random.default_rng(1).integers(0, 200, 3000),
        bounded_zipf_trace(1.05, num_rows=2000, length=5000, seed=2),
        np.minimum(np.random.default_rng(3).zipf(1.2, 5000), 3000),
        np.random.default_rng(4).integers(0, 3, 500),
    ],
    ids=["uniform", "bounded-zipf-1.05", "numpy-zipf-1.2", "tiny-alphabet"],
)
def test_hit_rate_curve_equals_exact_lru_simulation(trace):
    """Predicted hit rates equal the OrderedDict simulation exactly at every tested capacity."""
    unique_rows = np.unique(trace).size
    capacities = sorted({0, 1, 2, 3, 5, 8, 13, 50, 100, unique_rows - 1, unique_rows,
                         unique_rows + 7})
    capacities = [capacity for capacity in capacities if capacity >= 0]
    predicted = hit_rate_curve(trace, capacities)
    simulated = [simulate_lru_hit_rate(trace, capacity) for capacity in capacities]
    assert predicted.tolist() == simulated
    # At full size every access but the first to each row hits.
    assert predicted[-1] == pytest.approx(1 - unique_rows / trace.size)


def test_hit_rate_curve_rejects_bad_capacities():
    """Negative or non-integer capacities are errors, not silent zero hit rates."""
    trace = np.array([1, 2, 1])
    with pytest.raises(ValueError):
        hit_rate_curve(trace, [-1])
    with pytest.raises(ValueError):
        hit_rate_curve(trace, [1.5])


def test_miss_ratio_curve_default_capacities_and_columns():
    """Default rows are 1, 2, 4, .. plus the distinct count; bytes scale; hit rate is monotone."""
    trace = bounded_zipf_trace(1.1, num_rows=100, length=3000, seed=5)
    unique_rows = np.unique(trace).size
    curve = miss_ratio_curve(trace, row_bytes=256)
    assert isinstance(curve, pd.DataFrame)
    assert list(curve.columns) == ["cache_rows", "cache_bytes", "hit_rate", "miss_rate"]
    rows = curve["cache_rows"].tolist()
    expected_rows = sorted({2**power for power in range(20) if 2**power < unique_rows}
                           | {unique_rows})
    assert rows == expected_rows
    assert (curve["cache_bytes"] == curve["cache_rows"] * 256).all()
    assert np.all(np.diff(curve["hit_rate"]) >= 0)
    assert np.allclose(curve["hit_rate"] + curve["miss_rate"], 1.0)
    assert curve["hit_rate"].iloc[-1] == pytest.approx(1 - unique_rows / trace.size)
    # Each point agrees with the exact simulation.
    for capacity, hit_rate in zip(curve["cache_rows"], curve["hit_rate"], strict=True):
        assert hit_rate == simulate_lru_hit_rate(trace, int(capacity))


def test_miss_ratio_curve_custom_capacities_are_sorted():
    """Explicit capacities come back sorted, with miss rate non-increasing."""
    trace = np.random.default_rng(6).integers(0, 50, 1000)
    curve = miss_ratio_curve(trace, row_bytes=4, capacities_rows=[40, 0, 10])
    assert curve["cache_rows"].tolist() == [0, 10, 40]
    assert curve["cache_bytes"].tolist() == [0, 40, 160]
    assert curve["miss_rate"].iloc[0] == 1.0
    assert np.all(np.diff(curve["miss_rate"]) <= 0)
    with pytest.raises(ValueError):
        miss_ratio_curve(trace, row_bytes=0)


def test_unique_fraction():
    """Distinct rows over accesses, at both extremes and in between."""
    assert unique_fraction(np.array([1, 1, 2, 3])) == 0.75
    assert unique_fraction(np.arange(17)) == 1.0
    assert unique_fraction(np.zeros(8, dtype=np.int64)) == 1 / 8
    with pytest.raises(ValueError):
        unique_fraction(np.array([], dtype=np.int64))


@pytest.mark.parametrize("alpha", [1.05, 1.2])
def test_fit_zipf_alpha_recovers_exponent(alpha):
    """MLE recovers the generating exponent within 0.1, with or without the table size."""
    trace = bounded_zipf_trace(alpha, num_rows=2000, length=60_000, seed=int(alpha * 100))
    assert abs(fit_zipf_alpha(trace) - alpha) < 0.1
    assert abs(fit_zipf_alpha(trace, num_rows=2000) - alpha) < 0.1


def test_fit_zipf_alpha_distinguishes_skews_and_edge_cases():
    """Uniform traces fit near 0, steeper skew fits higher, one row is undetermined (nan)."""
    uniform = np.random.default_rng(8).integers(0, 100, 50_000)
    assert fit_zipf_alpha(uniform) < 0.1
    assert fit_zipf_alpha(bounded_zipf_trace(0.8, 500, 20_000, seed=9)) < fit_zipf_alpha(
        bounded_zipf_trace(1.4, 500, 20_000, seed=9)
    )
    assert math.isnan(fit_zipf_alpha(np.array([3, 3, 3])))
    with pytest.raises(ValueError):
        fit_zipf_alpha(np.array([1, 2, 3]), num_rows=2)


def test_summarize_trace_is_consistent_and_json_ready():
    """The summary repeats the individual statistics and serializes to JSON."""
    trace = bounded_zipf_trace(1.1, num_rows=1000, length=20_000, seed=10)
    summary = summarize_trace(trace, row_bytes=128)
    unique_rows = np.unique(trace).size
    assert summary["accesses"] == 20_000
    assert summary["unique_rows"] == unique_rows
    assert summary["unique_fraction"] == unique_fraction(trace)
    assert summary["zipf_alpha"] == fit_zipf_alpha(trace)
    capacities = [entry["cache_rows"] for entry in summary["hit_rates"]]
    assert capacities == [round(fraction * unique_rows) for fraction in (0.01, 0.1, 0.5)]
    for entry in summary["hit_rates"]:
        assert entry["cache_bytes"] == entry["cache_rows"] * 128
        assert entry["hit_rate"] == simulate_lru_hit_rate(trace, entry["cache_rows"])
    assert json.loads(json.dumps(summary)) == summary
