"""The input batch types every generator and data source produces, and the seeded random streams."""

from __future__ import annotations

import dataclasses

import numpy as np


def stream(seed: int, *purpose: int) -> np.random.Generator:
    """An independent generator per (seed, purpose...) so each input is reproducible alone."""
    return np.random.default_rng(np.random.SeedSequence([seed, *purpose]))


@dataclasses.dataclass
class TableBatch:
    """One table's lookups for a batch, in EmbeddingBag layout (offsets are bag starts)."""

    indices: np.ndarray  # int64 [total lookups]
    offsets: np.ndarray  # int64 [batch_size]
    weights: np.ndarray  # float32 [total lookups], per-sample weights in [0, 1)

    @property
    def lengths(self) -> np.ndarray:
        """Lookups per bag."""
        return np.diff(np.append(self.offsets, len(self.indices)))


@dataclasses.dataclass
class Batch:
    """A DLRM input batch: dense features and one TableBatch per table."""

    dense: np.ndarray  # float32 [batch_size, num_dense]
    tables: list[TableBatch]

    @property
    def batch_size(self) -> int:
        """Samples in the batch."""
        return self.dense.shape[0]

    def head(self, samples: int) -> "Batch":
        """The first samples as a batch of their own (views of this batch's arrays)."""
        tables = []
        for table in self.tables:
            end = (int(table.offsets[samples]) if samples < len(table.offsets)
                   else len(table.indices))
            tables.append(TableBatch(indices=table.indices[:end],
                                     offsets=table.offsets[:samples],
                                     weights=table.weights[:end]))
        return Batch(dense=self.dense[:samples], tables=tables)
