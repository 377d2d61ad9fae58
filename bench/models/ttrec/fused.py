"""Fused TT row reconstruction: one autograd node whose forward and backward are bmm chains."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _gather_right(core: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
    """Core slices [B, r_{k-1}, d_k * r_k] of one core for a batch of digits."""
    left_rank, _, core_dim, right_rank = core.shape
    # One gather along the slice axis, then one copy into the batched-matmul layout.
    return core.index_select(1, digit).transpose(0, 1).reshape(-1, left_rank,
                                                               core_dim * right_rank)


class FusedTTRows(torch.autograd.Function):
    """Rows [B, prod d_k] from cores (r_{k-1}, n_k, d_k, r_k) and per-core digits [K, B].

    Forward: K gathers and K - 1 bmm (no autograd graph of small ops). Backward: for each core,
    two bmm (the slice gradient and the gradient flowing left) and one index_add_ into a dense
    core gradient, so a batch costs about 4K large kernels whatever its size.
    """

    @staticmethod
    def forward(ctx, digits: torch.Tensor, *cores: torch.Tensor) -> torch.Tensor:
        """Contract the gathered slices left to right; saves the chain for backward."""
        batch = digits.shape[1]
        first = cores[0]
        state = first.index_select(1, digits[0]).reshape(batch, first.shape[2], first.shape[3])
        states, rights = [], []
        for core, digit in zip(cores[1:], digits[1:]):
            right = _gather_right(core, digit)
            states.append(state)
            rights.append(right)
            state = torch.bmm(state, right).reshape(batch, -1, core.shape[3])
        ctx.save_for_backward(digits, *states, *rights)
        ctx.core_shapes = [core.shape for core in cores]
        return state.reshape(batch, -1)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        """Walk the chain right to left with two bmm per core, then scatter into the cores."""
        saved = ctx.saved_tensors
        num_cores = len(ctx.core_shapes)
        digits, states, rights = saved[0], saved[1:num_cores], saved[num_cores:]
        batch = grad_rows.shape[0]
        grads: list[torch.Tensor | None] = [None] * num_cores
        grad_state = grad_rows.reshape(batch, -1, 1)
        for core in range(num_cores - 1, 0, -1):
            left_rank, rows, core_dim, right_rank = ctx.core_shapes[core]
            state, right = states[core - 1], rights[core - 1]
            grad_product = grad_state.reshape(batch, state.shape[1], core_dim * right_rank)
            if ctx.needs_input_grad[core + 1]:
                grad_slices = torch.bmm(state.transpose(1, 2), grad_product)
                grad_core = grad_rows.new_zeros(ctx.core_shapes[core])
                grad_core.index_add_(1, digits[core], grad_slices.reshape(
                    batch, left_rank, core_dim, right_rank).transpose(0, 1))
                grads[core] = grad_core
            grad_state = torch.bmm(grad_product, right.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_core = grad_rows.new_zeros(ctx.core_shapes[0])
            grad_core.index_add_(1, digits[0], grad_state.reshape(1, batch, *grad_state.shape[1:]))
            grads[0] = grad_core
        return (None, *grads)


def fused_tt_rows(cores: Sequence[torch.Tensor], digits: torch.Tensor) -> torch.Tensor:
    """Rows [B, prod d_k] for digits [K, B] (i_1 first) through the fused autograd node."""
    # The chain runs in the cores' dtype: under autocast a bf16 bmm output would meet the
    # fp32 core gradients in backward's index_add_ (and the TT product is a tiny share of a step).
    with torch.autocast(device_type=cores[0].device.type, enabled=False):
        return FusedTTRows.apply(digits, *cores)


def stacked_digits(row_ids: torch.Tensor, row_factors: Sequence[int]) -> torch.Tensor:
    """Mixed-radix digits [K, B] of row ids (i_1 most significant) in two elementwise ops."""
    strides, stride = [], 1
    for factor in reversed(row_factors):
        strides.append(stride)
        stride *= factor
    device = row_ids.device
    stride_tensor = torch.tensor(strides[::-1], device=device).unsqueeze(1)
    factor_tensor = torch.tensor(list(row_factors), device=device).unsqueeze(1)
    return torch.div(row_ids.reshape(1, -1).long(), stride_tensor,
                     rounding_mode="floor") % factor_tensor
