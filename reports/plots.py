"""Report figures of op rows: throughput, ISA and thread speed-ups, latency, precision,
comparison, working set and locality (the roofline figure is reports.roofline_plot)."""

from __future__ import annotations

import math
from typing import Mapping

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.records import decode_samples
from reports.canvas import NoData, log_scale, marker_for, op_colors, panel_grid
from reports.order import isa_sort_key, precision_sort_key, sorted_ops
from reports.runs import measured_op_rows
from reports.tables import sample_label, throughput_metric
from reports.values import finite_mask, format_bytes, geometric_mean, is_positive, positive_mask
from reports.workingset import cache_levels

# The (workload, params, batch size) that makes one problem of an op.
PROBLEM_KEYS = ["workload", "params", "batch_size"]


def series_label(rows: pd.DataFrame) -> pd.Series:
    """Impl name, with the device when the rows span several devices."""
    if rows["device"].nunique() > 1:
        return rows["impl"] + " @ " + rows["device"]
    return rows["impl"].copy()


def reference_problem(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of the most-measured problem (workload, params, batch size) of an op."""
    counts = rows.groupby(PROBLEM_KEYS, sort=True).size()
    workload, params, batch_size = counts.idxmax()
    mask = ((rows["workload"] == workload) & (rows["params"] == params)
            & (rows["batch_size"] == batch_size))
    return rows[mask]


def problem_title(op: str, rows: pd.DataFrame) -> str:
    """Panel title naming the op and its problem."""
    workload = rows["workload"].iloc[0] or "default workload"
    batch_size = int(rows["batch_size"].iloc[0])
    return f"{op}: {workload}" + (f", batch {batch_size}" if batch_size else "")


def top_isa(values: pd.Series) -> str:
    """The highest ISA level among values."""
    return max(values.unique(), key=isa_sort_key)


def at_top_configuration(rows: pd.DataFrame) -> pd.DataFrame:
    """Per device, rows at the highest ISA level and, within it, the most threads."""
    parts = []
    for _, device_rows in rows.groupby("device", sort=True):
        at_isa = device_rows[device_rows["isa"] == top_isa(device_rows["isa"])]
        parts.append(at_isa[at_isa["threads"] == at_isa["threads"].max()])
    return pd.concat(parts)


def widest_sweep(rows: pd.DataFrame, fixed: str, swept: str) -> pd.DataFrame:
    """Per device, rows at the value of `fixed` that saw the most values of `swept`."""
    parts = []
    for _, device_rows in rows.groupby("device", sort=True):
        spread = device_rows.groupby(fixed)[swept].nunique()
        rank = (isa_sort_key if fixed == "isa" else (lambda value: value))
        chosen = max(spread.index, key=lambda value: (spread[value], rank(value)))
        parts.append(device_rows[device_rows[fixed] == chosen])
    return pd.concat(parts)


def add_series_columns(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with a series label (impl, device when needed)."""
    return rows.assign(series=series_label(rows))


def grouped_bars(axis, values: pd.DataFrame, unit: str) -> None:
    """Bars per precision, one colour per series."""
    precisions = sorted(values["precision"].unique(), key=precision_sort_key)
    series = sorted(values["series"].unique())
    width = 0.8 / len(series)
    for index, name in enumerate(series):
        subset = values[values["series"] == name].set_index("precision")["value"]
        heights = [subset.get(precision, np.nan) for precision in precisions]
        positions = np.arange(len(precisions)) + (index - (len(series) - 1) / 2) * width
        axis.bar(positions, heights, width=width, label=name)
    axis.set_xticks(np.arange(len(precisions)), precisions)
    axis.set_xlabel("Precision")
    axis.set_ylabel(f"Throughput ({unit})")
    axis.legend(fontsize="small")


def throughput_figure(frame: pd.DataFrame, op_order: Mapping[str, float]) -> Figure:
    """Bar chart per op of the best throughput at each precision on a fixed problem."""
    rows = measured_op_rows(frame)
    ops = sorted_ops(rows["op"], op_order)
    if not ops:
        raise NoData("no measured op rows")
    figure, axes = panel_grid(len(ops), "Throughput by precision (highest ISA level, most threads)")
    for axis, op in zip(axes, ops):
        slice_rows = add_series_columns(at_top_configuration(reference_problem(
            rows[rows["op"] == op])))
        column, unit = throughput_metric(slice_rows)
        values = (slice_rows.assign(value=slice_rows[column])
                  .groupby(["series", "precision"], as_index=False)["value"].max())
        grouped_bars(axis, values, unit)
        axis.set_title(problem_title(op, slice_rows), fontsize="medium")
    return figure


def plot_lines(axis, rows: pd.DataFrame, x_column: str, x_positions: dict, value: str) -> None:
    """One line per (series, precision) through x positions."""
    for (series, precision), line in rows.groupby(["series", "precision"], sort=True):
        line = line.assign(position=line[x_column].map(x_positions)).sort_values("position")
        axis.plot(line["position"], line[value], marker=marker_for(precision),
                  label=f"{series} {precision}")


def isa_speedups(rows: pd.DataFrame) -> pd.DataFrame:
    """Speed-up of each row over the lowest ISA level of its (series, precision) line."""
    parts = []
    for _, line in rows.groupby(["series", "precision"], sort=False):
        line = line.drop_duplicates("isa", keep="last")
        if len(line) < 2:
            continue  # a single level has nothing to be relative to
        lowest = min(line["isa"], key=isa_sort_key)
        base = line.loc[line["isa"] == lowest, "median_s"].iloc[0]
        parts.append(line.assign(speedup=base / line["median_s"]))
    return pd.concat(parts) if parts else rows.iloc[0:0].assign(speedup=[])


def thread_speedups(rows: pd.DataFrame) -> pd.DataFrame:
    """Speed-up of each row over the fewest threads of its (series, precision) line."""
    parts = []
    for _, line in rows.groupby(["series", "precision"], sort=False):
        line = line.drop_duplicates("threads", keep="last").sort_values("threads")
        if len(line) < 2:
            continue  # a single thread count has nothing to be relative to
        base = line["median_s"].iloc[0]
        parts.append(line.assign(speedup=base / line["median_s"]))
    return pd.concat(parts) if parts else rows.iloc[0:0].assign(speedup=[])


def sweep_panels(frame: pd.DataFrame, op_order: Mapping[str, float], swept: str, fixed: str,
                 speedups) -> list:
    """Per op with a sweep over `swept`: (op, swept rows, speed-ups); ops without one left out."""
    rows = measured_op_rows(frame)
    rows = rows[positive_mask(rows["median_s"])]
    panels = []
    for op in sorted_ops(rows["op"], op_order):
        problem = reference_problem(rows[rows["op"] == op])
        if problem[swept].nunique() < 2:
            continue
        sweep = add_series_columns(widest_sweep(problem, fixed, swept))
        lines = speedups(sweep)
        if not lines.empty:
            panels.append((op, sweep, lines))
    return panels


def isa_figure(frame: pd.DataFrame, op_order: Mapping[str, float]) -> Figure:
    """Per op, speed-up by ISA level relative to the lowest level present."""
    panels = sweep_panels(frame, op_order, "isa", "threads", isa_speedups)
    if not panels:
        raise NoData("no op was measured at more than one ISA level")
    figure, axes = panel_grid(len(panels), "Speed-up by ISA level (relative to the lowest level)")
    for axis, (op, sweep, lines) in zip(axes, panels):
        levels = sorted(lines["isa"].unique(), key=isa_sort_key)
        positions = {level: index for index, level in enumerate(levels)}
        plot_lines(axis, lines, "isa", positions, "speedup")
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xticks(range(len(levels)), levels, rotation=20)
        axis.set_xlabel("Requested ISA level")
        axis.set_ylabel("Speed-up vs lowest level (x)")
        axis.set_title(problem_title(op, sweep) + f", {lines['threads'].max()} threads",
                       fontsize="medium")
        axis.legend(fontsize="small")
    return figure


def thread_figure(frame: pd.DataFrame, op_order: Mapping[str, float]) -> Figure:
    """Per op, speed-up against thread count with the ideal linear line."""
    panels = sweep_panels(frame, op_order, "threads", "isa", thread_speedups)
    if not panels:
        raise NoData("no op was measured at more than one thread count")
    figure, axes = panel_grid(len(panels), "Thread scaling (speed-up over the fewest threads)")
    for axis, (op, sweep, lines) in zip(axes, panels):
        counts = sorted(lines["threads"].unique())
        plot_lines(axis, lines, "threads", {count: count for count in counts}, "speedup")
        axis.plot(counts, [count / counts[0] for count in counts], color="grey",
                  linestyle="--", linewidth=0.8, label="ideal")
        axis.set_xticks(counts, [str(count) for count in counts])
        axis.set_xlabel("Threads")
        axis.set_ylabel(f"Speed-up vs {counts[0]} thread(s) (x)")
        axis.set_title(problem_title(op, sweep) + f", isa {top_isa(lines['isa'])}",
                       fontsize="medium")
        axis.legend(fontsize="small")
    return figure


def time_scale(seconds: float) -> tuple[float, str]:
    """Multiplier and unit that keep latencies readable."""
    if seconds < 1e-3:
        return 1e6, "us"
    if seconds < 1.0:
        return 1e3, "ms"
    return 1.0, "s"


def box_statistics(row: pd.Series, label: str, samples: list[float], scale: float) -> dict:
    """Box statistics from raw samples, else from the recorded percentiles."""
    if samples:
        values = np.asarray(samples, dtype=float) * scale
        first, median, third = np.percentile(values, [25, 50, 75])
        return {"label": label, "med": median, "q1": first, "q3": third,
                "whislo": values.min(), "whishi": values.max(), "fliers": []}
    median = row["median_s"] * scale
    half_iqr = (row["iqr_s"] * scale / 2) if is_positive(row["iqr_s"]) else 0.0
    high = row["p99_s"] if is_positive(row["p99_s"]) else row["p90_s"]
    low = row["min_s"] if is_positive(row["min_s"]) else row["median_s"]
    return {"label": label, "med": median, "q1": median - half_iqr, "q3": median + half_iqr,
            "whislo": low * scale,
            "whishi": (high if is_positive(high) else row["median_s"]) * scale, "fliers": []}


def parse_samples(text: str) -> list[float]:
    """Raw per-repetition seconds of a row; malformed cells give none."""
    try:
        values = decode_samples(text)
    except (TypeError, ValueError):
        return []
    return [value for value in values if math.isfinite(value) and value > 0]


def sort_by_precision_and_series(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows from widest to narrowest precision, then by series name."""
    keys = [(precision_sort_key(precision), series)
            for series, precision in zip(rows["series"], rows["precision"])]
    order = sorted(range(len(rows)), key=keys.__getitem__)
    return rows.iloc[order]


def latency_figure(frame: pd.DataFrame, op_order: Mapping[str, float]) -> Figure:
    """Per op, latency boxes per (impl, precision) on a fixed problem and configuration."""
    rows = measured_op_rows(frame)
    rows = rows[positive_mask(rows["median_s"])]
    ops = sorted_ops(rows["op"], op_order)
    if not ops:
        raise NoData("no measured op rows with a median time")
    figure, axes = panel_grid(len(ops), "Per-sample time (highest ISA level, most threads; a "
                                        "CPU sample is the mean of an N-call block; whiskers: "
                                        "min-max of the samples, else p99 of the block means)")
    for axis, op in zip(axes, ops):
        slice_rows = add_series_columns(at_top_configuration(reference_problem(
            rows[rows["op"] == op])))
        slice_rows = sort_by_precision_and_series(slice_rows)
        scale, unit = time_scale(float(slice_rows["median_s"].median()))
        stats = [box_statistics(row, f"{row['series']}\n{row['precision']}\n"
                                f"({sample_label(row.get('calls_per_sample', 0))})",
                                parse_samples(row["samples_s"]), scale)
                 for _, row in slice_rows.iterrows()]
        axis.bxp(stats, showfliers=False)
        highs = [stat["whishi"] for stat in stats]
        lows = [stat["whislo"] for stat in stats if stat["whislo"] > 0]
        if lows and max(highs) / min(lows) > 20:
            log_scale(axis, "y")
        axis.tick_params(axis="x", labelsize="small", rotation=20)
        axis.set_xlabel("Implementation and precision")
        axis.set_ylabel(f"Seconds per call, per sample ({unit})")
        axis.set_title(problem_title(op, slice_rows), fontsize="medium")
    return figure


def precision_figure(tradeoffs: pd.DataFrame, op_order: Mapping[str, float]) -> Figure:
    """Relative error (and dlrm_infer AUC delta) against speed-up over fp32."""
    errors = tradeoffs[positive_mask(tradeoffs["speedup_vs_fp32"])
                       & finite_mask(tradeoffs["rel_error"])]
    aucs = tradeoffs[(tradeoffs["op"] == "dlrm_infer")
                     & finite_mask(tradeoffs["auc_delta"])
                     & positive_mask(tradeoffs["speedup_vs_fp32"])]
    if errors.empty and aucs.empty:
        raise NoData("no lower-precision row has both an fp32 reference and an error measure")
    panels = [name for name, data in (("error", errors), ("auc", aucs)) if not data.empty]
    figure, axes = panel_grid(len(panels), "Precision: accuracy cost versus speed-up over fp32")
    colors = op_colors(sorted_ops(tradeoffs["op"], op_order))
    for axis, name in zip(axes, panels):
        data = errors if name == "error" else aucs
        column = "rel_error" if name == "error" else "auc_delta"
        for (op, precision), group in data.groupby(["op", "precision"], sort=False):
            values = group[column].clip(lower=1e-12) if name == "error" else group[column]
            axis.scatter(group["speedup_vs_fp32"], values, color=colors[op],
                         marker=marker_for(precision), label=f"{op}/{precision}")
        axis.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xlabel("Speed-up over the fastest fp32 row (x)")
        if name == "error":
            log_scale(axis, "y")
            axis.set_ylabel("Relative L2 error vs float64 (log)")
            axis.set_title("Output error", fontsize="medium")
        else:
            axis.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
            axis.set_ylabel("AUC minus fp32 AUC")
            axis.set_title("dlrm_infer AUC change", fontsize="medium")
        axis.legend(fontsize="small")
    return figure


def comparison_figure(matched: pd.DataFrame, first_label: str, second_label: str,
                      op_order: Mapping[str, float]) -> Figure:
    """Ratio of median times per matched row, one column of points per op."""
    if matched.empty:
        raise NoData("no rows matched between the runs")
    figure = Figure(figsize=(9.0, 4.8))
    axis = figure.subplots(gridspec_kw={"left": 0.1, "right": 0.97, "bottom": 0.15,
                                        "top": 0.9})
    ops = sorted_ops(matched["op"], op_order)
    colors = op_colors(ops)
    generator = np.random.default_rng(0)  # fixed jitter: identical PNGs on rebuild
    for index, op in enumerate(ops):
        ratios = matched.loc[matched["op"] == op, "ratio"]
        jitter = generator.uniform(-0.15, 0.15, len(ratios))
        axis.scatter(index + jitter, ratios, color=colors[op], alpha=0.8)
        mean = geometric_mean(ratios)
        if is_positive(mean):
            axis.plot([index - 0.3, index + 0.3], [mean, mean], color="black", linewidth=1.5)
    axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    log_scale(axis, "y")
    axis.set_xticks(range(len(ops)), ops)
    axis.set_xlabel("Op (bar: geometric mean)")
    axis.set_ylabel(f"median_s {second_label} / {first_label} (log)")
    axis.set_title(f"Comparison: {second_label} vs {first_label} (below 1: {second_label} "
                   "faster)")
    return figure


def byte_axis(axis, low: float, high: float) -> None:
    """Log-2 x axis from low to high bytes with at most about eight binary-unit labels."""
    first, last = math.floor(math.log2(low)), math.ceil(math.log2(high))
    step = max(1, math.ceil((last - first) / 8))
    ticks = [2.0 ** exponent for exponent in range(first, last + 1, step)]
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [format_bytes(tick) for tick in ticks], rotation=20)
    axis.set_xlim(low / 1.3, high * 1.3)


def mark_cache_levels(axis, levels: list[tuple[str, float]], low: float, high: float) -> None:
    """Dashed vertical lines at the sysfs cache sizes that fall inside [low, high]."""
    for name, size in levels:
        if low <= size <= high:
            axis.axvline(size, color="grey", linestyle="--", linewidth=0.9)
            axis.text(size, 0.98, f"{name} {format_bytes(size)} ", rotation=90, va="top",
                      ha="right", fontsize="x-small", color="dimgrey",
                      transform=axis.get_xaxis_transform())


def working_set_figure(sweep: pd.DataFrame, env: dict, cliffs: dict[str, list]) -> Figure:
    """GB/s and samples/s against table footprint, cache sizes and detected cliffs marked."""
    if sweep.empty:
        raise NoData("no sls footprint sweep (3 or more table sizes)")
    figure, axes = panel_grid(2, "Working set: sls throughput versus table footprint "
                                 "(circles: detected cliffs; dashed: sysfs cache sizes)")
    names = list(dict.fromkeys(sweep["series"]))
    palette = matplotlib.colormaps["tab10"]
    caps = sorted(set(sweep["loop_bytes"][finite_mask(sweep["loop_bytes"])]))
    # Cache lines a little outside the measured sizes still place the sweep against them.
    low, high = float(sweep["table_bytes"].min()), float(sweep["table_bytes"].max())
    levels = [level for level in cache_levels(env) if low / 2 <= level[1] <= high * 2]
    span = [low, high] + [size for _, size in levels]
    panels = (("gbps", "Bandwidth by formula (GB/s)"), ("samples_per_s", "Samples per second"))
    for axis, (column, label) in zip(axes, panels):
        for index, name in enumerate(names):
            line = sweep[sweep["series"] == name].sort_values("table_bytes")
            color = palette(index % 10)
            axis.plot(line["table_bytes"], line[column], color=color, label=name,
                      marker=marker_for(str(line["precision"].iloc[0])))
            fallen = {cliff.footprint_bytes for cliff in cliffs.get(name, [])}
            marked = line[line["table_bytes"].isin(fallen)]
            axis.scatter(marked["table_bytes"], marked[column], s=110, facecolors="none",
                         edgecolors=color, linewidths=1.6, zorder=4)
        mark_cache_levels(axis, levels, min(span), max(span))
        for cap in caps[:3]:  # more caps than that would only clutter the panel
            axis.axvline(cap, color="tab:red", linestyle=":", linewidth=0.9)
        if caps:
            axis.plot([], [], color="tab:red", linestyle=":",
                      label="most bytes the rotating batches touch")
        byte_axis(axis, min(span), max(span))
        axis.set_ylim(bottom=0)
        axis.set_xlabel("Table footprint (bytes at the row's precision)")
        axis.set_ylabel(label)
        axis.grid(True, which="major", linewidth=0.3)
        axis.legend(fontsize="small")
    return figure


def locality_figure(table: pd.DataFrame) -> Figure:
    """Measured sls GB/s against the predicted LRU hit rate at the LLC, one point per level."""
    rows = table[positive_mask(table["gbps"])] if "gbps" in table else table.iloc[0:0]
    if rows.empty:
        raise NoData("no locality level was measured")
    figure, axes = panel_grid(1, "Locality: measured sls bandwidth versus predicted LLC hits")
    axis = axes[0]
    rows = rows.sort_values("predicted_hit_rate_llc")
    axis.plot(rows["predicted_hit_rate_llc"], rows["gbps"], marker="o",
              label="one pass of one batch (cold cache)")
    if "steady_hit_rate_llc" in rows:
        steady = rows.sort_values("steady_hit_rate_llc")
        axis.plot(steady["steady_hit_rate_llc"], steady["gbps"], marker="s", linestyle="--",
                  label="one batch replayed (the loop rotates batches instead)")
    for _, row in rows.iterrows():
        axis.annotate(str(row["level"]), (row["predicted_hit_rate_llc"], row["gbps"]),
                      fontsize="x-small", xytext=(4, 4), textcoords="offset points")
    axis.set_xlim(-0.03, 1.03)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("Predicted LRU hit rate at the LLC capacity")
    axis.set_ylabel("Measured bandwidth by formula (GB/s)")
    axis.grid(True, linewidth=0.3)
    axis.legend(fontsize="small")
    return figure
