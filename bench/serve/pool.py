"""The rows a serving worker answers queries from, and the model batch of any set of pieces."""

from __future__ import annotations

import torch

from bench.models.dlrm import batch_tensors
from workloads.generators import make_batch

# The pool is a batch of the workload drawn at this index: clear of the rotation batches
# (1000 on), the calibration batch (10,000) and the evaluation set (20,000 on).
POOL_BATCH_INDEX = 50_000


class SamplePool:
    """Pool rows as tensors; batch(pieces) gathers the rows of consecutive windows."""

    def __init__(self, workload, seed: int, rows: int):
        dense, indices, offsets = batch_tensors(
            make_batch(workload, seed, POOL_BATCH_INDEX, batch_size=rows), torch.device("cpu"))
        self.dense = dense.float()
        self.tables = []
        for table_indices, table_offsets in zip(indices, offsets):
            ends = torch.cat([table_offsets, torch.tensor([table_indices.numel()])])
            lengths = ends[1:] - ends[:-1]
            # Tables with one pooling length for every bag gather by a reshape (2 tensor ops),
            # the others by repeat_interleave.
            fixed = int(lengths[0]) if bool((lengths == lengths[0]).all()) else 0
            grid = table_indices.view(rows, fixed) if fixed else None
            self.tables.append((table_indices, ends, lengths, fixed, grid))

    def batch(self, windows: list[tuple[int, int]]) -> tuple:
        """(dense, indices per table, offsets per table) of pool rows [start, start + items)
        of each window, in order."""
        if len(windows) == 1:
            start, items = windows[0]
            return self._window(start, items)
        rows = torch.cat([torch.arange(start, start + items) for start, items in windows])
        size = rows.numel()
        indices, offsets = [], []
        for table_indices, ends, lengths, fixed, grid in self.tables:
            if fixed:
                indices.append(grid[rows].reshape(-1))
                offsets.append(torch.arange(0, size * fixed, fixed))
                continue
            bag_lengths = lengths[rows]
            bag_offsets = torch.cumsum(bag_lengths, 0) - bag_lengths
            total = int(bag_lengths.sum())
            position = (torch.repeat_interleave(ends[rows], bag_lengths)
                        + torch.arange(total) - torch.repeat_interleave(bag_offsets, bag_lengths))
            indices.append(table_indices[position])
            offsets.append(bag_offsets)
        return self.dense[rows], indices, offsets

    def _window(self, start: int, items: int) -> tuple:
        """One window as slices (views, no copies) with offsets rebased to 0."""
        indices, offsets = [], []
        for table_indices, ends, _, _, _ in self.tables:
            first = int(ends[start])
            indices.append(table_indices[first:int(ends[start + items])])
            offsets.append(ends[start:start + items] - first)
        return self.dense[start:start + items], indices, offsets
