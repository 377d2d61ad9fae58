"""Seeded input generators: row ids, bag lengths, per-sample weights and dense features."""

from __future__ import annotations

import functools
import os

import numpy as np

from workloads.batches import Batch, TableBatch, stream  # noqa: F401 (re-exported)
from workloads.specs import IndexDistribution, PoolingDistribution, TableSpec, WorkloadSpec
from workloads.traces import load_trace, trace_for_hit_rate, trace_from_reuse_distances

# Above this many rows the exact discrete Zipf CDF (8 bytes a row) is replaced by the
# continuous bounded power-law inverse CDF, which differs only in the first few ranks' mass.
EXACT_ZIPF_MAX_ROWS = 1 << 23


# Purposes of the independent random streams (the second SeedSequence word).
_INDICES, _LENGTHS, _WEIGHTS, _DENSE, _SHUFFLE, _LABELS, _LOCALITY = range(7)

# The hitrate and reuse kinds give each table one stream of accesses, cut into independent
# blocks of this many: any batch is drawn in O(block) time (the teacher asks for batch 20,000)
# while consecutive batches inside a block continue one LRU locality process.
LOCALITY_BLOCK_ACCESSES = 1 << 18
# The geometric reuse-distance distribution is cut where its tail mass falls below this; the
# cut-off mass goes to the deepest distance kept, as the generator clips deeper ones anyway.
REUSE_TAIL_MASS = 1e-9


@functools.lru_cache(maxsize=8)
def _zipf_cdf(num_rows: int, alpha: float) -> np.ndarray:
    """The exact discrete Zipf CDF over ranks, cached because every batch reuses it."""
    cdf = np.cumsum(np.arange(1, num_rows + 1, dtype=np.float64) ** -alpha)
    cdf /= cdf[-1]
    return cdf


def zipf_ranks(num_rows: int, alpha: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """Ranks in [0, num_rows) with P(rank k) proportional to (k + 1) ** -alpha."""
    if num_rows <= EXACT_ZIPF_MAX_ROWS:
        ranks = np.searchsorted(_zipf_cdf(num_rows, alpha), rng.random(count), side="right")
        return np.minimum(ranks, num_rows - 1).astype(np.int64)
    # Inverse CDF of the continuous density x ** -alpha on [1, num_rows + 1).
    uniform = rng.random(count)
    upper = float(num_rows + 1)
    if abs(alpha - 1.0) < 1e-9:
        values = np.exp(uniform * np.log(upper))
    else:
        exponent = 1.0 - alpha
        values = (1.0 + uniform * (upper ** exponent - 1.0)) ** (1.0 / exponent)
    return np.clip(np.floor(values).astype(np.int64) - 1, 0, num_rows - 1)


@functools.lru_cache(maxsize=32)
def _rank_to_row(num_rows: int, seed: int, table_index: int) -> np.ndarray:
    """A seeded permutation so hot rows are scattered over the table, as in real data."""
    return stream(seed, _SHUFFLE, table_index).permutation(num_rows).astype(np.int64)


def reuse_distance_probabilities(mean_distance: float, max_depth: int) -> np.ndarray:
    """Geometric P(d) over LRU stack depths 0..max_depth-1 with the given mean (tail clipped)."""
    if mean_distance <= 0 or max_depth <= 1:
        return np.ones(1)
    # P(d) = (1 - q) q**d has mean q / (1 - q).
    ratio = mean_distance / (1.0 + mean_distance)
    depths = min(max_depth, int(np.ceil(np.log(REUSE_TAIL_MASS) / np.log(ratio))) + 1)
    probabilities = (1.0 - ratio) * ratio ** np.arange(depths, dtype=np.float64)
    probabilities[-1] += ratio ** depths  # the clipped tail lands on the deepest kept depth
    return probabilities


@functools.lru_cache(maxsize=16)
def _locality_block(num_rows: int, distribution: IndexDistribution, seed: int, table_index: int,
                    block_index: int) -> np.ndarray:
    """One block of a table's hitrate/reuse access stream (cached: batches share blocks)."""
    rng = stream(seed, _LOCALITY, table_index, block_index)
    length = LOCALITY_BLOCK_ACCESSES
    if num_rows == 1:
        return np.zeros(length, dtype=np.int64)
    if distribution.kind == "hitrate":
        # A table that fits the cache cannot miss after warm-up: the largest capacity that can
        # still miss is num_rows - 1.
        capacity = min(distribution.capacity_rows, num_rows - 1)
        return trace_for_hit_rate(distribution.target_hit_rate, capacity, length, num_rows, rng)
    # A block touches at most `length` distinct rows, so deeper distances are clipped anyway.
    probabilities = reuse_distance_probabilities(distribution.mean_distance,
                                                 min(num_rows, length))
    return trace_from_reuse_distances(probabilities, distribution.cold_probability, length,
                                      num_rows, rng)


@functools.lru_cache(maxsize=4)
def _trace_file(path: str, modified_ns: int, size: int) -> np.ndarray:
    """A trace file's ids, cached per (path, mtime, size) so an edited file is re-read."""
    return load_trace(path)


def locality_indices(table: TableSpec, start: int, count: int, seed: int,
                     table_index: int = 0) -> np.ndarray:
    """Accesses start..start+count-1 of the table's trace, hitrate or reuse stream."""
    distribution = table.distribution
    positions = np.arange(start, start + count, dtype=np.int64)
    if distribution.kind == "trace":
        status = os.stat(distribution.path)
        trace = _trace_file(distribution.path, status.st_mtime_ns, status.st_size)
        # Replayed in order, wrapping at the end; ids folded into the table's rows.
        return trace[positions % trace.size] % table.rows
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    first, last = start // LOCALITY_BLOCK_ACCESSES, (start + count - 1) // LOCALITY_BLOCK_ACCESSES
    blocks = [_locality_block(table.rows, distribution, seed, table_index, block)
              for block in range(first, last + 1)]
    stream_part = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    offset = start - first * LOCALITY_BLOCK_ACCESSES
    return stream_part[offset:offset + count].copy()


def draw_indices(table: TableSpec, count: int, seed: int, table_index: int = 0,
                 batch_index: int = 0) -> np.ndarray:
    """count row ids for one table, drawn from its index distribution."""
    distribution: IndexDistribution = table.distribution
    if distribution.is_locality:
        # Batch b continues the table's stream at b * count: consecutive batches are consecutive
        # accesses (exactly so under fixed pooling; drawn bag lengths make the cut approximate).
        return locality_indices(table, batch_index * count, count, seed, table_index)
    rng = stream(seed, _INDICES, table_index, batch_index)
    if distribution.kind == "uniform":
        return rng.integers(0, table.rows, size=count, dtype=np.int64)
    ranks = zipf_ranks(table.rows, distribution.alpha, count, rng)
    return _rank_to_row(table.rows, seed, table_index)[ranks]


def draw_lengths(pooling: PoolingDistribution, batch_size: int, seed: int, table_index: int = 0,
                 batch_index: int = 0) -> np.ndarray:
    """Lookups per bag for batch_size bags (each in [1, pooling.cap])."""
    if pooling.kind == "fixed":
        return np.full(batch_size, int(pooling.mean), dtype=np.int64)
    rng = stream(seed, _LENGTHS, table_index, batch_index)
    if pooling.kind == "uniform":
        values = rng.uniform(pooling.mean - pooling.spread, pooling.mean + pooling.spread,
                             batch_size)
    elif pooling.kind == "normal":
        values = rng.normal(pooling.mean, pooling.spread, batch_size)
    else:
        # Lognormal with the requested mean: mu = log(mean) - sigma^2 / 2.
        sigma = pooling.spread
        values = rng.lognormal(np.log(pooling.mean) - sigma * sigma / 2.0, sigma, batch_size)
    return np.clip(np.rint(values), 1, pooling.cap).astype(np.int64)


def table_batch(table: TableSpec, batch_size: int, seed: int, table_index: int = 0,
                batch_index: int = 0) -> TableBatch:
    """One table's lookups for batch_size bags."""
    lengths = draw_lengths(table.pooling, batch_size, seed, table_index, batch_index)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    total = int(lengths.sum())
    indices = draw_indices(table, total, seed, table_index, batch_index)
    weights = stream(seed, _WEIGHTS, table_index, batch_index).random(total, dtype=np.float32)
    return TableBatch(indices=indices, offsets=offsets, weights=weights)


def make_table_batch(workload: WorkloadSpec, table_index: int, seed: int, batch_index: int = 0,
                     batch_size: int | None = None) -> TableBatch:
    """One table's lookups of a workload's batch (from its data file when it has one)."""
    size = batch_size or workload.batch_size
    if workload.data_path:
        return make_batch(workload, seed, batch_index, size).tables[table_index]
    return table_batch(workload.tables[table_index], size, seed, table_index, batch_index)


def split_batch(batch: TableBatch, parts: int) -> list[TableBatch]:
    """Cut a batch of parts x B bags into parts consecutive batches of B bags each."""
    bags = len(batch.offsets) // parts
    ends = np.append(batch.offsets, len(batch.indices))
    pieces = []
    for part in range(parts):
        first, last = ends[part * bags], ends[(part + 1) * bags]
        pieces.append(TableBatch(indices=batch.indices[first:last],
                                 offsets=batch.offsets[part * bags:(part + 1) * bags] - first,
                                 weights=batch.weights[first:last]))
    return pieces


def rotating_table_batches(workload: WorkloadSpec, table_index: int, seed: int,
                           parts: int) -> list[TableBatch]:
    """parts distinct batches of one table (batch 0 first), drawn as one long stream."""
    size = workload.batch_size
    return split_batch(make_table_batch(workload, table_index, seed, 0, size * parts), parts)


def dense_features(num_dense: int, batch_size: int, seed: int, batch_index: int = 0) -> np.ndarray:
    """Dense features shaped like preprocessed Criteo ones: log(1 + count), count >= 0."""
    rng = stream(seed, _DENSE, batch_index)
    counts = rng.geometric(0.05, size=(batch_size, num_dense)) - 1
    return np.log1p(counts).astype(np.float32)


def make_batch(workload: WorkloadSpec, seed: int, batch_index: int = 0,
               batch_size: int | None = None) -> Batch:
    """A whole DLRM batch for the workload; same (seed, batch_index), same batch."""
    size = batch_size or workload.batch_size
    if workload.data_path:
        from workloads.criteo_workload import file_batch

        return file_batch(workload, seed, batch_index, size)
    return Batch(
        dense=dense_features(workload.num_dense, size, seed, batch_index),
        tables=[table_batch(table, size, seed, index, batch_index)
                for index, table in enumerate(workload.tables)],
    )


def label_stream(seed: int, batch_index: int) -> np.random.Generator:
    """The generator that draws teacher labels for one batch."""
    return stream(seed, _LABELS, batch_index)
