"""Cache behaviour of embedding index traces: LRU stack distances, hit-rate curves, Zipf fits."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pandas as pd
from scipy import optimize, special

# Stack distance of a first access to a row: it misses in an LRU cache of any size.
COLD = -1

# Fractions of the distinct-row count at which summarize_trace reports a hit rate.
SUMMARY_CAPACITY_FRACTIONS = (0.01, 0.1, 0.5)

# Search interval for the Zipf exponent; the log-likelihood is concave, so one bounded search
# finds the global maximum (alpha 0 is uniform; beyond ~8 nearly every access is the top row).
ZIPF_ALPHA_BOUNDS = (0.0, 8.0)


def _as_trace(trace) -> np.ndarray:
    """Return the trace as a 1-D int64 array, rejecting other shapes and non-integer values."""
    array = np.asarray(trace)
    if array.ndim != 1:
        raise ValueError(f"trace must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"trace must hold integer row ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _next_and_previous(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the next / previous access to the same row (len(trace) / -1 where none)."""
    length = trace.size
    # A stable sort groups each row's accesses together while keeping them in time order.
    order = np.argsort(trace, kind="stable")
    same_row_as_following = trace[order[:-1]] == trace[order[1:]]
    next_access = np.full(length, length, dtype=np.int64)
    previous_access = np.full(length, -1, dtype=np.int64)
    next_access[order[:-1][same_row_as_following]] = order[1:][same_row_as_following]
    previous_access[order[1:][same_row_as_following]] = order[:-1][same_row_as_following]
    return next_access, previous_access


def stack_distances(trace: np.ndarray) -> np.ndarray:
    """LRU stack distance per access: distinct other rows since its row's last access, else COLD."""
    # Measured once: 1,000,000 accesses over 100,000 rows took 2.3 s (uniform ids) and 2.1 s
    # (Zipf 1.2 ids) on a shared 2-core machine with numpy 2.4.
    #
    # Offline formulation. For access t to a row previously accessed at p (next[p] == t):
    #   distance(t) = #{q in (p, t) : next[q] > t}        (q is the latest access of its row)
    #               = #{q < t : next[q] > t} - #{q <= p : next[q] > t}.
    # The first term counts rows seen before t other than this one: distinct_before(t) - 1.
    # The second is a prefix count over positions [0, p + 1) of next[q] > t, answered by a
    # merge-sort tree: at level k the positions are cut into aligned blocks of 2**k, each block's
    # next[] values are sorted, and the prefix [0, x) is the union of one block per set bit of x.
    # Each level is one vectorized searchsorted over all queries: O(n log^2 n) in numpy.
    trace = _as_trace(trace)
    length = trace.size
    distances = np.full(length, COLD, dtype=np.int64)
    if length == 0:
        return distances
    next_access, previous_access = _next_and_previous(trace)
    is_cold = previous_access < 0
    distinct_before = np.cumsum(is_cold) - is_cold
    warm_times = np.flatnonzero(~is_cold)
    prefix_ends = previous_access[warm_times] + 1
    later_reused = np.zeros(warm_times.size, dtype=np.int64)
    # Key = block * stride + next[q] sorts by block, then by next value within the block, so a
    # single global searchsorted answers "how many in block j have next <= t".
    stride = length + 1
    positions = np.arange(length, dtype=np.int64)
    # Level 0 would only ever look at q == p itself, whose next access is t (never > t): skip it.
    level = 1
    while (1 << level) <= length:
        has_block = ((prefix_ends >> level) & 1).astype(bool)
        if has_block.any():
            keys = np.sort((positions >> level) * stride + next_access)
            blocks = (prefix_ends[has_block] >> level) - 1
            thresholds = warm_times[has_block]
            needles = blocks * stride + thresholds
            # Searching in sorted needle order keeps the binary searches cache-friendly: ~4x
            # faster than searching in time order, even counting the argsort.
            needle_order = np.argsort(needles)
            not_greater = np.empty_like(needles)
            not_greater[needle_order] = np.searchsorted(
                keys, needles[needle_order], side="right"
            )
            later_reused[has_block] += ((blocks + 1) << level) - not_greater
        level += 1
    distances[warm_times] = distinct_before[warm_times] - 1 - later_reused
    return distances


def simulate_lru_hit_rate(trace, capacity_rows: int) -> float:
    """Exact LRU cache simulation (OrderedDict); the slow oracle for tests and validation."""
    trace = _as_trace(trace)
    if trace.size == 0:
        raise ValueError("cannot compute a hit rate of an empty trace")
    if capacity_rows < 0:
        raise ValueError(f"capacity_rows must be >= 0, got {capacity_rows}")
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for row in trace.tolist():
        if row in cache:
            hits += 1
            cache.move_to_end(row)
        elif capacity_rows > 0:
            cache[row] = None
            if len(cache) > capacity_rows:
                cache.popitem(last=False)
    return hits / trace.size


def _hit_rates_from_distances(distances: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Hit rate per capacity given precomputed stack distances (hit iff distance < capacity)."""
    warm_sorted = np.sort(distances[distances != COLD])
    hits = np.searchsorted(warm_sorted, capacities, side="left")
    return hits / distances.size


def _as_capacities(capacities_rows) -> np.ndarray:
    """Validate capacities as a 1-D array of non-negative integers."""
    capacities = np.atleast_1d(np.asarray(capacities_rows))
    if capacities.ndim != 1 or not np.issubdtype(capacities.dtype, np.integer):
        raise ValueError("capacities_rows must be a 1-D sequence of integers")
    if (capacities < 0).any():
        raise ValueError("capacities_rows must be >= 0")
    return capacities.astype(np.int64)


def hit_rate_curve(trace, capacities_rows) -> np.ndarray:
    """LRU hit rate at each capacity from stack distances (a hit iff distance < capacity)."""
    trace = _as_trace(trace)
    if trace.size == 0:
        raise ValueError("cannot compute a hit rate of an empty trace")
    return _hit_rates_from_distances(stack_distances(trace), _as_capacities(capacities_rows))


def _default_capacities(unique_rows: int) -> np.ndarray:
    """Powers of two below the distinct-row count, plus the count (where every reuse hits)."""
    powers = [1 << exponent for exponent in range(max(unique_rows, 1).bit_length())]
    return np.unique(np.array([*powers, max(unique_rows, 1)], dtype=np.int64))


def miss_ratio_curve(trace, row_bytes: int, capacities_rows=None) -> pd.DataFrame:
    """LRU curve: cache_rows, cache_bytes, hit_rate, miss_rate; default rows 1, 2, 4.. distinct."""
    trace = _as_trace(trace)
    if trace.size == 0:
        raise ValueError("cannot compute a miss-ratio curve of an empty trace")
    if row_bytes <= 0:
        raise ValueError(f"row_bytes must be > 0, got {row_bytes}")
    if capacities_rows is None:
        capacities = _default_capacities(np.unique(trace).size)
    else:
        capacities = np.sort(_as_capacities(capacities_rows))
    hit_rates = _hit_rates_from_distances(stack_distances(trace), capacities)
    return pd.DataFrame(
        {
            "cache_rows": capacities,
            "cache_bytes": capacities * int(row_bytes),
            "hit_rate": hit_rates,
            "miss_rate": 1.0 - hit_rates,
        }
    )


def unique_fraction(trace) -> float:
    """Distinct rows divided by accesses (1.0: no reuse at all; near 0: heavy reuse)."""
    trace = _as_trace(trace)
    if trace.size == 0:
        raise ValueError("cannot compute the unique fraction of an empty trace")
    return np.unique(trace).size / trace.size


def fit_zipf_alpha(trace, num_rows: int | None = None) -> float:
    """MLE Zipf exponent of a bounded discrete Zipf fitted to the rank-frequency data."""
    # Model: each access lands on frequency rank r in 1..N with P(r) = r**-alpha / H(N, alpha),
    # where N is num_rows if given (unseen rows count 0) and else the distinct rows observed.
    # With f_r the count of the r-th most frequent row,
    #   log L(alpha) = -alpha * sum_r f_r log r - n log sum_r r**-alpha,
    # which is concave in alpha, so a bounded scalar search (scipy) finds the maximum.
    # Accuracy (3 seeds each, bounded-Zipf traces): with >= 10 accesses per row the error is
    # <= 0.015 for alpha in 0.6..1.5 either way. On sparse samples (1 access per row) leaving
    # N = observed truncates the tail and underestimates (1.05 -> 1.00, 0.6 -> 0.55); passing
    # num_rows overestimates instead (1.05 -> 1.065, 0.6 -> 0.67): ranks come from noisy counts.
    # Returns nan when fewer than two rows leave the exponent undetermined.
    trace = _as_trace(trace)
    if trace.size == 0:
        raise ValueError("cannot fit a Zipf exponent to an empty trace")
    counts = np.sort(np.unique(trace, return_counts=True)[1])[::-1].astype(np.float64)
    if num_rows is not None:
        if num_rows < counts.size:
            raise ValueError(f"num_rows={num_rows} is below the {counts.size} distinct rows seen")
        counts = np.concatenate([counts, np.zeros(num_rows - counts.size)])
    if counts.size < 2:
        return float("nan")
    log_ranks = np.log(np.arange(1, counts.size + 1, dtype=np.float64))
    weighted_log_rank = float(counts @ log_ranks)
    accesses = float(counts.sum())

    def negative_log_likelihood(alpha: float) -> float:
        """Negative log-likelihood of the rank counts under exponent alpha."""
        return alpha * weighted_log_rank + accesses * special.logsumexp(-alpha * log_ranks)

    result = optimize.minimize_scalar(
        negative_log_likelihood, bounds=ZIPF_ALPHA_BOUNDS, method="bounded",
        options={"xatol": 1e-6},
    )
    return float(result.x)


def summarize_trace(trace, row_bytes: int) -> dict:
    """Accesses, distinct rows, unique fraction, Zipf alpha, LRU hit rates at 1/10/50% of rows."""
    trace = _as_trace(trace)
    if trace.size == 0:
        raise ValueError("cannot summarize an empty trace")
    unique_rows = int(np.unique(trace).size)
    capacities = np.array(
        sorted({max(1, round(fraction * unique_rows)) for fraction in SUMMARY_CAPACITY_FRACTIONS}),
        dtype=np.int64,
    )
    hit_rates = _hit_rates_from_distances(stack_distances(trace), capacities)
    return {
        "accesses": int(trace.size),
        "unique_rows": unique_rows,
        "unique_fraction": unique_rows / trace.size,
        "zipf_alpha": fit_zipf_alpha(trace),
        "row_bytes": int(row_bytes),
        # Plain Python types so the summary serializes straight to JSON.
        "hit_rates": [
            {
                "cache_rows": int(capacity),
                "cache_bytes": int(capacity) * int(row_bytes),
                "hit_rate": float(hit_rate),
            }
            for capacity, hit_rate in zip(capacities, hit_rates, strict=True)
        ],
    }


def steady_state_hit_rate(trace, capacity_rows: int) -> float:
    """LRU hit rate of a trace replayed over and over, as a timing loop replays one batch."""
    # After one pass an LRU cache holds the pass's last capacity_rows distinct rows, and a
    # second pass leaves it in that same state: the second pass's hit rate repeats forever.
    trace = _as_trace(trace)
    if trace.size == 0:
        raise ValueError("cannot compute a hit rate of an empty trace")
    capacity = int(_as_capacities([capacity_rows])[0])
    second_pass = stack_distances(np.concatenate([trace, trace]))[trace.size:]
    return float(np.count_nonzero((second_pass != COLD) & (second_pass < capacity)) / trace.size)


def predict_lfu_hit_rate(warmup_trace, eval_trace, capacity_rows: int) -> float:
    """Hit rate on eval_trace of a static LFU cache of the warm-up's most frequent rows."""
    # The cache holds the capacity_rows rows looked up most often during the warm-up (rows it
    # never saw are not cached), ties going to the lower row id, as the TT-Rec cache populates.
    warmup, evaluation = _as_trace(warmup_trace), _as_trace(eval_trace)
    if evaluation.size == 0:
        raise ValueError("cannot compute a hit rate of an empty evaluation trace")
    capacity = int(_as_capacities([capacity_rows])[0])
    rows, counts = np.unique(warmup, return_counts=True)
    # np.unique sorts ids ascending, so a stable sort by falling count breaks ties by lower id.
    cached = rows[np.argsort(-counts, kind="stable")[:capacity]]
    return float(np.isin(evaluation, cached).mean())
