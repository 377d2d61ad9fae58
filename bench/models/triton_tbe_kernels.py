"""Triton kernels of the table-batched embedding bag: pooled forward and fused exact-SGD update."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# How a row is stored: codes in the weight buffer, and for the quantized formats a (scale, bias)
# pair per row in a second buffer.
FLOAT_ROWS, INT8_ROWS, INT4_ROWS = 0, 1, 2
LOOKUP_BLOCK = 16  # lookups of one bag (or one row's segment) gathered per step


@triton.jit
def rounded_for_store(values, BF16: tl.constexpr):
    """fp32 values ready to store: for bf16, rounded to nearest even by hand (the interpreter's
    fp32 -> bf16 cast truncates, compiled kernels round: this way both round alike); other
    dtypes round in the cast at the store."""
    if BF16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return values


@triton.jit
def _row_values(weights_ptr, scale_bias_ptr, rows, lookup_mask, columns, column_mask,
                row_stride, STORAGE: tl.constexpr):
    """[lookups, columns] of the looked-up rows in fp32, dequantized; masked entries are 0."""
    mask = lookup_mask[:, None] & column_mask[None, :]
    if STORAGE == 0:
        pointers = weights_ptr + rows[:, None] * row_stride + columns[None, :]
        values = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    else:
        if STORAGE == 1:
            pointers = weights_ptr + rows[:, None] * row_stride + columns[None, :]
            codes = tl.load(pointers, mask=mask, other=0).to(tl.int32)
        else:
            # Two 4-bit codes a byte, the even column in the low nibble (FBGEMM's packing).
            pointers = weights_ptr + rows[:, None] * row_stride + (columns // 2)[None, :]
            packed = tl.load(pointers, mask=mask, other=0).to(tl.int32)
            codes = (packed >> ((columns % 2) * 4)[None, :]) & 15
        scale = tl.load(scale_bias_ptr + rows * 2, mask=lookup_mask, other=0.0).to(tl.float32)
        bias = tl.load(scale_bias_ptr + rows * 2 + 1, mask=lookup_mask,
                       other=0.0).to(tl.float32)
        values = codes.to(tl.float32) * scale[:, None] + bias[:, None]
        values = tl.where(mask, values, 0.0)
    return values


@triton.jit
def pooled_forward_kernel(weights_ptr, scale_bias_ptr, indices_ptr, offsets_ptr,
                          table_rows_ptr, sample_weights_ptr, out_ptr,
                          batch_size, dim, row_stride, out_stride,
                          STORAGE: tl.constexpr, MEAN: tl.constexpr, WEIGHTED: tl.constexpr,
                          BF16: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per bag (table-major: bag = table * batch + sample) and column block:
    out[sample, table * dim + d] = pooled rows of that table's bag, accumulated in fp32."""
    bag = tl.program_id(0)
    table = bag // batch_size
    sample = bag % batch_size
    columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    column_mask = columns < dim
    begin = tl.load(offsets_ptr + bag)
    end = tl.load(offsets_ptr + bag + 1)
    row_base = tl.load(table_rows_ptr + table)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(begin, end, BLOCK_L):
        lookups = start + tl.arange(0, BLOCK_L)
        lookup_mask = lookups < end
        rows = tl.load(indices_ptr + lookups, mask=lookup_mask, other=0) + row_base
        values = _row_values(weights_ptr, scale_bias_ptr, rows, lookup_mask, columns,
                             column_mask, row_stride, STORAGE)
        if WEIGHTED:
            coefficients = tl.load(sample_weights_ptr + lookups, mask=lookup_mask,
                                   other=0.0).to(tl.float32)
            values = values * coefficients[:, None]
        total += tl.sum(values, axis=0)
    if MEAN:
        total = total / tl.maximum(end - begin, 1).to(tl.float32)
    destination = out_ptr + sample * out_stride + table * dim + columns
    tl.store(destination, rounded_for_store(total, BF16).to(out_ptr.dtype.element_ty),
             mask=column_mask)


@triton.jit
def sgd_update_kernel(weights_ptr, grad_ptr, sorted_rows_ptr, segment_starts_ptr,
                      segment_ends_ptr, sorted_lookups_ptr, grad_starts_ptr, coefficients_ptr,
                      learning_rate, dim, row_stride,
                      BF16: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per lookup in row-sorted order (and column block); the first lookup of each
    distinct row sums the gradient of all its lookups in fp32, then applies
    weight[row] -= learning_rate * gradient in place; the others do nothing. A grid of every
    lookup needs no count of distinct rows, so no host sync; rows are distinct across the
    working programs, so no two write the same row."""
    position = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    begin = tl.load(segment_starts_ptr + position)
    first = begin == position
    end = tl.where(first, tl.load(segment_ends_ptr + position), begin)
    # Only the first program of a row touches it: the others' columns are all masked off.
    column_mask = columns < tl.where(first, dim, 0)
    row = tl.load(sorted_rows_ptr + position)
    gradient = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(begin, end, BLOCK_L):
        positions = start + tl.arange(0, BLOCK_L)
        position_mask = positions < end
        lookups = tl.load(sorted_lookups_ptr + positions, mask=position_mask, other=0)
        grad_starts = tl.load(grad_starts_ptr + lookups, mask=position_mask, other=0)
        coefficients = tl.load(coefficients_ptr + lookups, mask=position_mask, other=0.0)
        mask = position_mask[:, None] & column_mask[None, :]
        grads = tl.load(grad_ptr + grad_starts[:, None] + columns[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        gradient += tl.sum(grads * coefficients[:, None], axis=0)
    pointers = weights_ptr + row * row_stride + columns
    old = tl.load(pointers, mask=column_mask, other=0.0).to(tl.float32)
    new = old - learning_rate * gradient
    tl.store(pointers, rounded_for_store(new, BF16).to(weights_ptr.dtype.element_ty),
             mask=column_mask)


# triton.jit reads TRITON_INTERPRET when it decorates: these kernels run on CPU tensors (through
# Triton's interpreter) exactly when it was on at this module's import.
INTERPRETED = type(pooled_forward_kernel).__name__ == "InterpretedFunction"


def column_block(dim: int) -> int:
    """Columns a program covers: the whole row up to 128 (one row read per program)."""
    return min(triton.next_power_of_2(max(dim, 1)), 128)


def launch_forward(weights, scale_bias, indices, offsets, table_rows, sample_weights, out,
                   batch_size: int, dim: int, storage: int, mean: bool) -> None:
    """Pool every bag of every table into out [batch, tables * dim], one launch."""
    bags = offsets.numel() - 1
    block_d = column_block(dim)
    grid = (bags, triton.cdiv(dim, block_d))
    weighted = sample_weights is not None
    pooled_forward_kernel[grid](
        weights, scale_bias if scale_bias is not None else weights, indices, offsets,
        table_rows, sample_weights if weighted else offsets, out,
        batch_size, dim, weights.stride(0), out.stride(0),
        STORAGE=storage, MEAN=mean, WEIGHTED=weighted, BF16=out.dtype == torch.bfloat16,
        BLOCK_L=LOOKUP_BLOCK, BLOCK_D=block_d)


def launch_sgd_update(weights, grad, sorted_rows, segment_starts, segment_ends, sorted_lookups,
                      grad_starts, coefficients, learning_rate: float, dim: int) -> None:
    """Apply the summed gradient of every distinct row to weights in place, one launch."""
    block_d = column_block(dim)
    grid = (sorted_rows.numel(), triton.cdiv(dim, block_d))
    if grid[0] == 0:
        return
    sgd_update_kernel[grid](
        weights, grad, sorted_rows, segment_starts, segment_ends, sorted_lookups, grad_starts,
        coefficients, float(learning_rate), dim, weights.stride(0),
        BF16=weights.dtype == torch.bfloat16, BLOCK_L=LOOKUP_BLOCK, BLOCK_D=block_d)
