"""The summary table printed at the end of a sweep (pandas, from result rows)."""

from __future__ import annotations

import json

import pandas as pd

from bench.records import STATUS_OK
from reports.energy import NOT_MEASURED
from reports.values import is_positive

# Params that tell variants of one op apart in the summary (the rest is in results.csv).
VARIANT_KEYS = ("mode", "layer", "layout", "bytes", "size")


def _variant(params: str) -> str:
    values = json.loads(params or "{}")
    return ",".join(f"{values[key]}" for key in VARIANT_KEYS if key in values)


def _energy_text(value: float) -> str:
    return f"{value:.4g}" if is_positive(value) else NOT_MEASURED


def render_summary(rows) -> str:
    """One line per measured configuration: median time, spread and throughput."""
    measured = [row for row in rows if row.status == STATUS_OK]
    if not measured:
        return "no configuration was measured"
    frame = pd.DataFrame({
        "op": [row.op for row in measured],
        "impl": [row.impl + ("*" if row.is_baseline else "") for row in measured],
        "workload": [row.workload for row in measured],
        "variant": [_variant(row.params) for row in measured],
        "prec": [row.precision for row in measured],
        "device": [row.device for row in measured],
        "isa": [row.isa for row in measured],
        "thr": [row.threads for row in measured],
        "median_ms": [row.median_s * 1e3 for row in measured],
        "iqr_%": [100 * row.iqr_s / row.median_s for row in measured],
        "samples/s": [row.samples_per_s for row in measured],
        "J/sample": [row.joules_per_sample if is_positive(row.joules_per_sample)
                     else float("nan") for row in measured],
        "GB/s": [row.gbps for row in measured],
        "GFLOP/s": [row.gflops for row in measured],
        "rel_err": [row.rel_error for row in measured],
        "auc": [row.auc for row in measured],
        "instructions": [row.instructions for row in measured],
        "D1_miss_sim": [row.d1_misses_simulated for row in measured],
        "LL_miss_sim": [row.ll_misses_simulated for row in measured],
    })
    # A --metric instructions run has counts and no times (and the reverse): show what exists.
    for column in ("median_ms", "iqr_%", "samples/s", "J/sample", "GB/s", "GFLOP/s",
                   "instructions", "D1_miss_sim", "LL_miss_sim"):
        if frame[column].isna().all():
            frame = frame.drop(columns=column)
    if frame["device"].nunique() == 1:
        frame = frame.drop(columns="device")
    if frame["isa"].nunique() == 1:
        frame = frame.drop(columns="isa")
    if frame["thr"].nunique() == 1:
        frame = frame.drop(columns="thr")
    if frame["auc"].isna().all():
        frame = frame.drop(columns="auc")
    # Energy beside samples/s where any row has it (NVML, RAPL); never 0 or blank for the rest.
    if "J/sample" in frame:
        frame["J/sample"] = frame["J/sample"].map(_energy_text)
    return frame.to_string(index=False, float_format=lambda value: f"{value:.4g}")
