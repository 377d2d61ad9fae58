"""Value helpers every report module uses: positivity masks, the geometric mean, byte sizes."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy.stats import gmean


def is_positive(value: Any) -> bool:
    """A finite number above zero."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


def positive_mask(values: pd.Series) -> pd.Series:
    """Boolean mask of the finite values above zero (safe on empty and object columns)."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    return numbers.gt(0) & np.isfinite(numbers)


def finite_mask(values: pd.Series) -> pd.Series:
    """Boolean mask of the finite values."""
    return np.isfinite(pd.to_numeric(values, errors="coerce").astype(float))


def geometric_mean(values: Iterable[Any]) -> float:
    """Geometric mean of the finite values above zero; NaN when there are none."""
    numbers = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").astype(float)
    positive = numbers[numbers.gt(0) & np.isfinite(numbers)]
    return float(gmean(positive.to_numpy())) if len(positive) else math.nan


def joined_unique(values: Any) -> str:
    """Distinct values as one comma-separated string."""
    return ", ".join(sorted({str(value) for value in values}))


def format_bytes(count: float) -> str:
    """Byte count in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.4g} {unit}"
        count /= 1024
    return f"{count:.4g} GiB"
