"""Embedding tables below the models: seeded, cached table weights."""

from __future__ import annotations

import functools
import math
import mmap

import torch

from bench.host import huge_page_bytes
from workloads.specs import TableSpec

HUGE_PAGE_BYTES = 2 << 20  # x86-64 transparent huge pages


def table_weight(table: TableSpec, seed: int, table_index: int) -> torch.Tensor:
    """A table's fp32 weights, initialised as the DLRM reference does: U(-sqrt(1/n), sqrt(1/n))."""
    return _cached_weight(table.rows, table.dim, seed, table_index).clone()


def shared_table_weight(table: TableSpec, seed: int, table_index: int) -> torch.Tensor:
    """The worker's cached fp32 weights of a table, not a copy: read them, never write them
    (an impl that updates its tables takes table_weight's clone)."""
    return _cached_weight(table.rows, table.dim, seed, table_index)


@functools.lru_cache(maxsize=64)
def _cached_weight(rows: int, dim: int, seed: int, table_index: int) -> torch.Tensor:
    # Kept once per worker: every op and precision on a workload reuses the same tables.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + table_index)
    bound = math.sqrt(1.0 / rows)
    return torch.empty(rows, dim).uniform_(-bound, bound, generator=generator)


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
