"""Roofline placement of op rows: intensity, the roof each row meets, efficiency and bound."""

from __future__ import annotations

import math
from typing import Any, Mapping

import pandas as pd

from reports.footprint import working_set
from reports.order import sort_report_rows
from reports.roofs import Ceilings, compute_key
from reports.runs import measured_op_rows
from reports.values import format_bytes, is_positive


def arithmetic_intensity(flops: float, bytes_moved: float) -> float:
    """FLOP per byte, or NaN when either count is missing or zero."""
    if is_positive(flops) and is_positive(bytes_moved):
        return flops / bytes_moved
    return math.nan


def achieved_rates(row: pd.Series) -> tuple[float, float]:
    """GFLOP/s and GB/s of a row, from its columns or else from the formulas and median."""
    gflops, gbps = row["gflops"], row["gbps"]
    if not is_positive(gflops) and is_positive(row["flops"]) and is_positive(row["median_s"]):
        gflops = row["flops"] / row["median_s"] / 1e9
    if not is_positive(gbps) and is_positive(row["bytes_moved"]) and is_positive(row["median_s"]):
        gbps = row["bytes_moved"] / row["median_s"] / 1e9
    return float(gflops), float(gbps)


def classify(intensity: float, ridge: float, bytes_moved: float) -> str:
    """Memory- or compute-bound by intensity against the ridge point."""
    if math.isfinite(intensity) and math.isfinite(ridge):
        return "memory" if intensity < ridge else "compute"
    if not math.isfinite(intensity) and is_positive(bytes_moved):
        return "memory"  # moves data but does no arithmetic by formula
    return "unknown"


ABOVE_ROOF_NOTE = "above its roof: this kernel beats the run's probe beyond the probe's spread"
# Above the probe's median but not its fastest sample: the roof's own noise, not a faster kernel.
WITHIN_SPREAD_NOTE = "at its roof: above the probe's median, within the probe's own spread"


def roof_note(efficiency: float, spread: float) -> str:
    """How a row stands against its roof: above it only beyond the probe's own spread (its
    fastest sample over its median; unknown spread counts as none)."""
    if not (is_positive(efficiency) and efficiency > 1.0):
        return ""
    return WITHIN_SPREAD_NOTE if is_positive(spread) and efficiency <= spread else ABOVE_ROOF_NOTE


def roofline_record(row: pd.Series, ceilings: Ceilings) -> dict[str, Any]:
    """One op row placed under the memory roof its working set meets."""
    intensity = arithmetic_intensity(row["flops"], row["bytes_moved"])
    gflops, gbps = achieved_rates(row)
    _, roof_precision = ceilings.peak_gflops(row["precision"])
    footprint, row_size, random_rows = working_set(row)
    roof, roof_gbps, memory_spread = ceilings.roof_for(footprint, row_size, random_rows)
    attainable = (ceilings.attainable_gflops(intensity, row["precision"], roof_gbps)
                  if math.isfinite(intensity) else math.nan)
    if is_positive(attainable):
        efficiency = gflops / attainable
    elif not math.isfinite(intensity) and is_positive(roof_gbps):
        efficiency = gbps / roof_gbps
    else:
        efficiency = math.nan
    ridge = ceilings.ridge_point(row["precision"], roof_gbps)
    limit = ("compute" if is_positive(attainable) and attainable < roof_gbps * intensity
             else "memory" if is_positive(efficiency) else "")
    spread = (ceilings.spreads.get(compute_key(roof_precision), math.nan) if limit == "compute"
              else memory_spread)
    return {
        "row_id": row["row_id"], "device": row["device"], "isa": row["isa"], "op": row["op"],
        "impl": row["impl"], "workload": row["workload"], "precision": row["precision"],
        "threads": row["threads"], "batch_size": row["batch_size"], "intensity": intensity,
        "achieved_gflops": gflops, "achieved_gbps": gbps, "attainable_gflops": attainable,
        "roof_precision": roof_precision, "working_set_bytes": footprint,
        "working_set": format_bytes(footprint) if is_positive(footprint) else "",
        "roof": roof, "roof_gbps": roof_gbps, "efficiency": efficiency, "ridge": ridge,
        "probe_spread": spread, "limit": limit,
        "bound": classify(intensity, ridge, row["bytes_moved"]),
        "note": roof_note(efficiency, spread),
    }


ROOFLINE_COLUMNS = ["row_id", "device", "isa", "op", "impl", "workload", "precision", "threads",
                    "batch_size", "intensity", "achieved_gflops", "achieved_gbps",
                    "attainable_gflops", "roof_precision", "working_set_bytes", "working_set",
                    "roof", "roof_gbps", "efficiency", "probe_spread", "ridge", "limit", "bound",
                    "note"]


def roofline_table(frame: pd.DataFrame,
                   ceilings_by_group: dict[tuple[str, str], Ceilings]) -> pd.DataFrame:
    """Every measured op row whose group has ceilings, with efficiency and bound."""
    records = []
    for _, row in measured_op_rows(frame).iterrows():
        ceilings = ceilings_by_group.get((row["device"], row["isa"]))
        if ceilings is not None:
            records.append(roofline_record(row, ceilings))
    return pd.DataFrame(records, columns=ROOFLINE_COLUMNS)


def classification_table(roofline: pd.DataFrame, op_order: Mapping[str, float]) -> pd.DataFrame:
    """Memory- or compute-bound per (device, isa, op, precision)."""
    columns = ["device", "isa", "op", "precision", "roof", "intensity_min", "intensity_max",
               "ridge", "bound", "rows"]
    records = []
    keys = ["device", "isa", "op", "precision", "roof"]
    for key, rows in roofline.groupby(keys, sort=False):
        bounds = set(rows["bound"])
        records.append({
            **dict(zip(keys, key)),
            "intensity_min": rows["intensity"].min(), "intensity_max": rows["intensity"].max(),
            "ridge": rows["ridge"].iloc[0],
            "bound": bounds.pop() if len(bounds) == 1 else "mixed",
            "rows": len(rows),
        })
    table = pd.DataFrame(records, columns=columns)
    return sort_report_rows(table, op_order)
