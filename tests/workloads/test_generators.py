"""Seeded input generators: reproducibility, ranges, Zipf skew, pooling lengths, offsets."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_workload
from workloads import generators
from workloads.generators import (dense_features, draw_indices, draw_lengths, make_batch,
                                  table_batch, zipf_ranks)
from workloads.specs import IndexDistribution, PoolingDistribution, SpecError, TableSpec

UNIFORM = IndexDistribution()
ZIPF = IndexDistribution("zipf", 1.2)
VARIABLE = PoolingDistribution("lognormal", 6.0, 0.6)


def _table(rows=5000, distribution=UNIFORM, pooling=VARIABLE) -> TableSpec:
    return TableSpec(rows=rows, dim=4, pooling=pooling, distribution=distribution)


# ---------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("distribution", [UNIFORM, ZIPF], ids=["uniform", "zipf"])
def test_same_seed_same_batch(distribution):
    workload = tiny_workload(pooling=VARIABLE, distribution=distribution, batch_size=50)
    first, second = make_batch(workload, seed=7), make_batch(workload, seed=7)
    np.testing.assert_array_equal(first.dense, second.dense)
    assert len(first.tables) == len(workload.tables)
    for one, two in zip(first.tables, second.tables):
        np.testing.assert_array_equal(one.indices, two.indices)
        np.testing.assert_array_equal(one.offsets, two.offsets)
        np.testing.assert_array_equal(one.weights, two.weights)


@pytest.mark.parametrize("distribution", [UNIFORM, ZIPF], ids=["uniform", "zipf"])
def test_different_seed_or_batch_differs(distribution):
    workload = tiny_workload(rows=(5000, 5000), pooling=VARIABLE, distribution=distribution,
                             batch_size=200)
    base = make_batch(workload, seed=7)
    for other in (make_batch(workload, seed=8), make_batch(workload, seed=7, batch_index=1)):
        assert not np.array_equal(base.dense, other.dense)
        for one, two in zip(base.tables, other.tables):
            assert not np.array_equal(one.lengths, two.lengths)
            count = min(len(one.indices), len(two.indices))
            assert not np.array_equal(one.indices[:count], two.indices[:count])
            assert not np.array_equal(one.weights[:count], two.weights[:count])


def test_tables_get_independent_streams():
    table = _table()
    first = draw_indices(table, 1000, seed=3, table_index=0)
    second = draw_indices(table, 1000, seed=3, table_index=1)
    assert not np.array_equal(first, second)


def test_make_batch_shapes_and_dtypes():
    workload = tiny_workload(batch_size=16)
    batch = make_batch(workload, seed=0)
    assert batch.batch_size == 16
    assert batch.dense.shape == (16, workload.num_dense) and batch.dense.dtype == np.float32
    assert np.all(batch.dense >= 0)  # log(1 + count)
    for table, spec in zip(batch.tables, workload.tables):
        assert table.indices.dtype == np.int64 and table.offsets.dtype == np.int64
        assert table.weights.dtype == np.float32
        assert len(table.offsets) == 16
        assert len(table.indices) == len(table.weights) == 16 * int(spec.pooling.mean)
        assert np.all((table.weights >= 0) & (table.weights < 1))
    assert make_batch(workload, seed=0, batch_size=5).batch_size == 5


def test_dense_features_reproducible():
    np.testing.assert_array_equal(dense_features(6, 10, seed=1), dense_features(6, 10, seed=1))
    assert not np.array_equal(dense_features(6, 10, seed=1), dense_features(6, 10, seed=2))


# ---------------------------------------------------------------- index ranges

@pytest.mark.parametrize("rows", [1, 2, 7, 1000])
@pytest.mark.parametrize("distribution", [UNIFORM, ZIPF, IndexDistribution("zipf", 0.5),
                                          IndexDistribution("zipf", 3.0)],
                         ids=["uniform", "zipf1.2", "zipf0.5", "zipf3"])
def test_indices_in_range(rows, distribution):
    indices = draw_indices(_table(rows, distribution), 20_000, seed=1)
    assert indices.dtype == np.int64
    assert indices.min() >= 0 and indices.max() < rows


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.2, 2.5])
def test_continuous_zipf_path_in_range(monkeypatch, alpha):
    monkeypatch.setattr(generators, "EXACT_ZIPF_MAX_ROWS", 100)
    for rows in (101, 1000, 50_000):
        ranks = zipf_ranks(rows, alpha, 50_000, np.random.default_rng(0))
        assert ranks.min() >= 0 and ranks.max() < rows
        indices = draw_indices(_table(rows, IndexDistribution("zipf", alpha)), 20_000, seed=2)
        assert indices.min() >= 0 and indices.max() < rows


# ---------------------------------------------------------------- Zipf skew

def _rank_frequency(indices: np.ndarray, rows: int) -> np.ndarray:
    return np.sort(np.bincount(indices, minlength=rows))[::-1]


def _fitted_slope(frequencies: np.ndarray, first: int, last: int) -> float:
    ranks = np.arange(first, last + 1)
    slope, _ = np.polyfit(np.log(ranks), np.log(frequencies[first - 1:last]), 1)
    return float(slope)


@pytest.mark.parametrize("continuous", [False, True], ids=["exact-cdf", "continuous"])
def test_zipf_skew_and_slope(monkeypatch, continuous):
    rows, draws, alpha = 50_000, 200_000, 1.2
    if continuous:
        monkeypatch.setattr(generators, "EXACT_ZIPF_MAX_ROWS", rows - 1)
    zipf = draw_indices(_table(rows, IndexDistribution("zipf", alpha)), draws, seed=11)
    uniform = draw_indices(_table(rows, UNIFORM), draws, seed=11)
    zipf_freq, uniform_freq = _rank_frequency(zipf, rows), _rank_frequency(uniform, rows)
    # The hottest row: about 1/H(50000, 1.2) ~ 20% of lookups (~13% on the continuous path),
    # against a few parts in 1e5 for uniform.
    hottest_share = zipf_freq[0] / draws
    assert hottest_share > 0.08
    assert hottest_share > 500 * uniform_freq[0] / draws
    # Frequency against rank is a power law with slope about -alpha.
    slope = _fitted_slope(zipf_freq, 5, 300)
    assert -alpha - 0.3 < slope < -alpha + 0.3
    # Uniform draws have no such decay.
    assert _fitted_slope(uniform_freq, 5, 300) > -0.3


def test_zipf_hot_rows_are_scattered():
    rows = 10_000
    indices = draw_indices(_table(rows, ZIPF), 50_000, seed=5)
    hottest = np.argsort(np.bincount(indices, minlength=rows))[::-1][:20]
    # A seeded shuffle puts the hot ranks all over the table, not at rows 0..19.
    assert hottest.max() > 100
    # The same seed and table scatter them the same way.
    again = draw_indices(_table(rows, ZIPF), 50_000, seed=5)
    np.testing.assert_array_equal(indices, again)


def test_exact_zipf_first_rank_probability():
    rows, alpha, draws = 1000, 1.0, 400_000
    ranks = zipf_ranks(rows, alpha, draws, np.random.default_rng(3))
    harmonic = np.sum(1.0 / np.arange(1, rows + 1))
    expected = np.array([1.0, 0.5, 1 / 3]) / harmonic
    observed = np.bincount(ranks, minlength=rows)[:3] / draws
    np.testing.assert_allclose(observed, expected, rtol=0.05)


# ---------------------------------------------------------------- pooling lengths

@pytest.mark.parametrize("pooling", [
    PoolingDistribution("uniform", 10.0, 4.0),
    PoolingDistribution("normal", 20.0, 5.0),
    PoolingDistribution("lognormal", 8.0, 0.5),
    PoolingDistribution("normal", 5.0, 1.0, maximum=6),
], ids=lambda pooling: pooling.label() + f"/max{pooling.maximum}")
def test_variable_lengths_in_range_with_requested_mean(pooling):
    lengths = draw_lengths(pooling, 20_000, seed=4)
    assert lengths.dtype == np.int64 and lengths.shape == (20_000,)
    assert lengths.min() >= 1 and lengths.max() <= pooling.cap
    assert len(np.unique(lengths)) > 2
    if pooling.maximum == 0:
        assert abs(lengths.mean() - pooling.mean) < 0.08 * pooling.mean
    else:
        assert lengths.max() == pooling.maximum  # the cap binds


def test_wide_spread_is_clipped_to_one_and_cap():
    pooling = PoolingDistribution("normal", 2.0, 10.0)
    lengths = draw_lengths(pooling, 5000, seed=0)
    assert lengths.min() == 1 and lengths.max() == pooling.cap == 8


def test_fixed_lengths():
    lengths = draw_lengths(PoolingDistribution("fixed", 7.0), 100, seed=0)
    assert lengths.tolist() == [7] * 100


@pytest.mark.parametrize("pooling", [PoolingDistribution("fixed", 3.0), VARIABLE])
def test_offsets_are_cumsum_of_lengths(pooling):
    table = _table(pooling=pooling)
    batch = table_batch(table, 300, seed=9)
    lengths = draw_lengths(pooling, 300, seed=9)
    np.testing.assert_array_equal(batch.lengths, lengths)
    assert batch.offsets[0] == 0
    np.testing.assert_array_equal(batch.offsets[1:], np.cumsum(lengths)[:-1])
    assert len(batch.indices) == lengths.sum() == len(batch.weights)
    assert np.all(np.diff(batch.offsets) >= 1)


@pytest.mark.parametrize("kind, mean, spread, maximum", [
    ("fixed", 10.0, 0.0, 4), ("normal", 5.0, 1.0, -2),
])
def test_pooling_maximum_is_validated_or_respected(kind, mean, spread, maximum):
    try:
        pooling = PoolingDistribution(kind, mean, spread, maximum=maximum)
    except SpecError:
        return  # rejecting the inconsistent cap is a fix too
    lengths = draw_lengths(pooling, 10, seed=0)
    assert 1 <= lengths.min() and lengths.max() <= max(pooling.cap, 1)
    assert pooling.cap >= 1
