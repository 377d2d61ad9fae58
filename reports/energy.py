"""Energy beside time: a row's joules per sample and average power, NaN where not measured."""

from __future__ import annotations

import math

import pandas as pd

from reports.values import is_positive, positive_mask

# Columns that say "not measured" where empty: a missing energy figure is never 0.
ENERGY_COLUMNS = ("joules_per_sample", "avg_power_w")
NOT_MEASURED = "not measured"


def energy_figures(rows: pd.DataFrame) -> pd.DataFrame:
    """joules_per_sample and avg_power_w of each row (NVML on a GPU, RAPL on a CPU where
    readable); anything not a positive figure becomes NaN, which tables show as not measured."""
    return pd.DataFrame({column: rows[column].where(positive_mask(rows[column]))
                         for column in ENERGY_COLUMNS}, index=rows.index)


def with_energy(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with their energy columns cleaned by energy_figures."""
    return rows.assign(**energy_figures(rows))


def row_energy(row: pd.Series) -> dict[str, float]:
    """energy_figures of one row, as {column: value or NaN}."""
    return {column: float(row[column]) if is_positive(row[column]) else math.nan
            for column in ENERGY_COLUMNS}
