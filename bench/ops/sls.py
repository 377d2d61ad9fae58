"""SparseLengthsSum ops: pooled lookups over one table (`sls`) and over all tables (`sls_multi`)."""

from __future__ import annotations

import numpy as np
import torch

from bench.ops.common import (BYTES_PER_VALUE, FLOAT_DTYPES, PooledTable, as_tensors,
                              lookup_bytes, reference_lookup, table_weight)
from bench.registry import BuildContext, Op, Prepared, impl, register_op
from workloads.generators import make_batch, make_table_batch

ALL_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
SLS_MODES = ("sum", "mean", "weighted")


def _sls_variants(workload, options) -> list[dict]:
    modes = options.get("sls_modes") or SLS_MODES
    return [{"mode": mode} for mode in modes]


register_op(Op("sls", "pooled embedding lookups (EmbeddingBag) over the workload's largest table",
               _sls_variants))
register_op(Op("sls_multi", "pooled lookups over every table of the workload",
               lambda workload, options: [{"mode": "sum"}]))


def _output_bytes(precision: str) -> float:
    # Quantized bags dequantize into fp32 outputs; float tables pool in their own dtype.
    return BYTES_PER_VALUE[precision] if precision in FLOAT_DTYPES else 4.0


@impl("sls", "embedding_bag", ALL_PRECISIONS, baseline=True,
      description="torch embedding_bag (FBGEMM kernels) or the quantized row-wise op")
def build_sls(context: BuildContext) -> Prepared:
    """One table, one pooled lookup per bag, at the requested precision and mode."""
    workload, device = context.workload, context.device
    table_index = workload.largest_table()
    table = workload.tables[table_index]
    mode = context.variant["mode"]
    weighted = mode == "weighted"
    pool_mode = "sum" if weighted else mode
    weight = table_weight(table, context.seed, table_index)
    pooled = PooledTable(weight, context.precision, device)
    batch = make_table_batch(workload, table_index, context.seed)
    indices, offsets, weights = as_tensors(batch, device)
    weights = weights if weighted else None
    lookups, bags = indices.numel(), offsets.numel()
    return Prepared(
        run=lambda: pooled(indices, offsets, pool_mode, weights),
        reference=lambda: reference_lookup(weight, indices, offsets, pool_mode, weights),
        samples=bags,
        flops=lookups * table.dim * (2 if weighted else 1),
        bytes_moved=lookup_bytes(lookups, bags, table.dim, pooled.bytes_per_row,
                                 _output_bytes(context.precision), weighted),
        params={"table": table_index, "rows": table.rows, "dim": table.dim,
                "pooling": table.pooling.label(), "distribution": table.distribution.label(),
                "mode": mode, "table_bytes": int(table.rows * pooled.bytes_per_row)},
        flush_between_reps=True,
    )


def _all_tables(context: BuildContext):
    """Every table's weights and this batch's tensors."""
    workload = context.workload
    batch = make_batch(workload, context.seed)
    weights = [table_weight(table, context.seed, index)
               for index, table in enumerate(workload.tables)]
    tensors = [as_tensors(table_batch, context.device) for table_batch in batch.tables]
    return weights, tensors


def _multi_reference(weights, tensors):
    return torch.stack([reference_lookup(weight, indices, offsets, "sum", None)
                        for weight, (indices, offsets, _) in zip(weights, tensors)])


def _multi_prepared(context, run, weights, tensors, bytes_per_row, extra_params) -> Prepared:
    workload = context.workload
    lookups = sum(indices.numel() for indices, _, _ in tensors)
    bags = sum(offsets.numel() for _, offsets, _ in tensors)
    return Prepared(
        run=run,
        reference=lambda: _multi_reference(weights, tensors),
        samples=workload.batch_size,
        flops=lookups * workload.dim,
        bytes_moved=lookup_bytes(lookups, bags, workload.dim, bytes_per_row,
                                 _output_bytes(context.precision), False),
        params={"num_tables": len(workload.tables), "total_rows": workload.total_rows,
                "dim": workload.dim, "lookups": lookups, **extra_params},
        flush_between_reps=True,
    )


@impl("sls_multi", "per_table", ALL_PRECISIONS, baseline=True,
      description="a Python loop of one EmbeddingBag per table, as the DLRM reference does")
def build_per_table(context: BuildContext) -> Prepared:
    """One pooled lookup per table, stacked into [tables, batch, dim]."""
    weights, tensors = _all_tables(context)
    tables = [PooledTable(weight, context.precision, context.device) for weight in weights]

    def run():
        return torch.stack([table(indices, offsets) for table, (indices, offsets, _)
                            in zip(tables, tensors)])

    return _multi_prepared(context, run, weights, tensors, tables[0].bytes_per_row, {})


@impl("sls_multi", "batched", ALL_PRECISIONS,
      description="one lookup over the concatenated tables, indices shifted by table offsets")
def build_batched(context: BuildContext) -> Prepared:
    """All tables concatenated into one; one embedding_bag call over table-major bags."""
    workload, device = context.workload, context.device
    weights, tensors = _all_tables(context)
    table = PooledTable(torch.cat(weights), context.precision, device)
    row_starts = np.concatenate(([0], np.cumsum([spec.rows for spec in workload.tables])[:-1]))
    lookups_per_table = [indices.numel() for indices, _, _ in tensors]
    # Inputs arrive per table, as a data loader gives them; shifting ids into the
    # concatenated table and re-basing offsets is per-batch work, so it is timed.
    per_table_indices = [indices for indices, _, _ in tensors]
    shifts = torch.repeat_interleave(torch.as_tensor(row_starts, device=device),
                                     torch.as_tensor(lookups_per_table, device=device))
    lookup_starts = np.concatenate(([0], np.cumsum(lookups_per_table)[:-1]))
    per_table_offsets = [offsets for _, offsets, _ in tensors]
    offset_shifts = torch.as_tensor(lookup_starts, device=device)
    batch_size = workload.batch_size

    def run():
        indices = torch.cat(per_table_indices) + shifts
        offsets = (torch.stack(per_table_offsets) + offset_shifts.unsqueeze(1)).flatten()
        return table(indices, offsets).view(len(per_table_offsets), batch_size, -1)

    return _multi_prepared(context, run, weights, tensors, table.bytes_per_row,
                           {"table_bytes": int(workload.total_rows * table.bytes_per_row)})
