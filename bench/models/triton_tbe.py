"""Table-batched embedding bag on Triton: every table in one buffer, one launch per lookup, and
an exact SGD step fused into the backward (duplicate ids summed, rows updated in place)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from bench.models import triton_tbe_kernels as kernels

FLOAT_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTIZED_STORAGE = {"int8": kernels.INT8_ROWS, "int4": kernels.INT4_ROWS}
MODES = ("sum", "mean")  # weighted is a sum with per-sample weights


def quantize_rows(weight: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8/int4 codes [rows, dim or dim/2] (uint8) and (scale, bias) [rows, 2]: the
    bytes of PyTorch's embedding_bag_byte/4bit_prepack (PooledTable's format: fp32 pairs for
    int8, fp16 pairs for int4), split so each lands aligned; value = code * scale + bias."""
    rows, dim = weight.shape
    if precision == "int8":
        packed = torch.ops.quantized.embedding_bag_byte_prepack(weight.float().contiguous())
        return packed[:, :dim].contiguous(), packed[:, dim:].contiguous().view(torch.float32)
    if precision == "int4":
        if dim % 2:
            raise ValueError("int4 row-wise tables need an even embedding dim")
        packed = torch.ops.quantized.embedding_bag_4bit_prepack(weight.float().contiguous())
        width = dim // 2
        return packed[:, :width].contiguous(), packed[:, width:].contiguous().view(torch.float16)
    raise ValueError(f"no row-wise quantized format for {precision}")


def table_row_starts(weights: Sequence[torch.Tensor]) -> list[int]:
    """Where each table's rows start in the concatenated buffer."""
    starts, start = [], 0
    for weight in weights:
        starts.append(start)
        start += weight.shape[0]
    return starts


class TritonTableBatchedEmbeddingBag(torch.nn.Module):
    """Equal-dim tables stored at one precision in one buffer (rows end to end), pooled in one
    Triton launch. Input as FBGEMM's TBE takes it: indices table-major (each table's ids local
    to it), offsets [tables * batch + 1]; output [batch, tables * dim] (float tables pool into
    their own dtype, quantized ones into fp32). With a learning_rate, the output's backward
    applies the exact SGD step to the looked-up rows in place (float storage only); the
    weights are a buffer, not a parameter, so no optimizer steps them twice."""

    def __init__(self, weights: Sequence[torch.Tensor], precision: str, mode: str = "sum",
                 device: torch.device | str = "cpu", learning_rate: Optional[float] = None):
        super().__init__()
        dims = {weight.shape[1] for weight in weights}
        if len(dims) != 1:
            raise ValueError(f"tables must share one dim, got {sorted(dims)}")
        if mode not in MODES:
            raise ValueError(f"pooling mode {mode!r}: choose from {MODES} (weighted = sum with "
                             "per_sample_weights)")
        if learning_rate is not None and precision not in FLOAT_STORAGE:
            raise ValueError(f"{precision} tables are for inference: the fused SGD step updates "
                             f"{tuple(FLOAT_STORAGE)} storage")
        self.precision, self.mode, self.learning_rate = precision, mode, learning_rate
        self.num_tables, self.dim = len(weights), dims.pop()
        self.rows = [weight.shape[0] for weight in weights]
        joined = torch.cat([weight.detach().float().cpu() for weight in weights])
        if precision in FLOAT_STORAGE:
            self.storage = kernels.FLOAT_ROWS
            codes, scale_bias = joined.to(FLOAT_STORAGE[precision]), None
        elif precision in QUANTIZED_STORAGE:
            self.storage = QUANTIZED_STORAGE[precision]
            codes, scale_bias = quantize_rows(joined, precision)
        else:
            raise ValueError(f"no table storage for {precision}")
        self.register_buffer("weights", codes.to(device))
        self.register_buffer("scale_bias", None if scale_bias is None else scale_bias.to(device))
        self.register_buffer("table_rows", torch.tensor(table_row_starts(weights),
                                                        dtype=torch.int64, device=device))
        # A zero-size leaf the output hangs off when training: gives the output a grad_fn
        # without a parameter an optimizer would see.
        self._anchor = torch.zeros(0, device=device, requires_grad=True)

    @property
    def interpreted(self) -> bool:
        """True when the kernels run in Triton's interpreter (CPU tensors), not compiled."""
        return kernels.INTERPRETED

    @property
    def output_dtype(self) -> torch.dtype:
        """Float tables pool into their own dtype, quantized ones into fp32."""
        return FLOAT_STORAGE.get(self.precision, torch.float32)

    @property
    def bytes_per_row(self) -> float:
        """Bytes stored (and read per lookup) for one row, its scale and bias included."""
        row = self.weights.shape[1] * self.weights.element_size()
        if self.scale_bias is not None:
            row += 2 * self.scale_bias.element_size()
        return float(row)

    def table_weights(self) -> list[torch.Tensor]:
        """Each table's stored rows (views into the buffer; codes for quantized tables)."""
        return list(torch.split(self.weights, self.rows))

    def _check_inputs(self, indices, offsets, per_sample_weights) -> int:
        if indices.dtype != torch.int64 or offsets.dtype != torch.int64:
            raise TypeError("indices and offsets must be int64")
        bags = offsets.numel() - 1
        if bags < 0 or bags % self.num_tables:
            raise ValueError(f"offsets must hold tables * batch + 1 = k * {self.num_tables} + 1 "
                             f"entries, got {offsets.numel()}")
        if per_sample_weights is not None:
            if per_sample_weights.numel() != indices.numel():
                raise ValueError("per_sample_weights must hold one weight per index")
            if self.mode != "sum":
                raise ValueError("per_sample_weights need sum pooling (as embedding_bag's)")
        return bags // self.num_tables

    def pooled(self, indices: torch.Tensor, offsets: torch.Tensor,
               per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pooled lookup without autograd: [batch, tables * dim]."""
        batch = self._check_inputs(indices, offsets, per_sample_weights)
        out = torch.empty(batch, self.num_tables * self.dim, dtype=self.output_dtype,
                          device=self.weights.device)
        if out.numel():
            weights = (None if per_sample_weights is None
                       else per_sample_weights.to(torch.float32).contiguous())
            kernels.launch_forward(self.weights, self.scale_bias, indices.contiguous(),
                                   offsets.contiguous(), self.table_rows, weights, out,
                                   batch, self.dim, self.storage, self.mode == "mean")
        return out

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled lookup [batch, tables * dim]; differentiable (SGD fused) with a learning_rate
        under grad mode. No gradient flows to per_sample_weights."""
        if self.learning_rate is None or not torch.is_grad_enabled():
            return self.pooled(indices, offsets, per_sample_weights)
        if self._anchor.device != self.weights.device:  # .to() moves buffers, not this leaf
            self._anchor = torch.zeros(0, device=self.weights.device, requires_grad=True)
        return _FusedSGDLookup.apply(self._anchor, self, indices, offsets, per_sample_weights)

    def fused_sgd_step(self, indices: torch.Tensor, offsets: torch.Tensor,
                       grad_output: torch.Tensor,
                       per_sample_weights: Optional[torch.Tensor] = None,
                       learning_rate: Optional[float] = None) -> None:
        """weight[r] -= lr * sum over lookups of r (coefficient x its bag's output gradient),
        every looked-up row once, in place (grad_output [batch, tables * dim])."""
        learning_rate = self.learning_rate if learning_rate is None else learning_rate
        if learning_rate is None:
            raise ValueError("no learning rate: give one here or to the module")
        if self.storage != kernels.FLOAT_ROWS:
            raise ValueError(f"{self.precision} tables have no SGD step (inference formats)")
        batch = self._check_inputs(indices, offsets, per_sample_weights)
        lookups = indices.numel()
        if lookups == 0:
            return
        grad = grad_output.contiguous()
        plan = sgd_plan(indices, offsets, self.table_rows, batch, self.dim, grad.stride(0),
                        self.mode == "mean", per_sample_weights)
        kernels.launch_sgd_update(self.weights, grad, *plan, learning_rate, self.dim)


def sgd_plan(indices, offsets, table_rows, batch: int, dim: int, grad_stride: int, mean: bool,
             per_sample_weights) -> tuple[torch.Tensor, ...]:
    """The SGD kernel's inputs, by torch ops that never sync with the host (so a step can be
    captured in a CUDA graph): each lookup's global row in sorted order, where that row's run
    of lookups starts and ends there, the sorting order, each lookup's start in grad_output
    and its coefficient (its weight, 1/bag length for mean, else 1)."""
    lookups = indices.numel()
    lengths = offsets[1:] - offsets[:-1]
    bag_of_lookup = torch.repeat_interleave(torch.arange(lengths.numel(), device=indices.device),
                                            lengths, output_size=lookups)
    table_of_lookup, sample_of_lookup = bag_of_lookup // batch, bag_of_lookup % batch
    rows = indices + table_rows[table_of_lookup]
    sorted_rows, order = torch.sort(rows, stable=True)
    segment_starts = torch.searchsorted(sorted_rows, sorted_rows)
    segment_ends = torch.searchsorted(sorted_rows, sorted_rows, right=True)
    grad_starts = sample_of_lookup * grad_stride + table_of_lookup * dim
    if per_sample_weights is not None:
        coefficients = per_sample_weights.to(torch.float32)
    elif mean:
        coefficients = (1.0 / lengths.clamp(min=1).to(torch.float32))[bag_of_lookup]
    else:
        coefficients = torch.ones(lookups, dtype=torch.float32, device=indices.device)
    return (sorted_rows, segment_starts, segment_ends, order, grad_starts.contiguous(),
            coefficients.contiguous())


class _FusedSGDLookup(torch.autograd.Function):
    """Forward: the pooled lookup. Backward: the module's fused SGD step (the tables take their
    update in place; no gradient is returned for them or for the inputs)."""

    @staticmethod
    def forward(ctx, anchor, module, indices, offsets, per_sample_weights):
        ctx.module = module
        ctx.inputs = (indices, offsets, per_sample_weights)
        return module.pooled(indices, offsets, per_sample_weights)

    @staticmethod
    def backward(ctx, grad_output):
        indices, offsets, per_sample_weights = ctx.inputs
        ctx.module.fused_sgd_step(indices, offsets, grad_output, per_sample_weights)
        return None, None, None, None, None
