"""Our Triton table-batched embedding bag (bench/models/triton_tbe.py) on the lookup ops: `sls`'s
largest table and all of `sls_multi`'s tables, each in one launch, on cuda."""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from bench.ops.common import (as_tensors, table_weight)
from bench.ops.sls import (ALL_PRECISIONS, all_tables, multi_prepared, one_table,
                           one_table_prepared, table_major_calls)
from bench.ops.sls_fbgemm import tbe_multi_params, with_last_offset
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
    workload, device, lookup = context.workload, context.device, one_table(context)
    weight = table_weight(lookup.table, context.seed, lookup.index)
    tables = _make_tables(context, [weight], lookup.pool_mode)
    # Per-sample weights stay fp32: the kernel multiplies in fp32 for every storage.
    inputs = [as_tensors(batch, device) for batch in
              rotating_table_batches(workload, lookup.index, context.seed, lookup.parts)]
    calls = [functools.partial(tables.pooled, indices, with_last_offset(indices, offsets),
                               weights if lookup.weighted else None)
             for indices, offsets, weights in inputs]
    return one_table_prepared(context, lookup, weight, calls, inputs, tables.bytes_per_row,
                              inputs[0][2].element_size(), _kernel_params(tables))


@impl("sls_multi", "triton_tbe", ALL_PRECISIONS, available=runs_here,
      requires={"triton": TRITON_INSTALL},
      description="every table in our Triton table-batched embedding bag: one launch a batch")
def build_multi_triton(context: BuildContext) -> Prepared:
    """All tables in one Triton TBE buffer: one launch per batch, sum pooling."""
    weights, rotations, rotation = all_tables(context)
    tables = _make_tables(context, weights, "sum")
    calls = table_major_calls(tables.pooled, rotations, context.workload.batch_size)
    return multi_prepared(context, calls, weights, rotations, rotation, tables.bytes_per_row,
                          tbe_multi_params(context.workload, tables.bytes_per_row,
                                           _kernel_params(tables)))

