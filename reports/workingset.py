"""Working-set sweeps: sls bandwidth against table footprint, its cliffs and the cache sizes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from reports.order import isa_sort_key, precision_sort_key
from reports.runs import measured_op_rows, parse_json_object
from reports.values import format_bytes, is_positive, positive_mask

# sysfs cache levels as env.json records them (bench.run.devices.cache_sizes), smallest first.
CACHE_LEVELS = (("L1d", "l1d_bytes"), ("L2", "l2_bytes"), ("L3", "l3_bytes"))
# A fall of more than this fraction of the bandwidth between neighbouring footprints is a cliff.
CLIFF_THRESHOLD = 0.2
# Fewer table sizes than this is not a sweep: a line needs a shape for cliffs to mean anything.
MIN_SWEEP_POINTS = 3
# A cliff is attributed to the cache level nearest to it (log scale) within this factor.
MATCH_FACTOR = 4.0
# What distinguishes one line of the sweep; the table size (rows, table_bytes) is what varies.
LINE_KEYS = ["device", "isa", "threads", "impl", "precision", "mode", "dim", "pooling",
             "distribution", "batch_size"]
SWEEP_COLUMNS = LINE_KEYS + ["series", "rows", "table_bytes", "gbps", "samples_per_s",
                             "median_s", "loop_bytes"]
CLIFF_COLUMNS = ["series", "cache_level", "sysfs_size", "cliff_between", "drop", "gbps_before",
                 "gbps_after", "cliff_over_cache"]


@dataclasses.dataclass(frozen=True)
class Cliff:
    """A fall in bandwidth between two neighbouring footprints of a sweep."""

    previous_bytes: float  # last footprint before the fall
    footprint_bytes: float  # first footprint after the fall
    bandwidth_before: float
    bandwidth_after: float

    @property
    def drop(self) -> float:
        """Fraction of the bandwidth lost across the fall."""
        return 1.0 - self.bandwidth_after / self.bandwidth_before

    @property
    def centre_bytes(self) -> float:
        """Geometric middle of the fall: where the capacity edge most likely lies."""
        return math.sqrt(self.previous_bytes * self.footprint_bytes)


def detect_cliffs(sizes: Sequence[float], bandwidths: Sequence[float],
                  threshold: float = CLIFF_THRESHOLD) -> list[Cliff]:
    """Falls of more than threshold (a fraction) in bandwidth between neighbouring footprints."""
    if len(sizes) != len(bandwidths):
        raise ValueError(f"{len(sizes)} sizes but {len(bandwidths)} bandwidths")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a fraction in (0, 1), got {threshold}")
    points = pd.DataFrame({"size": np.asarray(sizes, dtype=float),
                           "bandwidth": np.asarray(bandwidths, dtype=float)})
    points = points[positive_mask(points["size"]) & positive_mask(points["bandwidth"])]
    # Repeated sizes (a resumed or repeated run) count once, at their median bandwidth.
    curve = points.groupby("size", sort=True)["bandwidth"].median()
    sizes_sorted, values = curve.index.to_numpy(), curve.to_numpy()
    return [Cliff(float(sizes_sorted[index - 1]), float(sizes_sorted[index]),
                  float(values[index - 1]), float(values[index]))
            for index in range(1, len(values))
            if values[index] < (1.0 - threshold) * values[index - 1]]


def cache_levels(env: dict[str, Any]) -> list[tuple[str, float]]:
    """(name, bytes) of every cache level env.json records, smallest first."""
    return [(name, float(env[key])) for name, key in CACHE_LEVELS if is_positive(env.get(key))]


def _params_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The sls params the sweep needs, one column each."""
    params = rows["params"].map(parse_json_object)
    return pd.DataFrame({
        "mode": params.map(lambda value: str(value.get("mode", ""))),
        "dim": params.map(lambda value: str(value.get("dim", ""))),
        "pooling": params.map(lambda value: str(value.get("pooling", ""))),
        "distribution": params.map(lambda value: str(value.get("distribution", ""))),
        "rows": pd.to_numeric(params.map(lambda value: value.get("rows")), errors="coerce"),
        "table_bytes": pd.to_numeric(params.map(lambda value: value.get("table_bytes")),
                                     errors="coerce"),
        # Runs from before lookups rotated batches replayed one: one batch per loop.
        "rotation_batches": pd.to_numeric(
            params.map(lambda value: value.get("rotation_batches", 1)), errors="coerce"),
    }, index=rows.index)


def _loop_bytes(row: pd.Series) -> float:
    """Most table bytes the timed loop touches, whatever the table: batch x pooling x row
    bytes x the distinct batches it cycles through (rotation_batches)."""
    try:
        lookups = row["batch_size"] * int(row["pooling"])
    except ValueError:
        return math.nan  # drawn pooling: no fixed number of lookups per call
    batches = row["rotation_batches"] if is_positive(row["rotation_batches"]) else 1
    if not (is_positive(row["rows"]) and lookups > 0):
        return math.nan
    return float(lookups * batches * row["table_bytes"] / row["rows"])


def _series_labels(lines: pd.DataFrame) -> pd.Series:
    """precision and mode, preceded by every other line key that differs between lines."""
    varying = [key for key in LINE_KEYS
               if key not in ("precision", "mode") and lines[key].nunique() > 1]
    parts = [lines[key].astype(str) for key in varying + ["precision", "mode"]]
    label = parts[0]
    for part in parts[1:]:
        label = label + " " + part
    return label.str.strip()


def sweep_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """sls rows of footprint sweeps: lines with >= MIN_SWEEP_POINTS table sizes, one label each."""
    rows = measured_op_rows(frame)
    rows = rows[rows["op"] == "sls"]
    if rows.empty:
        return pd.DataFrame(columns=SWEEP_COLUMNS)
    rows = pd.concat([rows[[key for key in LINE_KEYS if key in rows.columns]
                           + ["gbps", "samples_per_s", "median_s"]], _params_frame(rows)],
                     axis=1)
    rows = rows[positive_mask(rows["table_bytes"]) & positive_mask(rows["gbps"])]
    # A resumed run may hold a size twice: the last measurement wins.
    rows = rows.drop_duplicates(LINE_KEYS + ["table_bytes"], keep="last")
    sizes = rows.groupby(LINE_KEYS)["table_bytes"].transform("nunique")
    rows = rows[sizes >= MIN_SWEEP_POINTS]
    if rows.empty:
        return pd.DataFrame(columns=SWEEP_COLUMNS)
    # Per device, only the highest ISA level and, within it, the most threads: one machine slot.
    parts = []
    for _, device_rows in rows.groupby("device", sort=True):
        top = device_rows[device_rows["isa"] == max(device_rows["isa"], key=isa_sort_key)]
        parts.append(top[top["threads"] == top["threads"].max()])
    rows = pd.concat(parts)
    rows = rows.assign(series=_series_labels(rows))
    # Row bytes are exact only as table_bytes / rows of a large table: take each line's largest.
    largest = rows.sort_values("rows").drop_duplicates("series", keep="last").set_index("series")
    rows["loop_bytes"] = rows["series"].map(largest.apply(_loop_bytes, axis=1))
    order = sorted(range(len(rows)), key=lambda index: (
        precision_sort_key(rows["precision"].iloc[index]), rows["series"].iloc[index],
        rows["table_bytes"].iloc[index]))
    return rows.iloc[order][SWEEP_COLUMNS].reset_index(drop=True)


def series_cliffs(sweep: pd.DataFrame, threshold: float = CLIFF_THRESHOLD) -> dict[str, list]:
    """Detected cliffs of each series of a sweep (GB/s against table bytes)."""
    return {series: detect_cliffs(line["table_bytes"].tolist(), line["gbps"].tolist(), threshold)
            for series, line in sweep.groupby("series", sort=False)}


def nearest_level(cliff: Cliff, levels: list[tuple[str, float]]) -> tuple[str, float] | None:
    """The cache level closest (log scale) to a cliff, if within MATCH_FACTOR of it."""
    if not levels:
        return None
    name, size = min(levels, key=lambda level: abs(math.log(cliff.centre_bytes / level[1])))
    return (name, size) if abs(math.log(cliff.centre_bytes / size)) <= math.log(MATCH_FACTOR) \
        else None


def cliffs_table(sweep: pd.DataFrame, env: dict[str, Any],
                 threshold: float = CLIFF_THRESHOLD) -> pd.DataFrame:
    """Per series: each detected cliff beside the sysfs cache level it matches (or none)."""
    levels = cache_levels(env)
    records = []
    for series, cliffs in series_cliffs(sweep, threshold).items():
        matched = set()
        for cliff in cliffs:
            level = nearest_level(cliff, levels)
            if level is not None:
                matched.add(level[0])
            records.append({
                "series": series, "cache_level": level[0] if level else "(none near)",
                "sysfs_size": format_bytes(level[1]) if level else "",
                "cliff_between": f"{format_bytes(cliff.previous_bytes)} - "
                                 f"{format_bytes(cliff.footprint_bytes)}",
                "drop": cliff.drop, "gbps_before": cliff.bandwidth_before,
                "gbps_after": cliff.bandwidth_after,
                "cliff_over_cache": cliff.centre_bytes / level[1] if level else math.nan,
            })
        for name, size in levels:
            if name not in matched:
                records.append({"series": series, "cache_level": name,
                                "sysfs_size": format_bytes(size),
                                "cliff_between": "no cliff detected", "drop": math.nan,
                                "gbps_before": math.nan, "gbps_after": math.nan,
                                "cliff_over_cache": math.nan})
    table = pd.DataFrame(records, columns=CLIFF_COLUMNS)
    if table.empty:
        return table
    # Series keep the sweep's order (widest precision first); levels go smallest first.
    series_rank = {name: index for index, name in enumerate(dict.fromkeys(sweep["series"]))}
    level_rank = {name: index for index, (name, _) in enumerate(CACHE_LEVELS)}
    return (table.assign(_series=table["series"].map(series_rank),
                         _level=table["cache_level"].map(level_rank).fillna(len(level_rank)))
            .sort_values(["_series", "_level"], kind="stable")
            .drop(columns=["_series", "_level"]).reset_index(drop=True))


SIMULATED_COLUMNS = ["op", "impl", "workload", "precision", "params", "instructions",
                     "d1_misses_simulated", "ll_misses_simulated", "d1_misses_per_kinstr",
                     "ll_bytes_simulated"]


def simulated_misses_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows counted with --cache-sim: callgrind's SIMULATED data-cache misses per call."""
    if "d1_misses_simulated" not in frame:
        return pd.DataFrame(columns=SIMULATED_COLUMNS)
    rows = frame[(frame["status"] == "ok")
                 & np.isfinite(frame["d1_misses_simulated"].to_numpy(dtype=float))].copy()
    if rows.empty:
        return pd.DataFrame(columns=SIMULATED_COLUMNS)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows["d1_misses_per_kinstr"] = 1000 * rows["d1_misses_simulated"] / rows["instructions"]
    # A last-level miss moves one 64-byte line from memory in the simulation.
    rows["ll_bytes_simulated"] = [format_bytes(64 * misses)
                                  for misses in rows["ll_misses_simulated"]]
    return rows[SIMULATED_COLUMNS].reset_index(drop=True)
