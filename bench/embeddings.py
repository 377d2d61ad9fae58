"""Embedding tables below the models: seeded, cached table weights."""

from __future__ import annotations

import functools
import math
import mmap
from typing import Optional, Sequence

import torch

from bench.host import huge_page_bytes
from workloads.specs import TableSpec

HUGE_PAGE_BYTES = 2 << 20  # x86-64 transparent huge pages
CPU = torch.device("cpu")


def table_weight(table: TableSpec, seed: int, table_index: int,
                 device: torch.device = CPU) -> torch.Tensor:
    """A table's fp32 weights on a device, initialised as the DLRM reference does:
    U(-sqrt(1/n), sqrt(1/n)). See fill_table_weight for where they are drawn."""
    if device.type == "cpu":
        return _cached_weight(table.rows, table.dim, seed, table_index).clone()
    return fill_table_weight(torch.empty(table.rows, table.dim, device=device), table, seed,
                             table_index)


def fill_table_weight(out: torch.Tensor, table: TableSpec, seed: int,
                      table_index: int) -> torch.Tensor:
    """Write a table's weights into out [rows, dim] (a view is fine) and return out.

    On the CPU they are the worker's cached weights (bit-identical on every CPU). On a GPU
    they are drawn there by the device's own generator from the same seed: a 97 GiB table set
    (mlperf) never passes through the host, but the values are not the CPU's (checks read
    each model's own parameters, so this changes no verdict)."""
    if out.device.type == "cpu":
        return out.copy_(_cached_weight(table.rows, table.dim, seed, table_index))
    return drawn_table_weight(out, table.rows, seed, table_index)


def drawn_table_weight(out: torch.Tensor, rows: int, seed: int, table_index: int) -> torch.Tensor:
    """Draw a table's weights into out with out's device's generator: on the CPU these are the
    cached weights' values, elsewhere that device's draw from the same seed and bounds."""
    generator = torch.Generator(device=out.device).manual_seed(_table_seed(seed, table_index))
    bound = math.sqrt(1.0 / rows)
    return out.uniform_(-bound, bound, generator=generator)


def concatenated_table_weights(tables: Sequence[TableSpec], seed: int,
                               device: torch.device = CPU) -> list[torch.Tensor]:
    """Each table's weights as consecutive row blocks of one [total rows, dim] tensor, written
    in place (see concatenated_view): a concatenated layout costs one copy, not two."""
    total = torch.empty(sum(table.rows for table in tables), tables[0].dim, device=device)
    weights = list(total.split([table.rows for table in tables]))
    for index, (table, weight) in enumerate(zip(tables, weights)):
        fill_table_weight(weight, table, seed, index)
    return weights


def concatenated_view(weights: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The one [total rows, dim] tensor whose consecutive row blocks the weights are (as
    concatenated_table_weights makes them), as a view without copying; None otherwise."""
    first = weights[0]
    offset = first.storage_offset()
    for weight in weights:
        if (not weight.is_contiguous() or weight.dim() != 2 or weight.shape[1] != first.shape[1]
                or weight.dtype != first.dtype
                or weight.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or weight.storage_offset() != offset):
            return None
        offset += weight.numel()
    rows = sum(weight.shape[0] for weight in weights)
    return first.as_strided((rows, first.shape[1]), first.stride(), first.storage_offset())


def concatenated(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tables as one [total rows, dim] tensor: a view when they already are one
    (concatenated_view), else a concatenated copy."""
    view = concatenated_view(weights)
    return view if view is not None else torch.cat(list(weights))


def shared_table_weight(table: TableSpec, seed: int, table_index: int) -> torch.Tensor:
    """The worker's cached fp32 weights of a table, not a copy: read them, never write them
    (an impl that updates its tables takes table_weight's clone)."""
    return _cached_weight(table.rows, table.dim, seed, table_index)


@functools.lru_cache(maxsize=64)
def _cached_weight(rows: int, dim: int, seed: int, table_index: int) -> torch.Tensor:
    # Kept once per worker: every op and precision on a workload reuses the same tables.
    return drawn_table_weight(torch.empty(rows, dim), rows, seed, table_index)


def _table_seed(seed: int, table_index: int) -> int:
    return seed * 1_000_003 + table_index


def clear_weight_cache() -> None:
    """Drop cached tables (between workloads, to bound memory)."""
    _cached_weight.cache_clear()


def huge_page_copy(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A copy of a CPU tensor in memory advised for transparent huge pages, and how many of its
    bytes the kernel backed by them."""
    nbytes = tensor.numel() * tensor.element_size()
    # Anonymous memory advised MADV_HUGEPAGE: with THP in "madvise" mode, torch's own
    # allocations get 4 KiB pages, and a random row of a multi-GB table costs a TLB miss.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    pad = (-raw.data_ptr()) % HUGE_PAGE_BYTES  # start on a huge-page boundary
    copy = raw[pad:pad + nbytes].view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)
    return copy, min(huge_page_bytes(copy.data_ptr()), nbytes)
