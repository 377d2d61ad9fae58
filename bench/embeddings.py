"""Embedding tables below the models: seeded table weights and the float64 pooled lookup."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as functional

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
