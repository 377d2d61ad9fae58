"""Table cells as text: percentages, grouped large numbers, and markdown tables."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from reports.energy import ENERGY_COLUMNS, NOT_MEASURED

PERCENT_COLUMNS = ("efficiency", "noise", "drop")


def format_cell(value: Any, column: str) -> str:
    """Text of one table cell: percentages, grouped large numbers, 4 significant digits."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if column in ENERGY_COLUMNS and not (math.isfinite(number) and number > 0):
            return NOT_MEASURED  # a missing energy figure is never shown as 0 or blank
        if not math.isfinite(number):
            return ""
        if column in PERCENT_COLUMNS:
            return f"{number * 100:.1f}%"
        if abs(number) >= 1e4:
            return f"{number:,.0f}"
        return f"{number:.4g}"
    if value is None and column in ENERGY_COLUMNS:
        return NOT_MEASURED
    return str(value)


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every cell formatted as text."""
    formatted = {
        column: [format_cell(value, column) for value in table[column]]
        for column in table.columns
    }
    return pd.DataFrame(formatted, columns=list(table.columns))


def markdown_cell(text: str) -> str:
    """Cell text safe inside a markdown table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of the formatted cells."""
    shown = display_frame(table)
    header = "| " + " | ".join(markdown_cell(column) for column in shown.columns) + " |"
    divider = "| " + " | ".join("---" for _ in shown.columns) + " |"
    body = [
        "| " + " | ".join(markdown_cell(cell) for cell in record) + " |"
        for record in shown.itertuples(index=False)
    ]
    return "\n".join([header, divider, *body])
