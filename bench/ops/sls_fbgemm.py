"""FBGEMM's table-batched embedding ops (TBE) on the lookup ops: the training TBE's forward and
the inference TBE at fp16/int8/int4, over `sls`'s largest table and over all of `sls_multi`'s;
on the CPU, or on cuda with FBGEMM's CUDA build."""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace
from typing import Optional

import torch

from bench import peers
from bench.compare_outputs import (QUANTIZED_BITS, UNDERFLOW, UNIT_ROUNDOFF,
                                   pooled_lookup_bound)
from bench.ops.fbgemm_placement import Placement, peers_on, placed
from bench.ops.common import (FLOAT_DTYPES, Unsupported, as_tensors, lookup_bound,
                              table_weight)
from bench.ops.sls import (all_tables, multi_prepared, one_table, one_table_prepared,
                           table_major_calls)
from bench.registry import BuildContext, Prepared, impl
from workloads.generators import rotating_table_batches

TRAINING_PRECISIONS = ("fp32", "fp16")
INFERENCE_PRECISIONS = ("fp16", "int8", "int4")
FBGEMM_PEER = {"fbgemm_gpu": peers.PEERS_INSTALL}  # plan-time: what the TBE impls need
FBGEMM_ON = peers_on("fbgemm_gpu")  # plan-time: on cuda, FBGEMM's CUDA build
# FloatToFused8BitRowwiseQuantized quantizes with 255 / (range + 1e-8): a value moves by at
# most 1e-8 from where the exact inverse scale puts it.
INT8_QUANTIZE_EPSILON = 1e-8


def _fbgemm() -> SimpleNamespace:
    """The FBGEMM modules these impls use, or Unsupported naming the install command."""
    return SimpleNamespace(
        common=peers.require("fbgemm_gpu.split_table_batched_embeddings_ops_common"),
        training=peers.require("fbgemm_gpu.split_table_batched_embeddings_ops_training"),
        inference=peers.require("fbgemm_gpu.split_table_batched_embeddings_ops_inference"),
        configs=peers.require("fbgemm_gpu.split_embedding_configs"),
        quantize=peers.require("fbgemm_gpu.tbe.utils.quantize"))


def _sparse_type(fbgemm, precision: str):
    return getattr(fbgemm.configs.SparseType, precision.upper())


def _output_type(fbgemm, precision: str):
    # As the suite's other impls: float tables pool into their own dtype, quantized into fp32.
    return _sparse_type(fbgemm, precision if precision in FLOAT_DTYPES else "fp32")


def _pooling(fbgemm, mode: str):
    """The TBE pooling mode of an op mode (weighted is a sum with per-sample weights)."""
    return fbgemm.common.PoolingMode.MEAN if mode == "mean" else fbgemm.common.PoolingMode.SUM


class TrainingTables:
    """Tables in one training TBE (SplitTableBatchedEmbeddingBagsCodegen) where the placement
    puts them, answering its forward; weights copied from the fp32 tables."""

    def __init__(self, fbgemm, weights: list[torch.Tensor], precision: str, mode: str,
                 where: Placement):
        if precision not in TRAINING_PRECISIONS:
            raise Unsupported(f"the training TBE impl stores tables at {TRAINING_PRECISIONS}")
        location, compute = where.enums(fbgemm.common)
        self.kind = f"SplitTableBatchedEmbeddingBagsCodegen ({where.label()})"
        self.module = fbgemm.training.SplitTableBatchedEmbeddingBagsCodegen(
            [(weight.shape[0], weight.shape[1], location, compute) for weight in weights],
            weights_precision=_sparse_type(fbgemm, precision),
            output_dtype=_output_type(fbgemm, precision),
            pooling_mode=_pooling(fbgemm, mode), device=where.device)
        stored_tables = self.module.split_embedding_weights()
        with torch.no_grad():
            for stored, weight in zip(stored_tables, weights, strict=True):
                stored.copy_(weight)  # round to nearest into fp16 (and onto the device)
        self.bytes_per_row = weights[0].shape[1] * stored_tables[0].element_size()
        self.bounds_check = fbgemm.common.BoundsCheckMode(self.module.bounds_check_mode_int).name

    def __call__(self, indices, offsets, weights=None):
        # Forward only: no autograd graph (the other impls' tables need no gradient either).
        with torch.no_grad():
            return self.module(indices, offsets, per_sample_weights=weights)


class InferenceTables:
    """Tables in one inference TBE (IntNBitTableBatchedEmbeddingBagsCodegen) where the
    placement puts them, filled with FBGEMM's own quantization of the fp32 tables (fp16, or
    row-wise int8/int4 rows that carry an fp16 scale and bias)."""

    def __init__(self, fbgemm, weights: list[torch.Tensor], precision: str, mode: str,
                 where: Placement):
        if precision not in INFERENCE_PRECISIONS:
            raise Unsupported(f"the inference TBE impl runs at {INFERENCE_PRECISIONS}")
        dim = weights[0].shape[1]
        if precision == "int4" and dim % 2:
            raise Unsupported("int4 TBE rows need an even embedding dim")
        sparse_type = _sparse_type(fbgemm, precision)
        location, _ = where.enums(fbgemm.common)  # the compute device follows `device`
        self.kind = f"IntNBitTableBatchedEmbeddingBagsCodegen ({where.label()})"
        self.module = fbgemm.inference.IntNBitTableBatchedEmbeddingBagsCodegen(
            [(f"table_{index}", weight.shape[0], weight.shape[1], sparse_type, location)
             for index, weight in enumerate(weights)],
            device=where.device, pooling_mode=_pooling(fbgemm, mode),
            output_dtype=_output_type(fbgemm, precision))
        self.module.initialize_weights()
        with warnings.catch_warnings():  # quantize_embs copy-constructs with torch.tensor()
            warnings.simplefilter("ignore", UserWarning)
            self.module.assign_embedding_weights(
                [fbgemm.quantize.quantize_embs(weight, sparse_type) for weight in weights])
        # What one stored row takes, its scale/bias and alignment padding included (rows are
        # 16-byte aligned on cuda, unpadded on the CPU).
        self.bytes_per_row = fbgemm.inference.rounded_row_size_in_bytes(
            dim, sparse_type, self.module.row_alignment, self.module.scale_bias_size_in_bytes)
        self.bounds_check = fbgemm.common.BoundsCheckMode(self.module.bounds_check_mode_int).name

    def __call__(self, indices, offsets, weights=None):
        return self.module(indices, offsets, per_sample_weights=weights)


TABLES = {"fbgemm_tbe": TrainingTables, "fbgemm_tbe_infer": InferenceTables}


# ------------------------------------------------------------------ error bounds

def tbe_quantization_error(rows64: torch.Tensor, precision: str) -> torch.Tensor:
    """Largest dequantization error of each row [rows, 1] of an int8/int4 TBE table.

    As bench.compare_outputs.quantization_error (half a step, step = (max - min) / (2^bits - 1),
    plus the scale's rounding times up to 2^bits - 1 steps and the bias's), except that TBE rows
    store the scale and the bias as fp16 for int8 too (quantize_embs rounds FBGEMM's fp32 pair):
    fp16 roundoff on both, fp16's absolute underflow (scales of large tables are subnormal there)
    on each of the 2^bits - 1 steps and the bias, fp32 roundoff of their computation, and for
    int8 the 1e-8 FBGEMM adds to the range before inverting it."""
    bits = QUANTIZED_BITS[precision]
    minimum = rows64.min(dim=1, keepdim=True).values
    maximum = rows64.max(dim=1, keepdim=True).values
    spread = maximum - minimum
    half_step = spread / (2 ** bits - 1) / 2
    parameters = (UNIT_ROUNDOFF["fp16"] + UNIT_ROUNDOFF["fp32"]) * (minimum.abs() + spread)
    underflow = 2 ** bits * UNDERFLOW["fp16"]
    epsilon = INT8_QUANTIZE_EPSILON if precision == "int8" else 0.0
    return half_step + parameters + underflow + epsilon


def tbe_lookup_bound(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                     mode: str, weights: Optional[torch.Tensor], precision: str) -> torch.Tensor:
    """Per-element bound of a TBE pooled lookup: common.lookup_bound for float tables; for
    int8/int4, pooled_lookup_bound with the TBE rows' own stored error (fp32 output roundoff,
    as the quantized branch there)."""
    if precision not in QUANTIZED_BITS:
        return lookup_bound(weight, indices, offsets, mode, weights, precision)
    indices, offsets = indices.cpu(), offsets.cpu()
    rows, positions = torch.unique(indices, return_inverse=True)
    rows64 = weight.detach()[rows.to(weight.device)].to("cpu", torch.float64)
    weights64 = None if weights is None else weights.to("cpu", torch.float64)
    stored = tbe_quantization_error(rows64, precision).expand_as(rows64)
    return pooled_lookup_bound(rows64, positions, offsets, mode, weights64, "fp32",
                               stored_error=stored)


# ------------------------------------------------------------------ inputs

def with_last_offset(indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Bag starts plus the end of the last bag: the TBE takes B + 1 offsets."""
    return torch.cat([offsets, offsets.new_tensor([indices.numel()])])


# ------------------------------------------------------------------ sls (one table)

def _build_single(context: BuildContext, impl_name: str) -> Prepared:
    where = placed(context.device, "fbgemm_gpu")
    fbgemm = _fbgemm()
    workload, device, lookup = context.workload, context.device, one_table(context)
    weight = table_weight(lookup.table, context.seed, lookup.index)
    tables = TABLES[impl_name](fbgemm, [weight], context.precision, lookup.mode, where)
    # Per-sample weights stay fp32: the TBE takes fp32 weights for every table type.
    inputs = [as_tensors(batch, device) for batch in
              rotating_table_batches(workload, lookup.index, context.seed, lookup.parts)]
    calls = [functools.partial(tables, indices, with_last_offset(indices, offsets),
                               weights if lookup.weighted else None)
             for indices, offsets, weights in inputs]
    return one_table_prepared(context, lookup, weight, calls, inputs, tables.bytes_per_row,
                              inputs[0][2].element_size(),
                              {"tbe": tables.kind, "row_bytes": tables.bytes_per_row,
                               "bounds_check": tables.bounds_check}, bound=tbe_lookup_bound)


@impl("sls", "fbgemm_tbe", TRAINING_PRECISIONS, available=FBGEMM_ON, requires=FBGEMM_PEER,
      description="FBGEMM training TBE forward (SplitTableBatchedEmbeddingBagsCodegen; CPU, "
                  "or cuda with FBGEMM's CUDA build)")
def build_sls_tbe(context: BuildContext) -> Prepared:
    """The largest table in a one-table training TBE; sum, mean, or weighted sum."""
    return _build_single(context, "fbgemm_tbe")


@impl("sls", "fbgemm_tbe_infer", INFERENCE_PRECISIONS, available=FBGEMM_ON,
      requires=FBGEMM_PEER,
      description="FBGEMM inference TBE (IntNBitTableBatchedEmbeddingBagsCodegen; CPU, or cuda "
                  "with FBGEMM's CUDA build)")
def build_sls_tbe_infer(context: BuildContext) -> Prepared:
    """The largest table in a one-table inference TBE, fp16 or row-wise int8/int4."""
    return _build_single(context, "fbgemm_tbe_infer")


# ------------------------------------------------------------------ sls_multi (every table)

def _build_multi(context: BuildContext, impl_name: str) -> Prepared:
    where = placed(context.device, "fbgemm_gpu")
    fbgemm = _fbgemm()
    weights, rotations, rotation = all_tables(context)
    tables = TABLES[impl_name](fbgemm, weights, context.precision, "sum", where)
    calls = table_major_calls(tables, rotations, context.workload.batch_size)
    return multi_prepared(context, calls, weights, rotations, rotation, tables.bytes_per_row,
                          tbe_multi_params(context.workload, tables.bytes_per_row,
                                           {"tbe": tables.kind,
                                            "bounds_check": tables.bounds_check}),
                          bound=tbe_lookup_bound)


def tbe_multi_params(workload, bytes_per_row: float, extra_params: dict) -> dict:
    """sls_multi params of a table-batched impl: its row size and the tables' bytes in it."""
    return {"table_bytes": int(workload.total_rows * bytes_per_row), "row_bytes": bytes_per_row,
            **extra_params}


@impl("sls_multi", "fbgemm_tbe", TRAINING_PRECISIONS, available=FBGEMM_ON,
      requires=FBGEMM_PEER,
      description="every table in one FBGEMM training TBE, forward (CPU, or cuda with "
                  "FBGEMM's CUDA build)")
def build_multi_tbe(context: BuildContext) -> Prepared:
    """All tables in one training TBE: one call per batch, sum pooling."""
    return _build_multi(context, "fbgemm_tbe")


@impl("sls_multi", "fbgemm_tbe_infer", INFERENCE_PRECISIONS, available=FBGEMM_ON,
      requires=FBGEMM_PEER,
      description="every table in one FBGEMM inference TBE, fp16 or row-wise int8/int4 (CPU, "
                  "or cuda with FBGEMM's CUDA build)")
def build_multi_tbe_infer(context: BuildContext) -> Prepared:
    """All tables in one inference TBE: one call per batch, sum pooling."""
    return _build_multi(context, "fbgemm_tbe_infer")
