"""gemm_peak through nn.Linear: the compute roof must be the best GEMM the library has at a
precision, and the fc op's kernels (MKL fp32, oneDNN bf16/fp16, FBGEMM's dynamic int8 Linear)
can be far faster than torch.mm / torch._int_mm, whose bf16 and int8 paths fall back to slow
loops on a CPU without native bf16 (1.4 and 2.4 GFLOP/s against fc's 7 and 148 on a family-25
EPYC): a roof those kernels beat by 5-60x is not a roof."""

from __future__ import annotations

import torch

from bench.models.dlrm import mlp
from bench.ops.ceilings import CHECK_ROWS, square_fits, device_nominal_peak
from bench.ops.fc import at_precision, input_dtype, mlp_bound, stored_weight_bytes
from bench.models.dlrm_reference import linear_parameters64
from bench.references import linear_stack64
from bench.registry import BuildContext, Prepared, Unsupported, impl
from workloads.generators import stream


def linear_shape(variant: dict) -> tuple[int, int, int]:
    """(rows, inputs, outputs) of the variant: a square's size three times, or a model layer."""
    if "size" in variant:
        size = int(variant["size"])
        return size, size, size
    return int(variant["m"]), int(variant["k"]), int(variant["n"])


@impl("gemm_peak", "linear", ("fp32", "fp16", "bf16", "int8"), pairs=square_fits,
      device_precisions={"cuda": ("fp32", "fp16", "bf16")},
      description="one nn.Linear (no activation) at the fc op's kernels: MKL fp32, oneDNN "
                  "bf16/fp16, FBGEMM's dynamic int8 Linear; the roof is the best of both impls")
def build_linear(context: BuildContext) -> Prepared:
    """input @ weight.T + bias for the variant's shape, through the precision's Linear kernel."""
    reason = square_fits(context.variant, str(context.device), context.options)
    if reason:
        raise Unsupported(reason)
    rows, inner, columns = linear_shape(context.variant)
    reference_module = mlp(inner, (columns,), final_relu=False, seed=context.seed)
    module = at_precision(reference_module, context.precision, context.device)
    activations = torch.from_numpy(
        stream(context.seed, 101).standard_normal((rows, inner), dtype="float32"))
    inputs = activations.to(device=context.device, dtype=input_dtype(context.precision))
    checked = min(rows, CHECK_ROWS)  # a float64 8192-cube would take the host minutes
    layers = linear_parameters64(reference_module)

    def run():
        with torch.no_grad():
            return module(inputs)

    params = ({"size": rows} if "size" in context.variant
              else {"m": rows, "k": inner, "n": columns, "layer": "model"})
    return Prepared(
        run=run,
        check=lambda: run()[:checked],
        reference=lambda: linear_stack64(layers, activations[:checked], False),
        error_bound=lambda expected: mlp_bound(reference_module, activations[:checked],
                                               context.precision),
        samples=1, flops=2.0 * rows * inner * columns,
        bytes_moved=float(stored_weight_bytes(module)
                          + rows * (inner + columns) * input_dtype(context.precision).itemsize),
        params=params, metrics=device_nominal_peak(context.device, context.precision),
    )
