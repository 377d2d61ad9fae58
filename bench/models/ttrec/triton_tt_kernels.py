"""Triton kernels of the fused TT-Rec lookup: per-lookup core chains on chip, pooled per bag."""

from __future__ import annotations

import triton
import triton.language as tl

# fp32 values ready to store (bf16 rounded to nearest even alike interpreted and compiled).
from bench.models.triton_tbe_kernels import rounded_for_store

# Elements of the largest register tensor a kernel may hold for one lookup's chain: beyond it
# the chain spills out of registers (a launch would still run, slowly), so such shapes are
# refused instead (see bench.models.ttrec.triton_tt.chain_blocks).
MAX_CHAIN_ELEMENTS = 16384
# The forward runs at most this many programs, each over a run of bags: enough to fill a GPU,
# few enough that the hit counter's one atomic per program is not a queue on one address.
MAX_FORWARD_PROGRAMS = 8192


@triton.jit
def _digits(row, stride_1, stride_2, n_1, n_2, n_3):
    """Mixed-radix digits (i_1, i_2, i_3) of a row id, i_1 the most significant."""
    return (row // stride_1) % n_1, (row // stride_2) % n_2, row % n_3


@triton.jit
def _tt_row(core1_ptr, core2_ptr, core3_ptr, row, stride_1, stride_2, n_1, n_2, n_3,
            D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, R1: tl.constexpr,
            R2: tl.constexpr, BLOCK_C12: tl.constexpr, BLOCK_R1: tl.constexpr,
            BLOCK_R2: tl.constexpr, BLOCK_D3: tl.constexpr):
    """One row as [BLOCK_C12, BLOCK_D3] fp32 (padding 0): entry (c, j_3), c = j_1 D2 + j_2, is
    sum over a, b of G1[i_1, j_1, a] G2[a, i_2, j_2, b] G3[b, i_3, j_3], in two on-chip steps."""
    i_1, i_2, i_3 = _digits(row, stride_1, stride_2, n_1, n_2, n_3)
    pairs = tl.arange(0, BLOCK_C12)
    pair_mask = pairs < D1 * D2
    left = tl.arange(0, BLOCK_R1)
    right = tl.arange(0, BLOCK_R2)
    columns = tl.arange(0, BLOCK_D3)
    # Slices gathered per (j_1, j_2) pair: G1 repeats across j_2 and G2 across j_1 (cache hits).
    first = tl.load(core1_ptr + i_1 * (D1 * R1) + (pairs // D2)[:, None] * R1 + left[None, :],
                    mask=pair_mask[:, None] & (left < R1)[None, :], other=0.0).to(tl.float32)
    second_mask = (pair_mask[:, None, None] & (left < R1)[None, :, None]
                   & (right < R2)[None, None, :])
    second = tl.load(core2_ptr + left[None, :, None] * (n_2 * D2 * R2) + i_2 * (D2 * R2)
                     + (pairs % D2)[:, None, None] * R2 + right[None, None, :],
                     mask=second_mask, other=0.0).to(tl.float32)
    partial = tl.sum(first[:, :, None] * second, axis=1)  # [pairs, R2]
    third = tl.load(core3_ptr + right[:, None] * (n_3 * D3) + i_3 * D3 + columns[None, :],
                    mask=(right < R2)[:, None] & (columns < D3)[None, :],
                    other=0.0).to(tl.float32)
    return tl.sum(partial[:, :, None] * third[None, :, :], axis=1)


@triton.jit
def tt_bag_forward_kernel(core1_ptr, core2_ptr, core3_ptr, indices_ptr, offsets_ptr,
                          weights_ptr, slots_ptr, cache_ptr, hits_ptr, out_ptr,
                          bags, bags_per_program, stride_1, stride_2, n_1, n_2, n_3,
                          D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                          R1: tl.constexpr, R2: tl.constexpr, HAS_CACHE: tl.constexpr,
                          WEIGHTED: tl.constexpr, MEAN: tl.constexpr, BF16: tl.constexpr,
                          BLOCK_C12: tl.constexpr, BLOCK_R1: tl.constexpr,
                          BLOCK_R2: tl.constexpr, BLOCK_D3: tl.constexpr):
    """One program per run of bags_per_program bags: out[bag] = pooled rows of its lookups,
    accumulated in fp32. With a cache, a lookup reads its row's slot first: a hit reads the
    cached row instead of the chain, a miss costs that one int load. Hits are counted into
    hits_ptr, one atomic per program (not per bag: one address takes every program's add)."""
    first_bag = tl.program_id(0) * bags_per_program
    last_bag = tl.minimum(first_bag + bags_per_program, bags)
    pairs = tl.arange(0, BLOCK_C12)
    columns = tl.arange(0, BLOCK_D3)
    positions = pairs[:, None] * D3 + columns[None, :]
    row_mask = (pairs < D1 * D2)[:, None] & (columns < D3)[None, :]
    hits = tl.full([], 0, tl.int64)
    for bag in range(first_bag, last_bag):
        begin = tl.load(offsets_ptr + bag)
        end = tl.load(offsets_ptr + bag + 1)
        total = tl.zeros([BLOCK_C12, BLOCK_D3], dtype=tl.float32)
        for lookup in range(begin, end):
            row = tl.load(indices_ptr + lookup)
            if HAS_CACHE:
                slot = tl.load(slots_ptr + row).to(tl.int64)
                hits += (slot >= 0).to(tl.int64)
                if slot >= 0:
                    values = tl.load(cache_ptr + slot * (D1 * D2 * D3) + positions,
                                     mask=row_mask, other=0.0).to(tl.float32)
                else:
                    values = _tt_row(core1_ptr, core2_ptr, core3_ptr, row, stride_1,
                                     stride_2, n_1, n_2, n_3, D1, D2, D3, R1, R2, BLOCK_C12,
                                     BLOCK_R1, BLOCK_R2, BLOCK_D3)
            else:
                values = _tt_row(core1_ptr, core2_ptr, core3_ptr, row, stride_1, stride_2,
                                 n_1, n_2, n_3, D1, D2, D3, R1, R2, BLOCK_C12, BLOCK_R1,
                                 BLOCK_R2, BLOCK_D3)
            if WEIGHTED:
                values = values * tl.load(weights_ptr + lookup).to(tl.float32)
            total += values
        if MEAN:
            total = total / tl.maximum(end - begin, 1).to(tl.float32)
        tl.store(out_ptr + bag * (D1 * D2 * D3) + positions,
                 rounded_for_store(total, BF16).to(out_ptr.dtype.element_ty), mask=row_mask)
    if HAS_CACHE:
        if hits > 0:
            tl.atomic_add(hits_ptr, hits, sem="relaxed")


@triton.jit
def _tt_row_backward(core1_ptr, core2_ptr, core3_ptr, grad1_ptr, grad2_ptr, grad3_ptr,
                     grad_row_ptr, coefficient, row, stride_1, stride_2, n_1, n_2, n_3,
                     D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, R1: tl.constexpr,
                     R2: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_R1: tl.constexpr,
                     BLOCK_R2: tl.constexpr, BLOCK_D3: tl.constexpr):
    """Add one lookup's slice gradients (its row's gradient coefficient * grad_row) into the
    fp32 core gradients. The j_1 loop keeps every atomic's addresses distinct within the call."""
    i_1, i_2, i_3 = _digits(row, stride_1, stride_2, n_1, n_2, n_3)
    left = tl.arange(0, BLOCK_R1)
    middle = tl.arange(0, BLOCK_D2)
    right = tl.arange(0, BLOCK_R2)
    columns = tl.arange(0, BLOCK_D3)
    second_offsets = (left[:, None, None] * (n_2 * D2 * R2) + i_2 * (D2 * R2)
                      + middle[None, :, None] * R2 + right[None, None, :])
    second_mask = ((left < R1)[:, None, None] & (middle < D2)[None, :, None]
                   & (right < R2)[None, None, :])
    second = tl.load(core2_ptr + second_offsets, mask=second_mask, other=0.0).to(tl.float32)
    third_offsets = right[:, None] * (n_3 * D3) + i_3 * D3 + columns[None, :]
    third_mask = (right < R2)[:, None] & (columns < D3)[None, :]
    third = tl.load(core3_ptr + third_offsets, mask=third_mask, other=0.0).to(tl.float32)
    grad_mask = (middle < D2)[:, None] & (columns < D3)[None, :]
    grad_second = tl.zeros([BLOCK_R1, BLOCK_D2, BLOCK_R2], dtype=tl.float32)
    grad_third = tl.zeros([BLOCK_R2, BLOCK_D3], dtype=tl.float32)
    for j_1 in tl.static_range(D1):
        first_offsets = i_1 * (D1 * R1) + j_1 * R1 + left
        first = tl.load(core1_ptr + first_offsets, mask=left < R1, other=0.0).to(tl.float32)
        # This j_1's block of the row gradient: [j_2, j_3].
        grad_part = tl.load(grad_row_ptr + (j_1 * D2 + middle[:, None]) * D3 + columns[None, :],
                            mask=grad_mask, other=0.0).to(tl.float32) * coefficient
        product = tl.sum(first[:, None, None] * second, axis=0)  # G1 G2: [j_2, b]
        grad_third += tl.sum(product[:, :, None] * grad_part[:, None, :], axis=0)
        pulled = tl.sum(grad_part[:, None, :] * third[None, :, :], axis=2)  # dRow G3^T: [j_2, b]
        grad_second += first[:, None, None] * pulled[None, :, :]
        grad_first = tl.sum(tl.sum(second * pulled[None, :, :], axis=2), axis=1)
        tl.atomic_add(grad1_ptr + first_offsets, grad_first, mask=left < R1, sem="relaxed")
    tl.atomic_add(grad2_ptr + second_offsets, grad_second, mask=second_mask, sem="relaxed")
    tl.atomic_add(grad3_ptr + third_offsets, grad_third, mask=third_mask, sem="relaxed")


@triton.jit
def tt_bag_backward_kernel(core1_ptr, core2_ptr, core3_ptr, indices_ptr, offsets_ptr,
                           weights_ptr, slots_ptr, grad_out_ptr, grad_out_stride,
                           grad1_ptr, grad2_ptr, grad3_ptr, cache_grad_ptr,
                           stride_1, stride_2, n_1, n_2, n_3,
                           D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                           R1: tl.constexpr, R2: tl.constexpr, HAS_CACHE: tl.constexpr,
                           WEIGHTED: tl.constexpr, MEAN: tl.constexpr,
                           BLOCK_C12: tl.constexpr, BLOCK_D2: tl.constexpr,
                           BLOCK_R1: tl.constexpr, BLOCK_R2: tl.constexpr,
                           BLOCK_D3: tl.constexpr):
    """One program per bag: each lookup's row gradient (its coefficient times the bag's output
    gradient) goes to its cache slot's per-lookup row (hits; misses write zeros there) or, for
    a miss or without a cache, into the core gradients by atomics."""
    bag = tl.program_id(0)
    begin = tl.load(offsets_ptr + bag)
    end = tl.load(offsets_ptr + bag + 1)
    grad_row_ptr = grad_out_ptr + bag * grad_out_stride
    scale = 1.0
    if MEAN:
        scale = 1.0 / tl.maximum(end - begin, 1).to(tl.float32)
    pairs = tl.arange(0, BLOCK_C12)
    columns = tl.arange(0, BLOCK_D3)
    positions = pairs[:, None] * D3 + columns[None, :]
    row_mask = (pairs < D1 * D2)[:, None] & (columns < D3)[None, :]
    for lookup in range(begin, end):
        row = tl.load(indices_ptr + lookup)
        coefficient = scale
        if WEIGHTED:
            coefficient = coefficient * tl.load(weights_ptr + lookup).to(tl.float32)
        if HAS_CACHE:
            slot = tl.load(slots_ptr + row)
            destination = cache_grad_ptr + lookup * (D1 * D2 * D3) + positions
            if slot >= 0:
                grad = tl.load(grad_row_ptr + positions, mask=row_mask, other=0.0)
                tl.store(destination, grad.to(tl.float32) * coefficient, mask=row_mask)
            else:
                tl.store(destination, tl.zeros([BLOCK_C12, BLOCK_D3], dtype=tl.float32),
                         mask=row_mask)
                _tt_row_backward(core1_ptr, core2_ptr, core3_ptr, grad1_ptr, grad2_ptr,
                                 grad3_ptr, grad_row_ptr, coefficient, row, stride_1, stride_2,
                                 n_1, n_2, n_3, D1, D2, D3, R1, R2, BLOCK_D2, BLOCK_R1,
                                 BLOCK_R2, BLOCK_D3)
        else:
            _tt_row_backward(core1_ptr, core2_ptr, core3_ptr, grad1_ptr, grad2_ptr, grad3_ptr,
                             grad_row_ptr, coefficient, row, stride_1, stride_2, n_1, n_2, n_3,
                             D1, D2, D3, R1, R2, BLOCK_D2, BLOCK_R1, BLOCK_R2, BLOCK_D3)


# triton.jit reads TRITON_INTERPRET when it decorates: these kernels run on CPU tensors (through
# Triton's interpreter) exactly when it was on at this module's import.
INTERPRETED = type(tt_bag_forward_kernel).__name__ == "InterpretedFunction"


def launch_forward(cores, shape, indices, offsets, weights, slots, cache, hits, out,
                   mean: bool) -> None:
    """Pool every bag into out [bags, dim], one launch; shape is a triton_tt.ChainShape."""
    bags = offsets.numel() - 1
    if bags == 0:
        return
    has_cache = slots is not None
    # Runs of bags bound the programs (and so the hit counter's atomics) at a GPU batch.
    bags_per_program = triton.cdiv(bags, MAX_FORWARD_PROGRAMS)
    tt_bag_forward_kernel[(triton.cdiv(bags, bags_per_program),)](
        *cores, indices, offsets, weights if weights is not None else offsets,
        slots if has_cache else offsets, cache if has_cache else out,
        hits if has_cache else offsets, out, bags, bags_per_program,
        *shape.digit_arguments(), *shape.dims,
        *shape.ranks, HAS_CACHE=has_cache, WEIGHTED=weights is not None, MEAN=mean,
        BF16=str(out.dtype) == "torch.bfloat16", **shape.forward_blocks(),
        num_warps=shape.forward_warps())


def launch_backward(cores, shape, indices, offsets, weights, slots, grad_out, core_grads,
                    cache_grad, mean: bool) -> None:
    """Add every lookup's gradient into core_grads (fp32, atomics) or, for cache hits, its row
    of cache_grad [lookups, dim] (fp32; misses get zero rows), one launch."""
    bags = offsets.numel() - 1
    if bags == 0:
        return
    has_cache = slots is not None
    tt_bag_backward_kernel[(bags,)](
        *cores, indices, offsets, weights if weights is not None else offsets,
        slots if has_cache else offsets, grad_out, grad_out.stride(0), *core_grads,
        cache_grad if has_cache else grad_out, *shape.digit_arguments(), *shape.dims,
        *shape.ranks, HAS_CACHE=has_cache, WEIGHTED=weights is not None, MEAN=mean,
        **shape.backward_blocks(), num_warps=shape.backward_warps())
