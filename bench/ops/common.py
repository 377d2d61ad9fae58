"""Helpers shared by op builders: dtypes, seeded weights, inputs as tensors, pooled lookups."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as functional

from bench.compare_outputs import pooled_lookup_bound, relative_error  # noqa: F401
from bench.embeddings import clear_weight_cache, huge_page_copy, table_weight  # noqa: F401
from bench.embeddings import shared_table_weight  # noqa: F401
from bench.host import FALLBACK_LLC_BYTES, available_memory_bytes, last_level_cache  # noqa: F401
from bench.host import transparent_huge_pages
from bench.models.dlrm_reference import WorkloadMemo
from bench.precisions import stored_row_bytes
from bench.registry import Unsupported
from workloads.generators import TableBatch, rotating_table_batches

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
        elif precision in ("int8", "int4"):
            if device.type != "cpu":
                raise Unsupported(f"{precision} row-wise embedding bags are CPU-only in PyTorch "
                                  "(quantized:: ops); use fbgemm_gpu on CUDA")
            if precision == "int4" and self.dim % 2:
                raise Unsupported("int4 row-wise tables need an even embedding dim")
            prepack = (torch.ops.quantized.embedding_bag_byte_prepack if precision == "int8"
                       else torch.ops.quantized.embedding_bag_4bit_prepack)
            self.weight = prepack(weight.float().contiguous())
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
        # Chosen per call, not stored as a bound method: that would be a reference cycle,
        # and a cycle keeps the table's copy alive until the cyclic collector happens to run.
        lookup = self._float_lookup if self.precision in FLOAT_DTYPES else self._quantized_lookup
        return lookup(indices, offsets, mode, weights)

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


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a value (nested tuples and lists of tensors)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(item) for item in value)
    return 0


class InputMemo(WorkloadMemo):
    """A WorkloadMemo of a workload's inputs that a worker shares across configurations; with
    max_bytes, it also drops its oldest entries while they hold more tensor bytes than that
    together (the newest always stays). clear_shared_inputs clears every one."""

    def __init__(self, max_entries: int, max_bytes: Optional[int] = None):
        super().__init__(max_entries)
        self.max_bytes = max_bytes
        _INPUT_MEMOS.append(self)

    def get(self, workload, key, compute):
        """As WorkloadMemo.get, then bounded by bytes."""
        value = super().get(workload, key, compute)
        while (self.max_bytes is not None and len(self.entries) > 1
               and sum(tensor_bytes(item) for item in self.entries.values()) > self.max_bytes):
            self.entries.popitem(last=False)
        return value


_INPUT_MEMOS: list[InputMemo] = []


# Every impl and precision of a workload's lookup ops cycles through the same rotating batches:
# built once per worker (on the device that runs) and shared. The budget is the worker's
# allowance for rotating inputs (sweep.WORKER_BASE_BYTES): precisions that plan rotations of
# different lengths each keep theirs while it fits. Read-only: an impl that changes its inputs
# must copy them.
SHARED_ROTATIONS = InputMemo(max_entries=8, max_bytes=MAX_ROTATION_INDEX_BYTES)


def shared_rotation(workload, table_index: int, seed: int, parts: int,
                    device: torch.device) -> tuple[tuple[torch.Tensor, ...], ...]:
    """(indices, offsets, weights) on device of each of the parts rotating batches of one table
    (workloads.generators.rotating_table_batches), built once per worker: read-only."""
    key = ("rotation", table_index, seed, parts, str(device))
    return SHARED_ROTATIONS.get(workload, key, lambda: tuple(
        as_tensors(batch, device)
        for batch in rotating_table_batches(workload, table_index, seed, parts)))


def shared_rotations(workload, table_indices, seed: int, parts: int,
                     device: torch.device) -> tuple[tuple[tuple[torch.Tensor, ...], ...], ...]:
    """Per rotating batch, every listed table's (indices, offsets, weights): shared_rotation
    regrouped batch-major, kept as one entry (read-only)."""
    table_indices = tuple(table_indices)
    key = ("rotations", table_indices, seed, parts, str(device))

    def build():
        per_table = [tuple(as_tensors(batch, device) for batch in
                           rotating_table_batches(workload, index, seed, parts))
                     for index in table_indices]
        return tuple(tuple(batches[part] for batches in per_table) for part in range(parts))

    return SHARED_ROTATIONS.get(workload, key, build)


def clear_shared_inputs() -> None:
    """Drop the worker's shared tables and inputs (between workloads, to bound memory)."""
    clear_weight_cache()
    for memo in _INPUT_MEMOS:
        memo.clear()


# The float64 check of a lookup widens the distinct rows its batch touches (never more than the
# table holds) and compares float64 [bags, dim] arrays: output, reference, bound, error, ratio.
# Above this many bytes (a large batch over a large table) it checks a deterministic sample of
# bags instead. A fixed figure, not a share of this host's free memory: the same configuration
# then checks the same bags on every host.
CHECK_FLOAT64_BYTES = 1 << 30
CHECK_OUTPUT_COPIES = 6  # float64 [bags, dim] arrays a comparison holds at once


def check_float64_bytes(lookups: float, table_rows: int, bags: int, dim: int) -> float:
    """Float64 bytes the check of one batch holds: its distinct rows and the compared bags
    (bags: output rows of dim values, every table's counted)."""
    return (min(lookups, table_rows) + CHECK_OUTPUT_COPIES * bags) * dim * 8.0


def bag_subset(indices: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor],
               bag_ids: torch.Tensor) -> tuple:
    """The lookups of some bags only, as a batch of their own (offsets re-based, order kept)."""
    device = indices.device
    ends = torch.cat([offsets[1:], offsets.new_tensor([indices.numel()])])
    bag_ids = bag_ids.to(offsets.device)
    starts, lengths = offsets[bag_ids], ends[bag_ids] - offsets[bag_ids]
    new_offsets = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    positions = (torch.repeat_interleave(starts - new_offsets, lengths)
                 + torch.arange(total, device=offsets.device))
    positions = positions.to(device)
    return (indices[positions], new_offsets.to(offsets.device),
            None if weights is None else weights[positions])


@dataclasses.dataclass(frozen=True)
class CheckedBags:
    """Which bags of a batch the float64 check compares: all (bag_ids None) or a sample."""

    bags: int
    bag_ids: Optional[torch.Tensor] = None

    def output(self, pooled: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The checked bags of an output whose bags run along dimension dim."""
        if self.bag_ids is None:
            return pooled
        return pooled.index_select(dim, self.bag_ids.to(pooled.device))

    def checked_call(self, call: Callable[[], torch.Tensor], dim: int = 0) -> Callable:
        """The closure the check runs: call itself, or call with its output sampled."""
        if self.bag_ids is None:
            return call
        return lambda: self.output(call(), dim)

    def batch(self, indices, offsets, weights=None) -> tuple:
        """(indices, offsets, weights) of the checked bags only."""
        if self.bag_ids is None:
            return indices, offsets, weights
        return bag_subset(indices, offsets, weights, self.bag_ids)

    def metrics(self) -> dict:
        """What the row records: nothing for a full check, else how many bags of how many."""
        if self.bag_ids is None:
            return {}
        return {"checked_bags": int(self.bag_ids.numel()), "bags": self.bags,
                "check_sample": f"float64 check above {CHECK_FLOAT64_BYTES / 2**30:g} GiB: "
                                "bags spread evenly, first and last included"}


def checked_bags(bags: int, lookups: float, table_rows: int, dim: int,
                 outputs_per_bag: int = 1) -> CheckedBags:
    """All bags when the check's float64 arrays fit CHECK_FLOAT64_BYTES; otherwise as many bags
    as fit, spread evenly over the batch with the first and the last included (outputs_per_bag:
    tables pooled per bag position). A fault confined to bags the sample misses goes unseen:
    an accepted limit of checking a sample."""
    needed = check_float64_bytes(lookups, table_rows, bags * outputs_per_bag, dim)
    if needed <= CHECK_FLOAT64_BYTES or bags <= 2:
        return CheckedBags(bags)
    count = max(2, int(bags * CHECK_FLOAT64_BYTES / needed))
    positions = torch.linspace(0, bags - 1, count, dtype=torch.float64).round().long()
    return CheckedBags(bags, torch.unique(positions))
