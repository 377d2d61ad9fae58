"""SparseLengthsSum ops: pooled lookups over one table (`sls`) and over all tables (`sls_multi`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from bench.models.dlrm import flatten_tables, row_start_values, tbe_inputs
from bench.ops.common import (FLOAT_DTYPES, PooledTable, checked_bags, cycling, lookup_bound,
                              lookup_bytes, mean_lookups, require_huge_pages, rotation_metrics,
                              shared_rotation, shared_rotations, shared_table_weight,
                              workload_rotation_plan)
from bench.precisions import BYTES_PER_VALUE
from bench.references import table_lookup64
from bench.registry import BuildContext, Op, Prepared, impl, reason_of, register_op

ALL_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
SLS_MODES = ("sum", "mean", "weighted")


def _sls_variants(workload, options) -> list[dict]:
    modes = options.get("sls_modes") or SLS_MODES
    return [{"mode": mode} for mode in modes]


register_op(Op("sls", "pooled embedding lookups (EmbeddingBag) over the workload's largest table",
               _sls_variants, memory_factor=3.0, single_table=True, ci=True,
               report_order=10))
register_op(Op("sls_multi", "pooled lookups over every table of the workload",
               lambda workload, options: [{"mode": "sum"}], memory_factor=4.0, ci=True,
               report_order=20))


def output_bytes(precision: str) -> float:
    """Bytes of one pooled output value at a table precision."""
    # Quantized bags dequantize into fp32 outputs; float tables pool in their own dtype.
    return BYTES_PER_VALUE[precision] if precision in FLOAT_DTYPES else 4.0


def _huge_page_params(table: PooledTable) -> dict:
    return {"huge_pages": "madvise", "huge_page_fraction": round(table.huge_page_fraction, 4)}


# Plan-time facts (bench/registry.py Impl): row-wise int8/int4 bags are CPU-only (PooledTable).
CUDA_FLOATS = {"cuda": ("fp32", "fp16", "bf16")}


def _huge_pages_here(device: str, options: dict) -> str:
    """Plan-time: why tables cannot go in transparent huge pages here ('' when they can)."""
    return reason_of(require_huge_pages, torch.device(device))


@impl("sls", "embedding_bag", ALL_PRECISIONS, baseline=True, device_precisions=CUDA_FLOATS,
      description="torch embedding_bag (FBGEMM kernels) or the quantized row-wise op")
def build_sls(context: BuildContext) -> Prepared:
    """One table, one pooled lookup per bag, at the requested precision and mode."""
    return _build_sls(context, huge_pages=False)


@impl("sls", "huge_pages", ALL_PRECISIONS, available=_huge_pages_here,
      description="embedding_bag over the table copied into transparent huge pages (fewer TLB "
                  "misses per random row)")
def build_sls_huge_pages(context: BuildContext) -> Prepared:
    """As embedding_bag, with the table in 2 MiB pages (madvise)."""
    return _build_sls(context, huge_pages=True)


@dataclasses.dataclass(frozen=True)
class OneTable:
    """What every sls impl looks up: the workload's largest table, in the variant's mode, over
    its rotation of distinct batches."""

    index: int
    table: Any  # workloads.specs.TableSpec
    mode: str
    rotation: dict

    @property
    def weighted(self) -> bool:
        """Whether bags are weighted sums."""
        return self.mode == "weighted"

    @property
    def pool_mode(self) -> str:
        """The pooling a lookup call takes (a weighted bag is a sum with per-sample weights)."""
        return "sum" if self.weighted else self.mode

    @property
    def parts(self) -> int:
        """Rotating batches timing cycles through."""
        return self.rotation["rotation_batches"]


def one_table(context: BuildContext) -> OneTable:
    """The sls configuration of a build: the largest table, the mode, the rotation plan."""
    workload = context.workload
    index = workload.largest_table()
    return OneTable(index, workload.tables[index], context.variant["mode"],
                    workload_rotation_plan(workload, [index], context.precision))


def one_table_prepared(context: BuildContext, lookup: OneTable, weight: torch.Tensor, calls,
                       inputs, bytes_per_row: float, sample_weight_bytes: float,
                       extra_params: dict, bound: Callable = lookup_bound) -> Prepared:
    """A Prepared for sls: calls cycle over the rotation's inputs [(indices, offsets, weights)],
    and the first batch (a sample of its bags when it is large) is checked against float64
    pooling of weight, within bound (lookup_bound's arguments)."""
    table, pool_mode, precision = lookup.table, lookup.pool_mode, context.precision
    indices, offsets, weights = inputs[0]
    weights = weights if lookup.weighted else None
    # Timing cycles through every rotating batch: charge their mean lookup count.
    lookups, bags = mean_lookups(indices for indices, _, _ in inputs), offsets.numel()
    checked = checked_bags(bags, indices.numel(), table.rows, table.dim)
    check_indices, check_offsets, check_weights = checked.batch(indices, offsets, weights)
    return Prepared(
        run=cycling(calls),
        check=checked.checked_call(calls[0]),
        reference=lambda: table_lookup64(weight, check_indices, check_offsets, pool_mode,
                                         check_weights),
        error_bound=lambda expected: bound(weight, check_indices, check_offsets, pool_mode,
                                           check_weights, precision),
        samples=bags,
        flops=lookups * table.dim * (2 if lookup.weighted else 1),
        bytes_moved=lookup_bytes(lookups, bags, table.dim, bytes_per_row,
                                 output_bytes(precision),
                                 sample_weight_bytes if lookup.weighted else 0),
        params={"table": lookup.index, "rows": table.rows, "dim": table.dim,
                "pooling": table.pooling.label(), "distribution": table.distribution.label(),
                "mode": lookup.mode, "table_bytes": int(table.rows * bytes_per_row),
                "rotation_batches": lookup.parts, **extra_params},
        metrics={**rotation_metrics(lookup.rotation), **checked.metrics()},
        flush_between_reps=True,
    )


def _build_sls(context: BuildContext, huge_pages: bool) -> Prepared:
    workload, device, lookup = context.workload, context.device, one_table(context)
    # The worker's shared fp32 table, not a copy: nothing here writes to it (PooledTable
    # casts, quantizes or copies into huge pages; an fp32 table on the CPU is read in place).
    weight = shared_table_weight(lookup.table, context.seed, lookup.index)
    pooled = PooledTable(weight, context.precision, device, huge_pages=huge_pages)
    # Per-sample weights take the table's dtype here, at build: a cast inside the timed
    # closure would add a kernel (and, for a GPU, traffic) that a real input pipeline avoids.
    inputs = [pooled.with_sample_weights(*batch) for batch in
              shared_rotation(workload, lookup.index, context.seed, lookup.parts, device)]
    calls = [functools.partial(pooled, indices, offsets, lookup.pool_mode,
                               weights if lookup.weighted else None)
             for indices, offsets, weights in inputs]
    return one_table_prepared(context, lookup, weight, calls, inputs, pooled.bytes_per_row,
                              pooled.sample_weight_dtype.itemsize,
                              _huge_page_params(pooled) if huge_pages else {})


def all_tables(context: BuildContext):
    """Every table's weights, per rotation batch every table's tensors, and the rotation plan."""
    workload = context.workload
    table_indices = range(len(workload.tables))
    rotation = workload_rotation_plan(workload, table_indices, context.precision)
    parts = rotation["rotation_batches"]
    # The worker's shared fp32 tables (read, never written: a build copies what it changes).
    weights = [shared_table_weight(table, context.seed, index)
               for index, table in enumerate(workload.tables)]
    rotations = shared_rotations(workload, table_indices, context.seed, parts, context.device)
    return weights, rotations, rotation


def multi_reference(weights, tensors):
    """Float64 pooled sums [tables, bags, dim] of one batch of every table."""
    # Per table, from the unconcatenated weights: no row shift or bag re-basing to share.
    return torch.stack([table_lookup64(weight, indices, offsets, "sum", None)
                        for weight, (indices, offsets, _) in zip(weights, tensors)])


def _multi_bound(weights, tensors, precision, bound: Callable):
    return torch.stack([bound(weight, indices, offsets, "sum", None, precision)
                        for weight, (indices, offsets, _) in zip(weights, tensors)])


def multi_prepared(context, calls, weights, rotations, rotation, bytes_per_row,
                   extra_params, bound: Callable = lookup_bound) -> Prepared:
    """A Prepared for sls_multi: output [tables, batch, dim] against per-table float64 sums,
    within bound per table (lookup_bound's arguments)."""
    workload = context.workload
    tensors = rotations[0]
    # Timing cycles through every rotating batch: charge their mean lookup count.
    lookups = sum(indices.numel() for part in rotations for indices, _, _ in part) / len(rotations)
    bags = sum(offsets.numel() for _, offsets, _ in tensors)
    # A sample checks the same bag positions of every table (outputs [tables, batch, dim]).
    checked = checked_bags(workload.batch_size, sum(entry[0].numel() for entry in tensors),
                           workload.total_rows, workload.dim, outputs_per_bag=len(tensors))
    check_tensors = [checked.batch(*entry) for entry in tensors]
    return Prepared(
        run=cycling(calls),
        check=checked.checked_call(calls[0], dim=1),
        reference=lambda: multi_reference(weights, check_tensors),
        error_bound=lambda expected: _multi_bound(weights, check_tensors, context.precision,
                                                  bound),
        samples=workload.batch_size,
        flops=lookups * workload.dim,
        bytes_moved=lookup_bytes(lookups, bags, workload.dim, bytes_per_row,
                                 output_bytes(context.precision)),
        params={"num_tables": len(workload.tables), "total_rows": workload.total_rows,
                "dim": workload.dim, "lookups": lookups, "rotation_batches": len(rotations),
                **extra_params},
        metrics={**rotation_metrics(rotation), **checked.metrics()},
        flush_between_reps=True,
    )


def table_major_calls(pool: Callable, rotations, batch_size: int) -> list:
    """The timed calls of a table-batched sls_multi impl, one per rotating batch: the per-table
    inputs (as a data loader gives them) joined into the table-major input pool takes (per-batch
    work, so timed), pooled [batch, tables * dim], returned as a [tables, batch, dim] view."""
    def lookup_all(indices, offsets):
        pooled = pool(*tbe_inputs(indices, offsets))
        return pooled.view(batch_size, len(indices), -1).transpose(0, 1)

    return [functools.partial(lookup_all, [entry[0] for entry in tensors],
                              [entry[1] for entry in tensors]) for tensors in rotations]


@impl("sls_multi", "per_table", ALL_PRECISIONS, baseline=True, device_precisions=CUDA_FLOATS,
      description="a Python loop of one EmbeddingBag per table, as the DLRM reference does")
def build_per_table(context: BuildContext) -> Prepared:
    """One pooled lookup per table, stacked into [tables, batch, dim]."""
    weights, rotations, rotation = all_tables(context)
    tables = [PooledTable(weight, context.precision, context.device) for weight in weights]

    def lookup_all(tensors):
        return torch.stack([table(indices, offsets) for table, (indices, offsets, _)
                            in zip(tables, tensors)])

    calls = [functools.partial(lookup_all, tensors) for tensors in rotations]
    return multi_prepared(context, calls, weights, rotations, rotation,
                           tables[0].bytes_per_row, {})


@impl("sls_multi", "batched", ALL_PRECISIONS, device_precisions=CUDA_FLOATS,
      description="one lookup over the concatenated tables, indices shifted by table offsets")
def build_batched(context: BuildContext) -> Prepared:
    """All tables concatenated into one; one embedding_bag call over table-major bags."""
    return _build_batched(context, huge_pages=False)


@impl("sls_multi", "batched_huge_pages", ALL_PRECISIONS, available=_huge_pages_here,
      description="batched, with the concatenated tables in transparent huge pages")
def build_batched_huge_pages(context: BuildContext) -> Prepared:
    """As batched, with the concatenated table in 2 MiB pages (madvise)."""
    return _build_batched(context, huge_pages=True)


def _build_batched(context: BuildContext, huge_pages: bool) -> Prepared:
    workload, device = context.workload, context.device
    weights, rotations, rotation = all_tables(context)
    table = PooledTable(torch.cat(weights), context.precision, device, huge_pages=huge_pages)
    row_starts = row_start_values(weights)
    batch_size = workload.batch_size

    def lookup_all(tensors):
        # Inputs arrive per table, as a data loader gives them; shifting ids into the
        # concatenated table and re-basing offsets is per-batch work, so it is timed.
        indices, offsets = flatten_tables([entry[0] for entry in tensors],
                                          [entry[1] for entry in tensors], row_starts)
        return table(indices, offsets).view(len(tensors), batch_size, -1)

    calls = [functools.partial(lookup_all, tensors) for tensors in rotations]
    return multi_prepared(context, calls, weights, rotations, rotation, table.bytes_per_row,
                           {"table_bytes": int(workload.total_rows * table.bytes_per_row),
                            **(_huge_page_params(table) if huge_pages else {})})
