"""Helpers shared by op builders: dtypes, seeded weights, inputs as tensors, pooled lookups."""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as functional

from bench.compare_outputs import pooled_lookup_bound, relative_error  # noqa: F401
from bench.registry import Unsupported
from workloads.generators import TableBatch
from workloads.specs import TableSpec

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BYTES_PER_VALUE = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
# Row-wise quantized rows carry a scale and a bias: fp32 pairs for int8, fp16 pairs for int4.
ROW_OVERHEAD_BYTES = {"int8": 8, "int4": 4}
INDEX_BYTES = 8  # int64 indices and offsets


def float_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a floating precision."""
    if precision not in FLOAT_DTYPES:
        raise Unsupported(f"{precision} has no floating dtype for this op")
    return FLOAT_DTYPES[precision]


def table_weight(table: TableSpec, seed: int, table_index: int) -> torch.Tensor:
    """A table's fp32 weights, initialised as the DLRM reference does: U(-sqrt(1/n), sqrt(1/n))."""
    return _cached_weight(table.rows, table.dim, seed, table_index).clone()


@functools.lru_cache(maxsize=64)
def _cached_weight(rows: int, dim: int, seed: int, table_index: int) -> torch.Tensor:
    # Kept once per worker: every op and precision on a workload reuses the same tables.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + table_index)
    bound = math.sqrt(1.0 / rows)
    return torch.empty(rows, dim).uniform_(-bound, bound, generator=generator)


def clear_weight_cache() -> None:
    """Drop cached tables (between workloads, to bound memory)."""
    _cached_weight.cache_clear()


def as_tensors(batch: TableBatch, device: torch.device) -> tuple[torch.Tensor, ...]:
    """indices, offsets and weights of one table's batch on a device."""
    return (torch.from_numpy(batch.indices).to(device), torch.from_numpy(batch.offsets).to(device),
            torch.from_numpy(batch.weights).to(device))


class PooledTable:
    """One embedding table stored at a precision, answering pooled (SLS) lookups."""

    def __init__(self, weight: torch.Tensor, precision: str, device: torch.device):
        self.precision = precision
        self.rows, self.dim = weight.shape
        if precision in FLOAT_DTYPES:
            self.weight = weight.to(device=device, dtype=FLOAT_DTYPES[precision])
            self._lookup = self._float_lookup
        elif precision in ("int8", "int4"):
            if device.type != "cpu":
                raise Unsupported(f"{precision} row-wise embedding bags are CPU-only in PyTorch "
                                  "(quantized:: ops); use fbgemm_gpu on CUDA")
            if precision == "int4" and self.dim % 2:
                raise Unsupported("int4 row-wise tables need an even embedding dim")
            prepack = (torch.ops.quantized.embedding_bag_byte_prepack if precision == "int8"
                       else torch.ops.quantized.embedding_bag_4bit_prepack)
            self.weight = prepack(weight.float().contiguous())
            self._lookup = self._quantized_lookup
        else:
            raise Unsupported(f"no embedding table format for {precision}")

    def _float_lookup(self, indices, offsets, mode, weights):
        if weights is not None:
            weights = weights.to(self.weight.dtype)
        return functional.embedding_bag(indices, self.weight, offsets, mode=mode,
                                        per_sample_weights=weights)

    def _quantized_lookup(self, indices, offsets, mode, weights):
        kernel = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if self.precision == "int8"
                  else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
        # The quantized kernels pool by sum only (their mode=1 is not a mean), so mean
        # divides the sums by the bag lengths: an extra pass that is part of the cost.
        pooled = kernel(self.weight, indices, offsets, False, 0, False, weights, None, False)
        if mode == "mean":
            lengths = torch.diff(offsets, append=offsets.new_tensor([indices.numel()]))
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        return pooled

    def __call__(self, indices: torch.Tensor, offsets: torch.Tensor, mode: str = "sum",
                 weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled lookup: one output row per bag."""
        return self._lookup(indices, offsets, mode, weights)

    @property
    def bytes_per_row(self) -> float:
        """Bytes read per looked-up row, including row-wise quantization parameters."""
        return self.dim * BYTES_PER_VALUE[self.precision] + ROW_OVERHEAD_BYTES.get(
            self.precision, 0)


def reference_lookup(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                     mode: str, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The float64 pooled lookup every SLS impl is checked against."""
    indices, offsets = indices.cpu(), offsets.cpu()
    # Only the rows the batch touches are widened to float64: a whole big table would not fit.
    rows, positions = torch.unique(indices, return_inverse=True)
    weight64 = weight.detach()[rows.to(weight.device)].to("cpu", torch.float64)
    weights64 = None if weights is None else weights.to("cpu", torch.float64)
    return functional.embedding_bag(positions, weight64, offsets, mode=mode,
                                    per_sample_weights=weights64)


def lookup_bytes(lookups: int, bags: int, dim: int, bytes_per_row: float, out_bytes: float,
                 weighted: bool) -> float:
    """Compulsory traffic of a pooled lookup: rows read, indices, offsets, weights, output."""
    return (lookups * (bytes_per_row + INDEX_BYTES + (4 if weighted else 0))
            + bags * (INDEX_BYTES + dim * out_bytes))


def lookup_bound(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, mode: str,
                 weights: Optional[torch.Tensor], precision: str) -> torch.Tensor:
    """Per-element error bound of a pooled lookup at a precision (see pooled_lookup_bound)."""
    indices, offsets = indices.cpu(), offsets.cpu()
    rows, positions = torch.unique(indices, return_inverse=True)
    rows64 = weight.detach()[rows.to(weight.device)].to("cpu", torch.float64)
    weights64 = None if weights is None else weights.to("cpu", torch.float64)
    return pooled_lookup_bound(rows64, positions, offsets, mode, weights64, precision)


# Timing calls a closure over and over. Replaying one batch would keep its rows cached and
# report cache bandwidth for a table far larger than the cache, so lookup ops cycle through
# distinct batches whose rows together exceed any last-level cache seen (about 100 MiB).
ROTATION_TARGET_BYTES = 512 << 20
MAX_ROTATION_BATCHES = 1024
MAX_ROTATION_INDEX_BYTES = 256 << 20  # bound the memory the rotating indices take


def rotation_count(bytes_per_call: float, lookups_per_call: int) -> int:
    """How many distinct batches to cycle through."""
    wanted = math.ceil(ROTATION_TARGET_BYTES / max(bytes_per_call, 1.0))
    by_memory = MAX_ROTATION_INDEX_BYTES // max(lookups_per_call * (INDEX_BYTES + 4), 1)
    return int(max(1, min(wanted, MAX_ROTATION_BATCHES, by_memory)))


def workload_rotation(workload, table_indices, precision: str) -> int:
    """Batches a lookup op over these tables cycles through (see rotation_count)."""
    lookups = sum(workload.tables[index].pooling.mean for index in table_indices)
    lookups_per_call = int(lookups * workload.batch_size)
    return rotation_count(lookups_per_call * workload.dim * BYTES_PER_VALUE[precision],
                          lookups_per_call)


def cycling(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """A closure that runs the next call of the list each time, round robin."""
    if len(calls) == 1:
        return calls[0]
    upcoming = itertools.cycle(calls)
    return lambda: next(upcoming)()
