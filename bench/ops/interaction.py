"""Interaction ops: DLRM's pairwise dot interaction and the concat variant."""

from __future__ import annotations

import copy

import torch

from bench.compare_outputs import (ACCUMULATION_ROUNDOFF, CONFIDENCE, UNDERFLOW, UNIT_ROUNDOFF,
                                   representation_roundoff, rounding_error)
from bench.models.dlrm import CatInteraction, DotInteraction
from bench.ops.common import float_dtype
from bench.precisions import BYTES_PER_VALUE
from bench.references import cat_interaction64, dot_interaction64
from bench.registry import BuildContext, Op, Prepared, impl, register_op
from workloads.generators import stream

register_op(Op("interaction", "feature interaction of the bottom-MLP output and pooled embeddings",
               lambda workload, options: [{}], ci=True, report_order=40))


def _inputs(context: BuildContext) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 bottom-MLP output [B, D] and pooled embeddings [B, T, D] for the workload."""
    workload = context.workload
    shape = (workload.batch_size, workload.num_features, workload.dim)
    features = torch.from_numpy(stream(context.seed, 200).standard_normal(shape, dtype="float32"))
    return features[:, 0, :].contiguous(), features[:, 1:, :].contiguous()


def _reference_of(module: torch.nn.Module):
    """The float64 reference by the interaction's definition (its module is never run in it)."""
    if isinstance(module, DotInteraction):
        return dot_interaction64
    if isinstance(module, CatInteraction):
        return cat_interaction64
    raise TypeError(f"no float64 reference for {type(module).__name__}")


def interaction_bound(module: torch.nn.Module, dense: torch.Tensor, pooled: torch.Tensor,
                      precision: str) -> torch.Tensor:
    """Per-element error bound of an interaction (dot products or copies of the features) at a
    precision: both factors of each product rounded on input, each by at most u x~ with
    x~ = |x| + underflow / u (independent over the dim), the output rounded once, fp32
    accumulation. The module applied to x~^2 and |x| gives sum x~_i^2 y~_i^2 and
    sum |x_i y_i| in the output's own layout (copies, as in cat, get 2 u x~)."""
    dense64, pooled64 = dense.double(), pooled.double()
    roundoff = representation_roundoff(precision)
    floor = UNDERFLOW[precision] / UNIT_ROUNDOFF[precision] if roundoff else 0.0
    squares = module((dense64.abs() + floor) ** 2, (pooled64.abs() + floor) ** 2)
    magnitude = module(dense64.abs(), pooled64.abs())
    expected = module(dense64, pooled64)
    return (CONFIDENCE * 2 * roundoff * squares.sqrt() + rounding_error(expected, precision)
            + (dense.shape[-1] + 2) * ACCUMULATION_ROUNDOFF * magnitude)


def _build(context: BuildContext, module: torch.nn.Module, flops_per_sample: float,
           output_width: int) -> Prepared:
    workload, device = context.workload, context.device
    dtype = float_dtype(context.precision)
    dense, pooled = _inputs(context)
    dense_device = dense.to(device=device, dtype=dtype)
    pooled_device = pooled.to(device=device, dtype=dtype)
    module_device = copy.deepcopy(module).to(device)
    reference = _reference_of(module)
    # The module in float64 gives only the bound's magnitudes and output layout; the
    # expected values come from the independent reference.
    module64 = module.to("cpu")
    value_bytes = BYTES_PER_VALUE[context.precision]
    batch = workload.batch_size

    def run():
        return module_device(dense_device, pooled_device)

    return Prepared(
        run=run,
        reference=lambda: reference(dense, pooled),
        error_bound=lambda expected: interaction_bound(module64, dense, pooled, context.precision),
        samples=batch,
        flops=batch * flops_per_sample,
        bytes_moved=batch * (workload.num_features * workload.dim + output_width) * value_bytes,
        params={"num_features": workload.num_features, "dim": workload.dim,
                "output_width": output_width},
    )


@impl("interaction", "dot", ("fp32", "fp16", "bf16"), baseline=True,
      description="bmm of the features with their transpose, then the lower triangle")
def build_dot(context: BuildContext) -> Prepared:
    """DLRM dot interaction."""
    workload = context.workload
    count = workload.num_features
    return _build(context, DotInteraction(count), 2.0 * count * count * workload.dim,
                  workload.dim + count * (count - 1) // 2)


@impl("interaction", "cat", ("fp32", "fp16", "bf16"),
      description="concatenation of the feature vectors (no arithmetic)")
def build_cat(context: BuildContext) -> Prepared:
    """Concat interaction."""
    workload = context.workload
    return _build(context, CatInteraction(), 0.0, workload.num_features * workload.dim)
