"""Working-set estimates: the bytes an op row's timed loop keeps touching, from its params."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from bench.precisions import BYTES_PER_VALUE, stored_row_bytes
from reports.runs import parse_json_object
from reports.values import is_positive


def _positive(mapping: dict[str, Any], key: str) -> float:
    value = mapping.get(key)
    return float(value) if is_positive(value) else math.nan


def params_row_bytes(params: dict[str, Any], precision: str) -> float:
    """Bytes of one stored table row of a row's params (dim) at its precision."""
    dim = _positive(params, "dim")
    if not (is_positive(dim) and precision in BYTES_PER_VALUE):
        return math.nan
    return stored_row_bytes(dim, precision)


def working_set(row: pd.Series) -> tuple[float, float, bool]:
    """(bytes the timed loop keeps touching, bytes of one looked-up row, random rows?) of a row.

    Lookup ops (params carry rotation_batches) cycle through distinct batches of random rows, so
    their working set is the table; other ops touch the same bytes on every call, so theirs is
    what one call moves, unless the builder recorded working_set_bytes (params or metrics)."""
    params, metrics = parse_json_object(row["params"]), parse_json_object(row.get("metrics", ""))
    random_rows = "rotation_batches" in params
    row_size = params_row_bytes(params, str(row["precision"]))
    rows = _positive(params, "rows") if "rows" in params else _positive(params, "total_rows")
    table = _positive(params, "table_bytes")
    if is_positive(table) and is_positive(rows):
        row_size = table / rows
    recorded = _positive(params, "working_set_bytes")
    if not is_positive(recorded):
        recorded = _positive(metrics, "working_set_bytes")
    if is_positive(recorded):
        return recorded, row_size, random_rows
    if is_positive(_positive(metrics, "tt_bytes")):  # TT cores plus the hot-row cache
        cache = _positive(metrics, "cache_bytes")
        return (_positive(metrics, "tt_bytes") + (cache if is_positive(cache) else 0.0),
                row_size, random_rows)
    bytes_moved = float(row["bytes_moved"]) if is_positive(row["bytes_moved"]) else math.nan
    for candidate in (_positive(metrics, "dense_bytes"), table,
                      rows * row_size if is_positive(rows) else math.nan,
                      _positive(metrics, "model_bytes")):
        if is_positive(candidate):
            batches = _positive(params, "rotation_batches")
            if random_rows and is_positive(batches) and is_positive(bytes_moved):
                # The loop touches no more of the table than its batches read (an upper bound).
                candidate = min(candidate, bytes_moved * batches)
            return candidate, row_size, random_rows
    return bytes_moved, row_size, random_rows
