"""FC ops: one Linear layer and the workload's bottom and top MLP stacks."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from bench.compare_outputs import linear_layers_bound
from bench.models.dlrm import mlp, top_input_width
from bench.models.dlrm_reference import linear_parameters64
from bench.ops.common import FLOAT_DTYPES
from bench.references import linear_stack64
from bench.registry import BuildContext, Op, Prepared, Unsupported, impl, register_op
from workloads.generators import stream

FC_LAYERS = ("linear", "bottom_mlp", "top_mlp")


def _fc_variants(workload, options) -> list[dict]:
    return [{"layer": layer} for layer in (options.get("fc_layers") or FC_LAYERS)]


register_op(Op("fc", "fully connected layers: one Linear and the bottom/top MLP stacks",
               _fc_variants, ci=True, report_order=50))


def layer_widths(workload, layer: str) -> tuple[int, tuple[int, ...], bool]:
    """(input width, output widths, final ReLU) of an FC variant."""
    top_input = top_input_width(workload)
    if layer == "bottom_mlp":
        return workload.num_dense, workload.bottom_mlp, True
    if layer == "top_mlp":
        return top_input, workload.top_mlp, False
    if layer == "linear":
        # The top MLP's first layer, the widest GEMM of most DLRM configs.
        return top_input, workload.top_mlp[:1], False
    raise ValueError(f"unknown FC layer {layer!r}; choose from {', '.join(FC_LAYERS)}")


def quantize_int8(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every Linear (weights int8, activations quantized per call)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise Unsupported("this torch build has no fbgemm quantized engine for int8 Linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), {nn.Linear},
                                                      dtype=torch.qint8)


def at_precision(module: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """A copy of an fp32 module in the precision's execution form."""
    if precision in FLOAT_DTYPES:
        return copy.deepcopy(module).to(device=device, dtype=FLOAT_DTYPES[precision])
    if precision == "int8":
        if device.type != "cpu":
            raise Unsupported("int8 dynamic quantization of Linear runs on CPU only in PyTorch")
        return quantize_int8(module)
    raise Unsupported(f"no {precision} Linear kernel in PyTorch (int4 applies to embeddings)")


def _is_dynamic_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, torch.ao.nn.quantized.dynamic.Linear)


def stored_weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights a forward reads, as stored: float parameters and buffers, and the
    packed weights of dynamic int8 Linears (which have no parameters, so would count as 0)."""
    total = 0
    for part in module.modules():
        if _is_dynamic_quantized_linear(part):
            weight, bias = part.weight(), part.bias()
            # One fp32 scale and int32 zero point per tensor, or per output channel.
            per_channel = weight.qscheme() in (torch.per_channel_affine,
                                               torch.per_channel_symmetric)
            quantization_pairs = weight.size(0) if per_channel else 1
            total += weight.numel() * weight.element_size() + quantization_pairs * 8
            total += 0 if bias is None else bias.numel() * bias.element_size()
            continue
        tensors = list(part.parameters(recurse=False)) + list(part.buffers(recurse=False))
        total += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return total


def input_dtype(precision: str) -> torch.dtype:
    """The activation dtype fed to a module at a precision (int8 dynamic takes fp32)."""
    return FLOAT_DTYPES.get(precision, torch.float32)


def mlp_bound(module: nn.Sequential, activations: torch.Tensor, precision: str) -> torch.Tensor:
    """Per-element error bound of a Linear/ReLU stack at a precision (linear_layers_bound)."""
    layers, items = [], list(module)
    for position, layer in enumerate(items):
        if isinstance(layer, nn.Linear):
            relu = position + 1 < len(items) and isinstance(items[position + 1], nn.ReLU)
            bias = None if layer.bias is None else layer.bias.detach().double()
            layers.append((layer.weight.detach().double(), bias, relu))
    return linear_layers_bound(activations.double(), layers, precision)


# No int4: PyTorch has no int4 Linear kernel (int4 applies to the embedding tables).
@impl("fc", "torch_linear", ("fp32", "fp16", "bf16", "int8"), baseline=True,
      device_precisions={"cuda": ("fp32", "fp16", "bf16")},
      description="nn.Linear stacks (MKL fp32, oneDNN bf16/fp16, FBGEMM int8 dynamic)")
def build_fc(context: BuildContext) -> Prepared:
    """Forward of one Linear or an MLP stack on a batch of activations."""
    return build_fc_stack(context)


def build_fc_stack(context: BuildContext, prepare=None) -> Prepared:
    """build_fc, with prepare (if given) transforming the module that runs."""
    workload, device = context.workload, context.device
    width_in, widths, final_relu = layer_widths(workload, context.variant["layer"])
    reference_module = mlp(width_in, widths, final_relu, seed=context.seed)
    module = at_precision(reference_module, context.precision, device)
    if prepare is not None:
        module = prepare(module)
    batch = workload.batch_size
    activations = torch.from_numpy(
        stream(context.seed, 100).standard_normal((batch, width_in), dtype="float32"))
    inputs = activations.to(device=device, dtype=input_dtype(context.precision))
    reference_layers = linear_parameters64(reference_module)
    widths_all = (width_in,) + tuple(widths)
    # int8 dynamic quantization keeps fp32 activations between layers.
    activation_bytes = input_dtype(context.precision).itemsize

    def run():
        with torch.no_grad():
            return module(inputs)

    def reference():
        return linear_stack64(reference_layers, activations, final_relu)

    return Prepared(
        run=run, reference=reference, samples=batch,
        error_bound=lambda expected: mlp_bound(reference_module, activations, context.precision),
        flops=2.0 * batch * sum(a * b for a, b in zip(widths_all, widths_all[1:])),
        # Weights and biases once as stored (packed int8 for int8), the input, and each
        # layer's output once (written, then read by the next layer).
        bytes_moved=float(stored_weight_bytes(module) + batch * sum(widths_all) * activation_bytes),
        params={"layer": context.variant["layer"], "widths": list(widths_all)},
    )
