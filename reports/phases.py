"""Where a run's wall went: per op, the seconds its rows spent in each phase and timing's share."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import pandas as pd

from bench.records import ResultRow
from reports import order

# The ResultRow columns that split a row's wall in its worker, in the order they happen.
PHASE_COLUMNS = ("setup_s", "check_s", "reference_s", "warmup_s", "timing_s")
PHASE_NAMES = {"setup_s": "setup", "check_s": "check", "reference_s": "float64 reference",
               "warmup_s": "warm-up", "timing_s": "timing"}
ALL_OPS = "all ops"


def _with_phases(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that recorded a wall split (older schemas and skipped rows have none)."""
    if frame.empty or any(column not in frame for column in PHASE_COLUMNS):
        return frame.iloc[0:0]
    return frame[frame[list(PHASE_COLUMNS)].notna().any(axis=1)]


def phase_table(frame: pd.DataFrame, op_order: Mapping[str, float]) -> pd.DataFrame:
    """Per op (and for all ops): rows, total seconds by phase, wall_s and timing_share (the
    timed window's part of the rows' wall). Error rows count: their wall was spent too."""
    rows = _with_phases(frame)
    if rows.empty:
        return pd.DataFrame()
    phases = rows[["op", *PHASE_COLUMNS]].fillna({column: 0.0 for column in PHASE_COLUMNS})
    table = phases.groupby("op", sort=False)[list(PHASE_COLUMNS)].sum()
    table.insert(0, "rows", phases.groupby("op", sort=False).size())
    table = table.loc[order.sorted_ops(table.index, op_order)]
    table.loc[ALL_OPS] = table.sum()
    table["rows"] = table["rows"].astype(int)
    table["wall_s"] = table[list(PHASE_COLUMNS)].sum(axis=1)
    table["timing_share"] = table["timing_s"] / table["wall_s"].where(table["wall_s"] > 0)
    return table.reset_index().rename(columns={"index": "op"}).round(
        {**{column: 2 for column in (*PHASE_COLUMNS, "wall_s")}, "timing_share": 3})


def timing_share_line(rows: Iterable[ResultRow]) -> str:
    """One line for the end of a sweep: the rows' wall in their workers and each phase's share
    ('' when no row recorded a split)."""
    totals = dict.fromkeys(PHASE_COLUMNS, 0.0)
    counted = 0
    for row in rows:
        values = [getattr(row, column) for column in PHASE_COLUMNS]
        if all(math.isnan(value) for value in values):
            continue
        counted += 1
        for column, value in zip(PHASE_COLUMNS, values):
            totals[column] += 0.0 if math.isnan(value) else value
    wall_s = sum(totals.values())
    if not counted or wall_s <= 0:
        return ""
    shares = ", ".join(f"{PHASE_NAMES[column]} {100 * totals[column] / wall_s:.0f}%"
                       for column in PHASE_COLUMNS if column != "timing_s")
    return (f"timing took {100 * totals['timing_s'] / wall_s:.0f}% of the {wall_s:.1f} s the "
            f"workers spent on {counted} rows ({shares}; worker start-up not included)")
