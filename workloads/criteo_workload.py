"""A workload whose inputs come from a real Criteo TSV file (`--workload criteo:PATH`)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from workloads.criteo import NUM_DENSE, CriteoData, read_criteo
from workloads.batches import Batch, TableBatch, stream
from workloads.presets import kaggle
from workloads.specs import PoolingDistribution, TableSpec, WorkloadSpec

_WEIGHTS_PURPOSE = 50  # a random stream for per-sample weights, distinct from the generators'


@functools.lru_cache(maxsize=2)
def load(path: str) -> CriteoData:
    """The file's arrays with contiguous ids per table (read once per process)."""
    return read_criteo(path)


def criteo_workload(path: str) -> WorkloadSpec:
    """The Kaggle DLRM shapes with one table per categorical feature, sized by the file.

    --max-rows caps tables afterwards; ids beyond a cap fold in modulo the rows, like hashing.
    """
    data = load(str(Path(path)))
    model = kaggle()
    tables = tuple(TableSpec(rows=rows, dim=model.dim, pooling=PoolingDistribution("fixed", 1.0))
                   for rows in data.table_rows)
    return WorkloadSpec(
        name=f"criteo:{Path(path).name}", tables=tables, num_dense=NUM_DENSE,
        bottom_mlp=model.bottom_mlp, top_mlp=model.top_mlp, interaction="dot",
        batch_size=min(model.batch_size, len(data.labels)),
        description=f"{len(data.labels):,} samples from {path}",
        source="Criteo TSV file with the DLRM Kaggle model shapes", data_path=str(Path(path)),
    )


def file_batch(workload: WorkloadSpec, seed: int, batch_index: int, batch_size: int) -> Batch:
    """Consecutive samples of the file (wrapping around) as a one-hot DLRM batch."""
    data = load(workload.data_path)
    count = len(data.labels)
    rows = (np.arange(batch_size) + batch_index * batch_size) % count
    offsets = np.arange(batch_size, dtype=np.int64)
    tables = []
    for table_index, table in enumerate(workload.tables):
        # A capped spec may have fewer rows than the file's ids: fold them in, as hashing does.
        indices = data.sparse[rows, table_index] % table.rows
        weights = stream(seed, _WEIGHTS_PURPOSE, table_index, batch_index).random(
            batch_size, dtype=np.float32)
        tables.append(TableBatch(indices=indices.astype(np.int64), offsets=offsets,
                                 weights=weights))
    return Batch(dense=data.dense[rows], tables=tables)
