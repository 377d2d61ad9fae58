"""All TT tables of a model in one module: stacked cores, one dedup, one bmm chain, one pool."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bench.models.ttrec.factorize import factorize_rows
from bench.models.ttrec.fused import fused_tt_rows
from bench.models.ttrec.tt_embedding import TTEmbeddingBag


class TableBatchedTTEmbeddingBag(TTEmbeddingBag):
    """T TT tables of one dim and rank as one TTEmbeddingBag over their concatenated rows.

    Core k of table t is block t of a stacked core (r_{k-1}, T * p_k, d_k, r_k), p_k the largest
    k-th row factor of any table (smaller tables leave their block's tail unused, zero). A
    global row id is table t's row start plus its local id; its digits are the local id's
    mixed-radix digits in table t's own factors, shifted by t * p_k. So one lookup of all
    tables is one torch.unique (or one cache read), K gathers, one bmm chain and one
    embedding_bag, whatever T is. The cache (if any) spans the concatenated rows: LFU keeps the
    most frequent cache_fraction of all rows, not of each table. Rows reconstruct only through
    the fused kernel.
    """

    def __init__(self, table_rows: Sequence[int], dim: int, rank: int = 16, num_cores: int = 3,
                 cache_fraction: float = 0.1, cache_policy: str = "lfu",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 seed: int = 0, sparse_cache_gradient: bool = False) -> None:
        if not table_rows:
            raise ValueError("give at least one table")
        factors = [factorize_rows(rows, num_cores) for rows in table_rows]
        padded = tuple(max(table[core] for table in factors) for core in range(num_cores))
        num_tables = len(table_rows)
        super().__init__(sum(table_rows), dim, rank=rank,
                         row_factors=tuple(num_tables * factor for factor in padded),
                         cache_fraction=cache_fraction, cache_policy=cache_policy, dtype=dtype,
                         device=device, seed=seed, validate_indices=False,
                         sparse_cache_gradient=sparse_cache_gradient, kernel="fused")
        self.table_rows = tuple(table_rows)
        self.table_factors = tuple(factors)
        self.padded_factors = padded
        starts = torch.tensor([0, *torch.tensor(table_rows).cumsum(0)[:-1].tolist()])
        self.register_buffer("row_starts", starts.to(self.cores[0].device), persistent=False)
        strides = [[int(torch.tensor(table[core + 1:]).prod()) for core in range(num_cores)]
                   for table in factors]
        self.register_buffer("strides", torch.tensor(strides, device=self.cores[0].device),
                             persistent=False)
        self.register_buffer("factors", torch.tensor(factors, device=self.cores[0].device),
                             persistent=False)
        self.register_buffer("block_starts", torch.tensor(padded, device=self.cores[0].device),
                             persistent=False)
        # Each table's block is drawn as that table alone would be (its own init std).
        with torch.no_grad():
            for core in self.cores:
                core.zero_()
            for table, rows in enumerate(table_rows):
                single = TTEmbeddingBag(rows, dim, rank=rank, row_factors=factors[table],
                                        cache_policy="none", dtype=dtype, seed=seed + table)
                for view, values in zip(self.table_cores(table), single.cores):
                    view.copy_(values.to(view.device))

    def table_cores(self, table: int) -> list[torch.Tensor]:
        """Views of table t's cores in the usual (r_{k-1}, n_k, d_k, r_k) layout."""
        return [core[:, table * padded:table * padded + factor]
                for core, padded, factor in zip(self.cores, self.padded_factors,
                                                self.table_factors[table])]

    def reconstruct_rows(self, row_ids: torch.Tensor) -> torch.Tensor:
        """TT rows of global row ids (row start of the table + local id)."""
        row_ids = row_ids.to(self.cores[0].device).reshape(-1).long()
        table = torch.searchsorted(self.row_starts, row_ids, right=True) - 1
        local = row_ids - self.row_starts.index_select(0, table)
        digits = (torch.div(local.unsqueeze(1), self.strides.index_select(0, table),
                            rounding_mode="floor") % self.factors.index_select(0, table)
                  + table.unsqueeze(1) * self.block_starts)
        return fused_tt_rows(list(self.cores), digits.t().contiguous())

    def forward_tables(self, indices: Sequence[torch.Tensor],
                       offsets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-table indices and bag offsets (B bags each) -> pooled [B, T, dim]."""
        if len(indices) != len(self.table_rows) or len(offsets) != len(self.table_rows):
            raise ValueError(f"give indices and offsets for each of the "
                             f"{len(self.table_rows)} tables")
        lengths = [table.numel() for table in indices]
        lookup_starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
        global_ids = torch.cat([table.reshape(-1).long() + self.row_starts[position]
                                for position, table in enumerate(indices)])
        bag_starts = torch.cat([table_offsets.long() + int(lookup_starts[position])
                                for position, table_offsets in enumerate(offsets)])
        pooled = self(global_ids, bag_starts)
        return pooled.view(len(self.table_rows), -1, self.dim).transpose(0, 1)
