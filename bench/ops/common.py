"""Helpers shared by op builders: dtypes, seeded weights, inputs as tensors, pooled lookups."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as functional

from bench.compare_outputs import pooled_lookup_bound, relative_error  # noqa: F401
from bench.embeddings import clear_weight_cache, huge_page_copy, table_weight  # noqa: F401
from bench.host import FALLBACK_LLC_BYTES, available_memory_bytes, last_level_cache  # noqa: F401
from bench.host import transparent_huge_pages
from bench.precisions import stored_row_bytes
from bench.registry import Unsupported
from workloads.generators import TableBatch

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INDEX_BYTES = 8  # int64 indices and offsets


def float_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a floating precision."""
    if precision not in FLOAT_DTYPES:
        raise Unsupported(f"{precision} has no floating dtype for this op")
    return FLOAT_DTYPES[precision]


def as_tensors(batch: TableBatch, device: torch.device) -> tuple[torch.Tensor, ...]:
    """indices, offsets and weights of one table's batch on a device."""
    return (torch.from_numpy(batch.indices).to(device), torch.from_numpy(batch.offsets).to(device),
            torch.from_numpy(batch.weights).to(device))


def require_huge_pages(device: torch.device) -> None:
    """Refuse (Unsupported, with the fix) where tables cannot be put in transparent huge pages."""
    if device.type != "cpu":
        raise Unsupported("transparent huge pages are host memory: this impl is CPU-only")
    mode = transparent_huge_pages()
    if mode not in ("always", "madvise"):
        raise Unsupported(f"transparent huge pages are {mode!r} on this host; enable them with "
                          "`echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled`")


class PooledTable:
    """One embedding table stored at a precision, answering pooled (SLS) lookups."""

    def __init__(self, weight: torch.Tensor, precision: str, device: torch.device,
                 huge_pages: bool = False):
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
        self.huge_page_bytes = 0
        if huge_pages:
            require_huge_pages(device)
            self.weight, self.huge_page_bytes = huge_page_copy(self.weight)

    @property
    def huge_page_fraction(self) -> float:
        """Share of the stored table the kernel backs by transparent huge pages."""
        return self.huge_page_bytes / max(1, self.weight.numel() * self.weight.element_size())

    @property
    def sample_weight_dtype(self) -> torch.dtype:
        """The dtype of per-sample weights this table's lookup takes (quantized: fp32)."""
        return self.weight.dtype if self.precision in FLOAT_DTYPES else torch.float32

    def with_sample_weights(self, indices, offsets, weights):
        """The inputs with per-sample weights in the dtype this table's lookup takes."""
        return indices, offsets, weights.to(self.sample_weight_dtype)

    def _float_lookup(self, indices, offsets, mode, weights):
        if weights is not None and weights.dtype != self.weight.dtype:
            raise TypeError(f"per-sample weights are {weights.dtype}, the table "
                            f"{self.weight.dtype}: cast them at build (with_sample_weights)")
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
        return stored_row_bytes(self.dim, self.precision)


def lookup_bytes(lookups: int, bags: int, dim: int, bytes_per_row: float, out_bytes: float,
                 weight_bytes: float = 0.0) -> float:
    """Compulsory traffic of a pooled lookup: rows read, indices, offsets, per-sample weights
    (weight_bytes each; 0 when unweighted), output."""
    return (lookups * (bytes_per_row + INDEX_BYTES + weight_bytes)
            + bags * (INDEX_BYTES + dim * out_bytes))


def mean_lookups(batches_indices) -> float:
    """Mean lookups per call over the batches a closure cycles through."""
    counts = [indices.numel() for indices in batches_indices]
    return sum(counts) / len(counts)


def lookup_bound(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, mode: str,
                 weights: Optional[torch.Tensor], precision: str) -> torch.Tensor:
    """Per-element error bound of a pooled lookup at a precision (see pooled_lookup_bound)."""
    indices, offsets = indices.cpu(), offsets.cpu()
    rows, positions = torch.unique(indices, return_inverse=True)
    rows64 = weight.detach()[rows.to(weight.device)].to("cpu", torch.float64)
    weights64 = None if weights is None else weights.to("cpu", torch.float64)
    return pooled_lookup_bound(rows64, positions, offsets, mode, weights64, precision)


# Timing calls a closure over and over. Replaying one batch would keep its rows cached and
# report cache bandwidth for a table far larger than the cache, so ops cycle through distinct
# batches whose looked-up rows together exceed this host's last-level cache several times over.
ROTATION_LLC_MULTIPLE = 4
# Never below the fixed target this suite used before sizing from the host: sysfs in a VM can
# under-report, and non-inclusive L2s add to what the LLC alone holds.
MIN_ROTATION_TARGET_BYTES = 512 << 20
# Rotating inputs and probe buffers may take at most this share of the memory available.
MAX_MEMORY_FRACTION = 0.25
MAX_ROTATION_BATCHES = 1024
MAX_ROTATION_INDEX_BYTES = 256 << 20  # bound the memory the rotating indices take
# Whole-model batches are generated (and, for training, teacher-labelled) one at a time.
MAX_ROTATION_MODEL_BATCHES = 256


def _power_of_two_at_least(value: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(value, 1.0))))


def _power_of_two_at_most(value: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(value, 1.0))))


def beyond_cache_bytes(buffers: int = 1) -> int:
    """A probe buffer size no cache level of this host holds: the power of two at or above
    ROTATION_LLC_MULTIPLE x the LLC, unless `buffers` of them would take more than
    MAX_MEMORY_FRACTION of the available memory (then the largest power of two that fits).
    Powers of two keep the size, a row parameter, the same from run to run."""
    llc_bytes, _ = last_level_cache()
    wanted = _power_of_two_at_least(max(ROTATION_LLC_MULTIPLE * llc_bytes,
                                        MIN_ROTATION_TARGET_BYTES))
    affordable = available_memory_bytes() * MAX_MEMORY_FRACTION / max(buffers, 1)
    return wanted if wanted <= affordable else _power_of_two_at_most(affordable)


def rotation_target() -> dict:
    """The rotation goal on this host and what it rests on (recorded in every rotating row)."""
    llc_bytes, source = last_level_cache()
    return {"llc_bytes": llc_bytes, "llc_source": source,
            "rotation_target_bytes": max(ROTATION_LLC_MULTIPLE * llc_bytes,
                                         MIN_ROTATION_TARGET_BYTES)}


def rotation_plan(bytes_per_call: float, memory_per_call: float,
                  max_batches: Optional[int] = None) -> dict:
    """How many distinct batches to cycle through, and whether the caps left it short of the
    target: {"rotation_batches", "rotation_bytes", "rotation_short_of_target", ...}."""
    max_batches = MAX_ROTATION_BATCHES if max_batches is None else max_batches
    target = rotation_target()
    wanted = math.ceil(target["rotation_target_bytes"] / max(bytes_per_call, 1.0))
    affordable = available_memory_bytes() * MAX_MEMORY_FRACTION
    by_memory = int(min(MAX_ROTATION_INDEX_BYTES, affordable) // max(memory_per_call, 1.0))
    count = int(max(1, min(wanted, max_batches, by_memory)))
    plan = {**target, "rotation_batches": count,
            "rotation_bytes": int(count * bytes_per_call),
            "rotation_short_of_target": count < wanted}
    if count < wanted:
        if by_memory >= min(wanted, max_batches):
            plan["rotation_limited_by"] = "batch cap"
        elif affordable < MAX_ROTATION_INDEX_BYTES:
            plan["rotation_limited_by"] = "available memory"
        else:
            plan["rotation_limited_by"] = "input memory cap"
    return plan


def rotation_count(bytes_per_call: float, lookups_per_call: int) -> int:
    """How many distinct batches a lookup op cycles through (see rotation_plan)."""
    return rotation_plan(bytes_per_call, lookups_per_call * (INDEX_BYTES + 4))["rotation_batches"]


def rotation_metrics(plan: dict) -> dict:
    """The host-dependent rotation facts for a row's metrics (the count goes in params)."""
    return {key: value for key, value in plan.items() if key != "rotation_batches"}


def workload_rotation_plan(workload, table_indices, precision: str) -> dict:
    """The rotation of a lookup op over these tables (see rotation_plan)."""
    table_indices = list(table_indices)
    lookups = sum(workload.tables[index].pooling.mean for index in table_indices)
    lookups_per_call = int(lookups * workload.batch_size)
    bags_per_call = len(table_indices) * workload.batch_size
    row_bytes = stored_row_bytes(workload.dim, precision)
    # Each rotating batch holds int64 indices, fp32 per-sample weights and int64 offsets.
    return rotation_plan(lookups_per_call * row_bytes,
                         lookups_per_call * (INDEX_BYTES + 4) + bags_per_call * INDEX_BYTES)


def cycling(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """A closure that runs the next call of the list each time, round robin."""
    if len(calls) == 1:
        return calls[0]
    upcoming = itertools.cycle(calls)
    return lambda: next(upcoming)()
