"""The fused Triton TT-Rec lookup (bench/models/ttrec/triton_tt.py) on tt_sls and dlrm_train."""

from __future__ import annotations

import dataclasses
import importlib
import os
from types import ModuleType

import torch

from bench.ops.dlrm import CUDA_TRAIN, TRAIN_PRECISIONS, build_train, tt_only
from bench.ops.sls_triton import TRITON_INSTALL
from bench.ops.ttrec import build_tt
from bench.registry import BuildContext, Prepared, Unsupported, impl

CPU_SKIP = "tt_triton runs on cuda; on CPU it is tested through TRITON_INTERPRET=1"
TT_TRITON_NEEDS = ("tt_triton trains TT-Rec tables: give --tt-tables K (the dense variant runs "
                   "under per_table / batched)")


def _runs_here(device: str, options: dict) -> str:
    """Plan-time: on the CPU only Triton's interpreter runs the kernels ('' where they run)."""
    return CPU_SKIP if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" else ""


def _triton_tt(device: torch.device) -> ModuleType:
    """bench.models.ttrec.triton_tt where its kernels run on this device, else Unsupported with
    the reason (triton missing, or imported with the other interpreter setting than this
    device needs)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unsupported(CPU_SKIP)
    try:
        triton_tt = importlib.import_module("bench.models.ttrec.triton_tt")
    except ImportError as error:
        raise Unsupported(f"triton is not available ({error}); install it with: "
                          f"{TRITON_INSTALL}") from None
    problem = triton_tt.device_problem(device)
    if problem:
        raise Unsupported(problem)
    return triton_tt


def _check_tables(triton_tt: ModuleType, tables, rank: int) -> None:
    """Unsupported if a TT table of these (rows, dim) at this rank has no on-chip chain."""
    for table in tables:
        problem = triton_tt.table_problem(table.rows, table.dim, rank)
        if problem:
            raise Unsupported(problem)


def _build_tt_sls(context: BuildContext, cache_policy: str) -> Prepared:
    workload = context.workload
    triton_tt = _triton_tt(context.device)
    _check_tables(triton_tt, [workload.tables[workload.largest_table()]],
                  context.variant["rank"])
    prepared = build_tt(context, cache_policy, kernel="triton")
    return dataclasses.replace(prepared, params={
        **prepared.params, "launches_per_call": 1,
        "triton_interpreter": triton_tt.kernels.INTERPRETED})


@impl("tt_sls", "tt_triton", ("fp32", "fp16", "bf16"), available=_runs_here,
      requires={"triton": TRITON_INSTALL},
      description="TT cores + 10% LFU cache in one Triton launch: per lookup the cache slot "
                  "is read, a hit reads the cached row, a miss runs the core chain on chip")
def build_tt_triton(context: BuildContext) -> Prepared:
    """TT embedding bag with the LFU cache, on the fused Triton kernel."""
    return _build_tt_sls(context, "lfu")


@impl("tt_sls", "tt_triton_uncached", ("fp32", "fp16", "bf16"), available=_runs_here,
      requires={"triton": TRITON_INSTALL},
      description="TT cores only in one Triton launch: every lookup's core chain on chip")
def build_tt_triton_uncached(context: BuildContext) -> Prepared:
    """TT embedding bag without a cache, on the fused Triton kernel."""
    return _build_tt_sls(context, "none")


def _runs_tt_variants_here(device: str, options: dict) -> str:
    """Plan-time: on the CPU Triton's interpreter, and --tt-tables."""
    return _runs_here(device, options) or ("" if options.get("tt_tables") else TT_TRITON_NEEDS)


@impl("dlrm_train", "tt_triton", TRAIN_PRECISIONS, device_precisions=CUDA_TRAIN, pairs=tt_only,
      available=_runs_tt_variants_here, requires={"triton": TRITON_INSTALL},
      description="TT-Rec tables (--tt-tables) on the fused Triton TT kernel (forward and "
                  "backward one launch each per table), the rest one batched table")
def build_train_tt_triton(context: BuildContext) -> Prepared:
    """Training step with TT tables on the Triton kernel."""
    triton_tt = _triton_tt(context.device)
    if not context.variant.get("tt_tables"):
        raise Unsupported(TT_TRITON_NEEDS)
    # The TT tables are the workload's largest, as TTMixedEmbeddings picks them.
    largest = sorted(context.workload.tables, key=lambda table: -table.rows)
    _check_tables(triton_tt, largest[:context.variant["tt_tables"]], context.variant["tt_rank"])
    variant = {**context.variant, "tt_kernel": "triton"}
    prepared = build_train(dataclasses.replace(context, variant=variant), "batched")
    return dataclasses.replace(prepared, params={
        **prepared.params, "triton_interpreter": triton_tt.kernels.INTERPRETED})
