"""The fused TT-Rec lookup on Triton: shape checks, the autograd Function and the functional bag."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch
import triton

from bench.models.ttrec import triton_tt_kernels as kernels
from bench.models.ttrec.factorize import factorize_dim, factorize_rows, full_ranks

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("sum", "mean")


def digit_strides(row_factors: Sequence[int]) -> tuple[int, int]:
    """Divisors that bring digits i_1 and i_2 of a row id down to the ones place (i_3's is 1)."""
    return row_factors[1] * row_factors[2], row_factors[2]


def _block(size: int) -> int:
    return triton.next_power_of_2(size)


def table_problem(num_rows: int, dim: int, rank: int) -> str:
    """Why a TTEmbeddingBag(num_rows, dim, rank) with its default factors cannot use the
    kernels ('' where it can): they take 3 cores whose chain fits on chip."""
    try:
        ChainShape.checked(factorize_rows(num_rows, 3), factorize_dim(dim, 3),
                           full_ranks(rank, 3)[1:-1])
    except ValueError as error:
        return str(error)
    return ""


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run on tensors of this device."""
    return device_problem(device) == ""


def device_problem(device: torch.device) -> str:
    """Why the kernels cannot run on tensors of this device ('' where they can): compiled
    kernels need cuda; on the CPU only Triton's interpreter runs them, and only when
    TRITON_INTERPRET=1 was set before this module was imported."""
    if device.type == "cuda":
        return ("the Triton TT kernels were built for the interpreter (TRITON_INTERPRET=1 at "
                "import); run without it to use cuda") if kernels.INTERPRETED else ""
    if device.type == "cpu":
        return "" if kernels.INTERPRETED else (
            "the Triton TT kernels run on cuda; on CPU only through TRITON_INTERPRET=1 set "
            "before triton is imported")
    return f"the Triton TT kernels run on cuda, not {device.type}"


@dataclasses.dataclass(frozen=True)
class ChainShape:
    """What the kernels are specialised on: three cores' row factors, dim factors, bond ranks."""

    row_factors: tuple[int, int, int]
    dims: tuple[int, int, int]
    ranks: tuple[int, int]

    @classmethod
    def of(cls, cores: Sequence[torch.Tensor]) -> "ChainShape":
        """The shape of cores (r_{k-1}, n_k, d_k, r_k); ValueError (one line) if the kernels
        cannot take them."""
        if len(cores) != 3:
            raise ValueError(f"the Triton TT kernel takes 3 cores, got {len(cores)}")
        shapes = [tuple(core.shape) for core in cores]
        if any(len(shape) != 4 for shape in shapes):
            raise ValueError(f"cores must be (r_{{k-1}}, n_k, d_k, r_k), got shapes {shapes}")
        if shapes[0][0] != 1 or shapes[2][3] != 1 or shapes[0][3] != shapes[1][0] \
                or shapes[1][3] != shapes[2][0]:
            raise ValueError(f"core ranks do not chain as 1, r_1, r_2, 1: shapes {shapes}")
        dtypes = {core.dtype for core in cores}
        if len(dtypes) != 1 or dtypes.pop() not in STORAGE_DTYPES:
            raise ValueError("the Triton TT kernel takes cores of one dtype among fp32, fp16, "
                             f"bf16, got {sorted(str(core.dtype) for core in cores)}")
        return cls.checked([shape[1] for shape in shapes], [shape[2] for shape in shapes],
                           (shapes[0][3], shapes[1][3]))

    @classmethod
    def checked(cls, row_factors: Sequence[int], dims: Sequence[int],
                ranks: Sequence[int]) -> "ChainShape":
        """The shape of three cores, ValueError if its chain would not fit on chip."""
        shape = cls(tuple(row_factors), tuple(dims), tuple(ranks))
        largest = max(shape.forward_chain_elements(), shape.backward_chain_elements())
        if largest > kernels.MAX_CHAIN_ELEMENTS:
            raise ValueError(f"ranks {shape.ranks} with dim factors {shape.dims} need a "
                             f"{largest}-element on-chip chain (the kernel's limit is "
                             f"{kernels.MAX_CHAIN_ELEMENTS}); use a lower rank")
        return shape

    @property
    def dim(self) -> int:
        """Row width, the product of the dim factors."""
        return self.dims[0] * self.dims[1] * self.dims[2]

    def digit_arguments(self) -> tuple[int, ...]:
        """The kernels' digit arguments: stride_1, stride_2, n_1, n_2, n_3."""
        return (*digit_strides(self.row_factors), *self.row_factors)

    def forward_blocks(self) -> dict:
        """Padded (power-of-two) block sizes of the forward chain."""
        return {"BLOCK_C12": _block(self.dims[0] * self.dims[1]), "BLOCK_R1": _block(self.ranks[0]),
                "BLOCK_R2": _block(self.ranks[1]), "BLOCK_D3": _block(self.dims[2])}

    def backward_blocks(self) -> dict:
        """Padded block sizes of the backward chain (it also splits j_1 from j_2)."""
        return {**self.forward_blocks(), "BLOCK_D2": _block(self.dims[1])}

    def forward_chain_elements(self) -> int:
        """Elements of the forward's largest product: [pairs, r_1, r_2] or [pairs, r_2, d_3]."""
        blocks = self.forward_blocks()
        return blocks["BLOCK_C12"] * blocks["BLOCK_R2"] * max(blocks["BLOCK_R1"],
                                                              blocks["BLOCK_D3"])

    def forward_warps(self) -> int:
        """Warps of a forward program: 8 from a 4096-element chain on, so no register spills
        (ptxas for sm_90: rank 32 at dim 128 spills at 4 warps, not at 8)."""
        return 8 if self.forward_chain_elements() >= 4096 else 4

    def backward_warps(self) -> int:
        """Warps of a backward program, by the same rule as forward_warps."""
        return 8 if self.backward_chain_elements() >= 4096 else 4

    def backward_chain_elements(self) -> int:
        """Elements of the backward's largest product: [r_1, d_2, r_2] or [d_2, r_2, d_3]."""
        blocks = self.backward_blocks()
        return blocks["BLOCK_D2"] * blocks["BLOCK_R2"] * max(blocks["BLOCK_R1"],
                                                             blocks["BLOCK_D3"])


class _TTBag(torch.autograd.Function):
    """Forward: the pooled lookup kernel. Backward: the gradient kernel; cores get dense
    gradients, the cache a dense or sparse one (hit lookups only)."""

    @staticmethod
    def forward(ctx, shape, mean, sparse_cache, indices, offsets, weights, slots, hits,
                cache_weight, *cores):
        out = torch.empty(offsets.numel() - 1, shape.dim, dtype=cores[0].dtype,
                          device=cores[0].device)
        kernels.launch_forward(cores, shape, indices, offsets, weights, slots, cache_weight,
                               hits, out, mean)
        ctx.save_for_backward(indices, offsets, weights, slots, *cores)
        ctx.shape, ctx.mean, ctx.sparse_cache = shape, mean, sparse_cache
        ctx.cache_shape = None if cache_weight is None else cache_weight.shape
        ctx.cache_dtype = None if cache_weight is None else cache_weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        indices, offsets, weights, slots, *cores = ctx.saved_tensors
        core_grads = [torch.zeros(core.shape, dtype=torch.float32, device=core.device)
                      for core in cores]
        lookup_grads = (None if slots is None else
                        torch.empty(indices.numel(), ctx.shape.dim, dtype=torch.float32,
                                    device=grad_out.device))
        kernels.launch_backward(cores, ctx.shape, indices, offsets, weights, slots,
                                grad_out.contiguous(), core_grads, lookup_grads, ctx.mean)
        cache_grad = None
        if slots is not None and ctx.needs_input_grad[8]:
            # Misses carry zero rows: sending them to slot 0 adds nothing there.
            target = slots.index_select(0, indices).long().clamp(min=0)
            values = lookup_grads.to(ctx.cache_dtype)
            if ctx.sparse_cache:
                # Slots come from the cache's own map, so the invariants hold unchecked.
                cache_grad = torch.sparse_coo_tensor(target.unsqueeze(0), values,
                                                     ctx.cache_shape, check_invariants=False)
            else:
                cache_grad = torch.zeros(ctx.cache_shape, dtype=ctx.cache_dtype,
                                         device=values.device).index_add_(0, target, values)
        return (None,) * 8 + (cache_grad, *[grad.to(core.dtype)
                                            for grad, core in zip(core_grads, cores)])


def tt_bag(cores: Sequence[torch.Tensor], indices: torch.Tensor, offsets: torch.Tensor,
           per_sample_weights: Optional[torch.Tensor] = None, mode: str = "sum",
           slot_map: Optional[torch.Tensor] = None, cache_weight: Optional[torch.Tensor] = None,
           hits: Optional[torch.Tensor] = None,
           sparse_cache_gradient: bool = False) -> torch.Tensor:
    """Pooled TT rows [bags, dim] in the cores' dtype (fp32 accumulation), one launch.

    indices are row ids in [0, prod n_k) (not checked here), offsets the bag starts (as
    embedding_bag takes them). With a cache, slot_map (int32, row -> slot or -1) and
    cache_weight [slots, dim]: a cached row is read from cache_weight instead of the cores
    and its gradient goes there only; hits (an int64 scalar), if given, counts hit lookups.
    Differentiable in the cores and cache_weight, not in per_sample_weights.
    """
    shape = ChainShape.of(cores)
    problem = device_problem(cores[0].device)
    if problem:
        raise ValueError(problem)
    if mode not in MODES:
        raise ValueError(f"pooling mode {mode!r}: choose from {MODES}")
    if (slot_map is None) != (cache_weight is None):
        raise ValueError("a cache needs both slot_map and cache_weight")
    if per_sample_weights is not None:
        if per_sample_weights.requires_grad:
            raise ValueError("the Triton TT kernel gives no gradient to per_sample_weights")
        if per_sample_weights.numel() != indices.numel():
            raise ValueError("per_sample_weights must hold one weight per index")
        per_sample_weights = per_sample_weights.reshape(-1).to(torch.float32).contiguous()
    if cache_weight is not None:
        if tuple(cache_weight.shape[1:]) != (shape.dim,):
            raise ValueError(f"cache rows must be {shape.dim} wide, got {cache_weight.shape}")
        if slot_map.dtype != torch.int32:
            raise ValueError(f"slot_map must be int32, got {slot_map.dtype}")
        if hits is None:
            hits = torch.zeros((), dtype=torch.int64, device=slot_map.device)
    indices = indices.reshape(-1).long().contiguous()
    bounds = torch.cat([offsets.reshape(-1).long(),
                        torch.full((1,), indices.numel(), dtype=torch.int64,
                                   device=indices.device)])
    cores = [core.contiguous() for core in cores]
    # The chain runs in the cores' dtype with fp32 accumulation whatever autocast says.
    with torch.autocast(device_type=cores[0].device.type, enabled=False):
        return _TTBag.apply(shape, mode == "mean", sparse_cache_gradient, indices, bounds,
                            per_sample_weights, slot_map, hits, cache_weight, *cores)


def tt_rows(cores: Sequence[torch.Tensor], row_ids: torch.Tensor) -> torch.Tensor:
    """Rows [len(row_ids), dim] from the cores alone (one-lookup bags), differentiable."""
    row_ids = row_ids.reshape(-1)
    return tt_bag(cores, row_ids, torch.arange(row_ids.numel(), device=row_ids.device))
