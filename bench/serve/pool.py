"""The rows a serving worker answers queries from, and the model batch of any set of pieces."""

from __future__ import annotations

import torch

from bench.models.dlrm import batch_tensors
from workloads.generators import make_batch

# The pool is a batch of the workload drawn at this index: clear of the rotation batches
# (1000 on), the calibration batch (10,000) and the evaluation set (20,000 on).
POOL_BATCH_INDEX = 50_000


class SamplePool:
    """Pool rows as tensors on the worker's device; batch(pieces) gathers the rows of
    consecutive windows there (batching on the device)."""

    def __init__(self, workload, seed: int, rows: int, device: str = "cpu"):
        self.device = torch.device(device)
        dense, indices, offsets = batch_tensors(
            make_batch(workload, seed, POOL_BATCH_INDEX, batch_size=rows), torch.device("cpu"))
        self.dense = dense.float().to(self.device)
        self.tables = []
        for table_indices, table_offsets in zip(indices, offsets):
            ends = torch.cat([table_offsets, torch.tensor([table_indices.numel()])])
            lengths = ends[1:] - ends[:-1]
            # Tables with one pooling length for every bag gather by a reshape (2 tensor ops),
            # the others by repeat_interleave.
            fixed = int(lengths[0]) if bool((lengths == lengths[0]).all()) else 0
            grid = table_indices.view(rows, fixed).to(self.device) if fixed else None
            # Host copies of the bag bounds: window bounds and gather sizes are read from them,
            # so that a batch on a GPU never waits for a device-to-host copy.
            self.tables.append((table_indices.to(self.device), ends.to(self.device),
                                lengths.to(self.device), fixed, grid, ends, lengths))

    def batch(self, windows: list[tuple[int, int]]) -> tuple:
        """(dense, indices per table, offsets per table) of pool rows [start, start + items)
        of each window, in order."""
        if len(windows) == 1:
            start, items = windows[0]
            return self._window(start, items)
        host_rows = torch.cat([torch.arange(start, start + items) for start, items in windows])
        rows = host_rows.to(self.device)
        size = rows.numel()
        indices, offsets = [], []
        for table_indices, ends, lengths, fixed, grid, _, host_lengths in self.tables:
            if fixed:
                indices.append(grid[rows].reshape(-1))
                offsets.append(torch.arange(0, size * fixed, fixed, device=self.device))
                continue
            bag_lengths = lengths[rows]
            bag_offsets = torch.cumsum(bag_lengths, 0) - bag_lengths
            total = int(host_lengths[host_rows].sum())
            position = (torch.repeat_interleave(ends[rows], bag_lengths, output_size=total)
                        + torch.arange(total, device=self.device)
                        - torch.repeat_interleave(bag_offsets, bag_lengths, output_size=total))
            indices.append(table_indices[position])
            offsets.append(bag_offsets)
        return self.dense[rows], indices, offsets

    def _window(self, start: int, items: int) -> tuple:
        """One window as slices (views, no copies) with offsets rebased to 0."""
        indices, offsets = [], []
        for table_indices, ends, _, _, _, host_ends, _ in self.tables:
            first = int(host_ends[start])
            indices.append(table_indices[first:int(host_ends[start + items])])
            offsets.append(ends[start:start + items] - first)
        return self.dense[start:start + items], indices, offsets
