"""Our Triton table-batched embedding bag (bench/models/triton_tbe.py) on the lookup ops: `sls`'s
largest table and all of `sls_multi`'s tables, each in one launch, on cuda."""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from bench.ops.common import (as_tensors, cycling, lookup_bound, lookup_bytes,
                              mean_lookups, rotation_metrics, table_weight,
                              workload_rotation_plan)
from bench.ops.sls import ALL_PRECISIONS, all_tables, multi_prepared, output_bytes
from bench.ops.sls_fbgemm import concatenate_tables, table_major_inputs, with_last_offset
from bench.references import table_lookup64
from bench.registry import BuildContext, Prepared, Unsupported, impl
from workloads.generators import rotating_table_batches

TRITON_INSTALL = "pip install -e '.[gpu]'"
CPU_SKIP = "triton_tbe runs on cuda; on CPU it is tested through TRITON_INTERPRET=1"


def triton_tbe_module(device: torch.device) -> ModuleType:
    """bench.models.triton_tbe where its kernels can run on this device, else Unsupported:
    compiled kernels need cuda; on the CPU only Triton's interpreter runs them, and only when
    TRITON_INTERPRET=1 was set before triton was imported."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unsupported(CPU_SKIP)
    if device.type not in ("cpu", "cuda"):
        raise Unsupported(f"triton_tbe runs on cuda, not {device.type}")
    try:
        module = importlib.import_module("bench.models.triton_tbe")
    except ImportError as error:
        raise Unsupported(f"triton is not available ({error}); install it with: "
                          f"{TRITON_INSTALL}") from None
    interpreted = module.kernels.INTERPRETED
    if device.type == "cpu" and not interpreted:
        raise Unsupported(CPU_SKIP + " (triton was imported before TRITON_INTERPRET=1 was set)")
    if device.type == "cuda" and interpreted:
        raise Unsupported("the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 "
                          "when they were imported); run without it to use cuda")
    return module


def _make_tables(context: BuildContext, weights, mode: str):
    """The weights in one Triton TBE at the context's precision (ValueError -> Unsupported)."""
    triton_tbe = triton_tbe_module(context.device)
    try:
        return triton_tbe.TritonTableBatchedEmbeddingBag(weights, context.precision, mode,
                                                         device=context.device)
    except ValueError as error:
        raise Unsupported(str(error)) from None


def _kernel_params(tables) -> dict:
    return {"row_bytes": tables.bytes_per_row, "launches_per_call": 1,
            "triton_interpreter": tables.interpreted}


def runs_here(device: str, options: dict) -> str:
    """Plan-time: on the CPU only Triton's interpreter runs the kernels ('' where they run)."""
    return CPU_SKIP if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" else ""


@impl("sls", "triton_tbe", ALL_PRECISIONS, available=runs_here,
      requires={"triton": TRITON_INSTALL},
      description="our Triton table-batched embedding bag (one launch; fp32 accumulation; "
                  "row-wise int8/int4 as PooledTable stores them)")
def build_sls_triton(context: BuildContext) -> Prepared:
    """The largest table in a one-table Triton TBE; sum, mean, or weighted sum."""
    workload, device = context.workload, context.device
    table_index = workload.largest_table()
    table = workload.tables[table_index]
    mode = context.variant["mode"]
    weighted = mode == "weighted"
    pool_mode = "sum" if weighted else mode
    weight = table_weight(table, context.seed, table_index)
    tables = _make_tables(context, [weight], pool_mode)
    rotation = workload_rotation_plan(workload, [table_index], context.precision)
    parts = rotation["rotation_batches"]
    # Per-sample weights stay fp32: the kernel multiplies in fp32 for every storage.
    inputs = [as_tensors(batch, device)
              for batch in rotating_table_batches(workload, table_index, context.seed, parts)]
    calls = [functools.partial(tables.pooled, indices, with_last_offset(indices, offsets),
                               weights if weighted else None)
             for indices, offsets, weights in inputs]
    indices, offsets, weights = inputs[0]
    weights = weights if weighted else None
    lookups, bags = mean_lookups(indices for indices, _, _ in inputs), offsets.numel()
    return Prepared(
        run=cycling(calls),
        check=calls[0],
        reference=lambda: table_lookup64(weight, indices, offsets, pool_mode, weights),
        error_bound=lambda expected: lookup_bound(weight, indices, offsets, pool_mode, weights,
                                                  context.precision),
        samples=bags,
        flops=lookups * table.dim * (2 if weighted else 1),
        bytes_moved=lookup_bytes(lookups, bags, table.dim, tables.bytes_per_row,
                                 output_bytes(context.precision),
                                 weights.element_size() if weighted else 0),
        params={"table": table_index, "rows": table.rows, "dim": table.dim,
                "pooling": table.pooling.label(), "distribution": table.distribution.label(),
                "mode": mode, "table_bytes": int(table.rows * tables.bytes_per_row),
                "rotation_batches": parts, **_kernel_params(tables)},
        metrics=rotation_metrics(rotation),
        flush_between_reps=True,
    )


@impl("sls_multi", "triton_tbe", ALL_PRECISIONS, available=runs_here,
      requires={"triton": TRITON_INSTALL},
      description="every table in our Triton table-batched embedding bag: one launch a batch")
def build_multi_triton(context: BuildContext) -> Prepared:
    """All tables in one Triton TBE buffer: one launch per batch, sum pooling."""
    weights, rotations, rotation = all_tables(context)
    tables = _make_tables(context, weights, "sum")
    num_tables, batch_size = len(weights), context.workload.batch_size

    def lookup_all(indices, offsets, lookup_starts, end):
        # Inputs arrive per table, as a data loader gives them (and as `batched` takes them):
        # joining them into the table-major input is per-batch work, so it is timed.
        pooled = tables.pooled(*concatenate_tables(indices, offsets, lookup_starts, end))
        # [batch, tables * dim] -> [tables, batch, dim], a view
        return pooled.view(batch_size, num_tables, -1).transpose(0, 1)

    calls = [functools.partial(lookup_all, *table_major_inputs(tensors))
             for tensors in rotations]
    return multi_prepared(context, calls, weights, rotations, rotation, tables.bytes_per_row,
                           {"table_bytes": int(context.workload.total_rows
                                               * tables.bytes_per_row),
                            **_kernel_params(tables)})

