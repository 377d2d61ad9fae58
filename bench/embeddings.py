"""Embedding tables below the models: seeded, cached table weights."""

from __future__ import annotations

import functools
import math

import torch

from workloads.specs import TableSpec


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
