"""Uncompressed hot-row cache (LFU warm-up/populate or per-batch LRU) for TT embedding tables."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

CACHE_POLICIES = ("lfu", "lru", "none")

# Rows are reconstructed from TT cores in chunks so populating a large cache does not materialise
# a [cache_rows, r, d * r] intermediate all at once.
POPULATE_CHUNK_ROWS = 16384

RowSource = Callable[[torch.Tensor], torch.Tensor]


class RowCache(nn.Module):
    """Cache of `capacity` uncompressed rows: weight [capacity, dim] plus a dense row->slot map.

    `row_to_slot` is an int32 tensor of length num_rows holding the slot of each cached row or -1;
    `slot_to_row` is its inverse (int64, -1 for an empty slot). `weight` is a trainable
    nn.Parameter: cached rows are trained here only and are never written back to the TT cores
    (TT-Rec semantics); any (re)population overwrites them with the current core reconstruction.

    Policies:
      * "lfu": row frequencies are counted during a warm-up (`record`), then `populate` caches
        the most frequent rows (ties to the lower row id) and frees the counts. The cached set is
        static until the next populate.
      * "lru": `admit` runs once per batch before lookup: hits are marked as used, then missed rows
        are admitted into the least recently used slots that this batch did not touch, values
        reconstructed from the cores. Rows used by the current batch are never evicted by it, so
        their gradients still land on the right slot.
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        capacity: int,
        policy: str = "lfu",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if policy not in ("lfu", "lru"):
            raise ValueError(f"cache policy must be 'lfu' or 'lru', got {policy!r}")
        if not 0 < capacity <= num_rows:
            raise ValueError(f"capacity must be in [1, {num_rows}], got {capacity}")
        self.num_rows = num_rows
        self.dim = dim
        self.capacity = capacity
        self.policy = policy
        self.weight = nn.Parameter(torch.zeros(capacity, dim, dtype=dtype, device=device))
        self.register_buffer(
            "row_to_slot", torch.full((num_rows,), -1, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "slot_to_row", torch.full((capacity,), -1, dtype=torch.int64, device=device)
        )
        # LRU clock: last batch number in which each slot was used (-1 = never, evicted first).
        self.register_buffer(
            "last_used", torch.full((capacity,), -1, dtype=torch.int64, device=device)
        )
        self.register_buffer("clock", torch.zeros((), dtype=torch.int64, device=device))
        # Rows that lost their slot (FBGEMM's eviction counter): LRU victims that held a row,
        # and for LFU the cached rows a repopulation dropped (rows kept are not counted).
        self.register_buffer("evictions", torch.zeros((), dtype=torch.int64, device=device),
                             persistent=False)
        # LFU warm-up counts; allocated lazily and freed by populate() (num_rows int64 is large).
        # A (non-persistent) buffer so that module.to(device) moves pending counts too.
        self.frequencies: torch.Tensor | None
        self.register_buffer("frequencies", None, persistent=False)

    @property
    def occupied(self) -> int:
        """Return the number of filled slots."""
        return int((self.slot_to_row >= 0).sum().item())

    def slots_for(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Return the int64 slot of each row id, -1 where the row is not cached."""
        return self.row_to_slot.index_select(0, row_ids).long()

    @torch.no_grad()
    def record(self, row_ids: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Add lookup counts of row_ids (each once, or `counts` times) to the LFU frequencies."""
        if self.frequencies is None:
            self.frequencies = torch.zeros(
                self.num_rows, dtype=torch.int64, device=self.row_to_slot.device
            )
        row_ids = row_ids.reshape(-1).long()
        if counts is None:
            counts = torch.ones_like(row_ids)
        self.frequencies.index_add_(0, row_ids, counts.reshape(-1).long())

    @torch.no_grad()
    def populate(self, row_source: RowSource) -> int:
        """(Re)fill the cache from the cores; returns the number of cached rows.

        With LFU counts pending, the most frequently looked-up rows (count > 0) are selected and
        the counts are cleared; otherwise the currently cached rows are kept. Either way every
        cached value is overwritten by `row_source` (the TT reconstruction), discarding updates
        that training made to cached rows.
        """
        if self.frequencies is not None:
            # Stable sort so ties resolve to the lower row id on every device.
            order = torch.sort(self.frequencies, descending=True, stable=True).indices
            chosen = order[: self.capacity]
            chosen = chosen[self.frequencies.index_select(0, chosen) > 0]
            self.frequencies = None
            self._assign(chosen, torch.arange(chosen.numel(), device=chosen.device))
            self.last_used.fill_(-1)
            self.last_used[: chosen.numel()] = self.clock
        occupied_slots = torch.nonzero(self.slot_to_row >= 0).reshape(-1)
        self._load_values(occupied_slots, self.slot_to_row.index_select(0, occupied_slots),
                          row_source)
        return int(occupied_slots.numel())

    @torch.no_grad()
    def admit(self, row_ids: torch.Tensor, counts: torch.Tensor, row_source: RowSource) -> None:
        """LRU step for one batch of unique row ids: refresh hits, admit misses into LRU slots."""
        self.clock += 1
        slots = self.slots_for(row_ids)
        hit = slots >= 0
        self.last_used[slots[hit]] = self.clock
        missed_rows = row_ids[~hit]
        missed_counts = counts[~hit]
        if missed_rows.numel() == 0:
            return
        # Slots touched by this batch are ineligible victims; the rest go oldest first. Touched
        # slots carry the newest time stamp, so an ascending sort puts them last.
        eligible = int((self.last_used < self.clock).sum().item())
        admitted = min(eligible, int(missed_rows.numel()))
        if admitted == 0:
            return
        victims = torch.sort(self.last_used, stable=True).indices[:admitted]
        # When misses outnumber free slots, keep the rows this batch looked up most often.
        preferred = torch.sort(missed_counts, descending=True, stable=True).indices[:admitted]
        new_rows = missed_rows.index_select(0, preferred)
        self._assign(new_rows, victims)
        self.last_used[victims] = self.clock
        self._load_values(victims, new_rows, row_source)

    def _assign(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Map rows to slots, evicting whatever those slots (or, for LFU, all slots) held."""
        if self.policy == "lfu":
            evicted = self.slot_to_row[self.slot_to_row >= 0]
            self.slot_to_row.fill_(-1)
            self.evictions += (~torch.isin(evicted, rows)).sum()
        else:
            previous = self.slot_to_row.index_select(0, slots)
            evicted = previous[previous >= 0]
            self.evictions += evicted.numel()
        self.row_to_slot.index_fill_(0, evicted, -1)
        self.row_to_slot.index_copy_(0, rows, slots.to(torch.int32))
        self.slot_to_row.index_copy_(0, slots, rows)

    def _load_values(self, slots: torch.Tensor, rows: torch.Tensor, row_source: RowSource) -> None:
        """Overwrite weight[slots] with row_source(rows), chunked to bound memory."""
        for start in range(0, int(rows.numel()), POPULATE_CHUNK_ROWS):
            chunk = slice(start, start + POPULATE_CHUNK_ROWS)
            values = row_source(rows[chunk]).to(self.weight.dtype)
            self.weight.index_copy_(0, slots[chunk], values)
