"""fp32 Linear layers whose forward and backward GEMMs run in oneDNN instead of MKL's sgemm."""

from __future__ import annotations

import torch
from torch import nn

ATEN = torch.ops.aten


def onednn_available() -> bool:
    """Whether this torch build carries oneDNN (mkldnn) kernels."""
    return bool(torch.backends.mkldnn.is_available())


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_dense() if tensor.is_mkldnn else tensor


class _OneDnnLinearFunction(torch.autograd.Function):
    """y = x W^T + b with the three GEMMs (forward, input and weight gradients) in oneDNN."""

    @staticmethod
    def forward(context, inputs, weight, bias):
        inputs = inputs.contiguous()
        context.save_for_backward(inputs, weight)
        context.has_bias = bias is not None
        return ATEN.mkldnn_linear(inputs.to_mkldnn(), weight, bias).to_dense()

    @staticmethod
    def backward(context, grad_output):
        inputs, weight = context.saved_tensors
        grad = grad_output.contiguous().to_mkldnn()
        grad_inputs = grad_weight = grad_bias = None
        if context.needs_input_grad[0]:
            grad_inputs = _dense(ATEN.mkldnn_linear_backward_input(list(inputs.shape), grad,
                                                                   weight))
        if context.needs_input_grad[1] or context.needs_input_grad[2]:
            grad_weight, grad_bias = ATEN.mkldnn_linear_backward_weights(
                grad, inputs.to_mkldnn(), weight, context.has_bias)
            grad_weight = _dense(grad_weight)
            grad_bias = _dense(grad_bias) if context.has_bias else None
        return grad_inputs, grad_weight, grad_bias


class OneDnnLinear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) computed by oneDNN's fp32 matmul.

    On CPUs that are not Intel's, MKL's sgemm takes its AVX2 code paths even where AVX-512 is
    there; oneDNN picks its kernels by the ISA alone. Float32 on CPU, 2-D inputs only."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 2 or inputs.dtype != torch.float32 or inputs.device.type != "cpu":
            raise TypeError(f"OneDnnLinear takes 2-D float32 CPU inputs, got {inputs.dim()}-D "
                            f"{inputs.dtype} on {inputs.device}")
        return _OneDnnLinearFunction.apply(inputs, self.weight, self.bias)


def with_onednn_linears(module: nn.Module) -> nn.Module:
    """The module with every plain nn.Linear swapped, in place, for a OneDnnLinear that holds
    the same Parameter objects (optimizers and state_dict see no change)."""
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            replacement = OneDnnLinear(child.in_features, child.out_features,
                                       bias=child.bias is not None, device="meta")
            replacement.weight, replacement.bias = child.weight, child.bias
            setattr(module, name, replacement)
        else:
            with_onednn_linears(child)
    return module
