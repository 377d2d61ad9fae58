"""Embeddings whose tables are stored quantized, behind the float embedding modules' interface."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from bench.models.dlrm import flatten_tables

# A table's pooled lookup: (indices, bag offsets) -> [bags, dim] fp32.
PooledLookup = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class QuantizedEmbeddings(nn.Module):
    """Row-wise int8/int4 tables (built by the caller) looked up as the float modules do.

    `tables` holds one table per workload table (row_starts None, per_table layout), or one
    concatenated table with each table's first row in row_starts (batched layout). A table
    keeps its packed weight in `.weight`, which model size figures count."""

    def __init__(self, tables: Sequence[PooledLookup], row_starts: Optional[list[int]] = None):
        super().__init__()
        self.layout = "per_table" if row_starts is None else "batched"
        self.tables = list(tables)
        if row_starts is not None:
            if len(self.tables) != 1:
                raise ValueError(f"the batched layout takes one concatenated table, "
                                 f"got {len(self.tables)}")
            self.row_starts = list(row_starts)
        self.num_tables = len(self.tables) if row_starts is None else len(row_starts)

    def forward(self, indices, offsets) -> torch.Tensor:
        """Per-table inputs -> [B, T, D] (fp32)."""
        if self.layout == "per_table":
            return torch.stack([table(table_indices, table_offsets) for table, table_indices,
                                table_offsets in zip(self.tables, indices, offsets)], dim=1)
        pooled = self.tables[0](*flatten_tables(indices, offsets, self.row_starts))
        return pooled.view(self.num_tables, -1, pooled.shape[-1]).transpose(0, 1)
