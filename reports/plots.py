"""Report figures: matplotlib Figure objects (Agg canvas, no pyplot) rendered to PNG bytes."""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
import pandas as pd

# Figure objects draw on the Agg canvas without pyplot: no display, no global figure state.
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from bench.records import decode_samples
from reports.tables import (
    CACHE_ROOF_MARGIN,
    DRAM_ROOF,
    GATHER_ROOF,
    IN_CACHE_ROOF,
    PROBLEM_KEYS,
    Ceilings,
    finite_mask,
    format_bytes,
    is_positive,
    isa_sort_key,
    measured_op_rows,
    positive_mask,
    precision_sort_key,
    sample_label,
    sorted_ops,
    throughput_metric,
)
from reports.workingset import cache_levels

DPI = 100
# Fixed margins in inches: matplotlib's automatic layouts cost more than all the drawing.
AXES_WIDTH = 4.3
AXES_HEIGHT = 2.8
MARGIN_LEFT = 1.0
MARGIN_RIGHT = 0.3
MARGIN_TOP = 0.75
MARGIN_BOTTOM = 0.95
GAP_WIDE = 1.25
GAP_HIGH = 1.25
MAX_COLUMNS = 3
# Beyond this many points the labels overlap; the legend still names every op/precision.
MAX_ANNOTATED_POINTS = 16
PRECISION_MARKERS = {"fp32": "o", "bf16": "s", "fp16": "D", "int8": "^", "int4": "v"}


class NoData(Exception):
    """A figure has nothing to draw; the message says why, for the report's note."""


def figure_to_png(figure: Figure) -> bytes:
    """Render a figure to PNG bytes without a timestamp or software tag."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def panel_grid(count: int, title: str) -> tuple[Figure, list]:
    """A figure with one panel per item, at most three across."""
    columns = min(MAX_COLUMNS, max(count, 1))
    rows = math.ceil(count / columns)
    width = MARGIN_LEFT + MARGIN_RIGHT + columns * AXES_WIDTH + (columns - 1) * GAP_WIDE
    height = MARGIN_TOP + MARGIN_BOTTOM + rows * AXES_HEIGHT + (rows - 1) * GAP_HIGH
    layout = {
        "left": MARGIN_LEFT / width, "right": 1 - MARGIN_RIGHT / width,
        "bottom": MARGIN_BOTTOM / height, "top": 1 - MARGIN_TOP / height,
        "wspace": GAP_WIDE / AXES_WIDTH, "hspace": GAP_HIGH / AXES_HEIGHT,
    }
    figure = Figure(figsize=(width, height))
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw=layout).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    figure.suptitle(title, y=1 - 0.25 / height)
    return figure, axes[:count]


class PlainLogFormatter(LogFormatter):
    """LogFormatter's choice of which ticks get a label, written as plain '%g' text."""

    def __call__(self, value: float, position: int | None = None) -> str:
        """Label text of one tick, empty when the tick stays unlabelled."""
        return f"{value:g}" if super().__call__(value, position) else ""


def log_scale(axis, which: str) -> None:
    """Log scale with plain-text tick labels: mathtext labels are slow to lay out and render."""
    getattr(axis, f"set_{which}scale")("log")
    target = axis.xaxis if which == "x" else axis.yaxis
    target.set_major_formatter(PlainLogFormatter())
    # Minor ticks get labels only when the axis spans about a decade or less.
    target.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def op_colors(ops: list[str]) -> dict[str, tuple]:
    """A stable colour per op."""
    palette = matplotlib.colormaps["tab10"]
    return {op: palette(index % 10) for index, op in enumerate(ops)}


def marker_for(precision: str) -> str:
    """Marker shape of a precision."""
    return PRECISION_MARKERS.get(precision, "x")


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


def throughput_figure(frame: pd.DataFrame) -> Figure:
    """Bar chart per op of the best throughput at each precision on a fixed problem."""
    rows = measured_op_rows(frame)
    ops = sorted_ops(rows["op"])
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


def sweep_panels(frame: pd.DataFrame, swept: str, fixed: str, speedups) -> list:
    """Per op with a sweep over `swept`: (op, swept rows, speed-ups); ops without one left out."""
    rows = measured_op_rows(frame)
    rows = rows[positive_mask(rows["median_s"])]
    panels = []
    for op in sorted_ops(rows["op"]):
        problem = reference_problem(rows[rows["op"] == op])
        if problem[swept].nunique() < 2:
            continue
        sweep = add_series_columns(widest_sweep(problem, fixed, swept))
        lines = speedups(sweep)
        if not lines.empty:
            panels.append((op, sweep, lines))
    return panels


def isa_figure(frame: pd.DataFrame) -> Figure:
    """Per op, speed-up by ISA level relative to the lowest level present."""
    panels = sweep_panels(frame, "isa", "threads", isa_speedups)
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


def thread_figure(frame: pd.DataFrame) -> Figure:
    """Per op, speed-up against thread count with the ideal linear line."""
    panels = sweep_panels(frame, "threads", "isa", thread_speedups)
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


def latency_figure(frame: pd.DataFrame) -> Figure:
    """Per op, latency boxes per (impl, precision) on a fixed problem and configuration."""
    rows = measured_op_rows(frame)
    rows = rows[positive_mask(rows["median_s"])]
    ops = sorted_ops(rows["op"])
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


def roof_range(ceilings: Ceilings, intensities: pd.Series) -> tuple[float, float]:
    """Intensity axis limits covering the points and every ridge point."""
    candidates = [value for value in intensities if is_positive(value)]
    candidates += [ceilings.ridge_point(precision) for precision in ceilings.compute_gflops]
    for bandwidth in [ceilings.cache_gbps, *ceilings.gather_gbps.values()]:
        if is_positive(bandwidth):
            candidates += [peak / bandwidth for peak in ceilings.compute_gflops.values()]
    candidates = [value for value in candidates if is_positive(value)] or [0.1, 10.0]
    return min(candidates) / 4, max(candidates) * 4


def draw_roofs(axis, ceilings: Ceilings, low: float, high: float) -> None:
    """Memory diagonals and compute horizontals of one group."""
    top_peak = max(ceilings.compute_gflops.values(), default=math.nan)
    bandwidths = [(ceilings.memory_gbps, DRAM_ROOF, "-")]
    if is_positive(ceilings.cache_gbps) and not (
            is_positive(ceilings.memory_gbps)
            and ceilings.cache_gbps <= ceilings.memory_gbps * CACHE_ROOF_MARGIN):
        bandwidths.append((ceilings.cache_gbps, IN_CACHE_ROOF, "--"))
    bandwidths += [(bandwidth, f"{GATHER_ROOF} {size} B", ":")
                   for size, bandwidth in sorted(ceilings.gather_gbps.items())]
    blues = matplotlib.colormaps["Blues"]
    gathers = max(len(ceilings.gather_gbps), 1)
    for index, (bandwidth, name, style) in enumerate(bandwidths):
        if not is_positive(bandwidth):
            continue
        end = top_peak / bandwidth if is_positive(top_peak) else high
        # Gather roofs in shades of blue, lighter for smaller rows; streams in black.
        color = (blues(0.4 + 0.6 * (index - len(bandwidths) + gathers + 1) / gathers)
                 if style == ":" else "black")
        axis.plot([low, end], [bandwidth * low, bandwidth * end], color=color,
                  linestyle=style, linewidth=1.2, label=f"{name} roof {bandwidth:.4g} GB/s")
    palette = matplotlib.colormaps["Greys"]
    peaks = sorted(ceilings.compute_gflops.items(), key=lambda item: precision_sort_key(item[0]))
    for index, (precision, peak) in enumerate(peaks):
        start = peak / ceilings.memory_gbps if is_positive(ceilings.memory_gbps) else low
        shade = palette(0.5 + 0.4 * index / max(len(peaks), 1))
        axis.plot([start, high], [peak, peak], color=shade, linewidth=1.2,
                  label=f"{precision} peak {peak:.4g} GFLOP/s")


def roofline_figure(ceilings: Ceilings, points: pd.DataFrame) -> Figure:
    """Log-log roofline of one (device, isa) group with every placeable op row."""
    placed = points[positive_mask(points["intensity"])
                    & positive_mask(points["achieved_gflops"])]
    figure = Figure(figsize=(10.0, 5.5))
    axis = figure.subplots(gridspec_kw={"left": 0.09, "right": 0.68, "bottom": 0.11,
                                        "top": 0.92})
    low, high = roof_range(ceilings, placed["intensity"])
    draw_roofs(axis, ceilings, low, high)
    colors = op_colors(sorted_ops(placed["op"]))
    for (op, precision), group in placed.groupby(["op", "precision"], sort=False):
        axis.scatter(group["intensity"], group["achieved_gflops"], color=colors[op],
                     marker=marker_for(precision), label=f"{op}/{precision}", zorder=3)
    if len(placed) <= MAX_ANNOTATED_POINTS:
        for _, row in placed.iterrows():
            axis.annotate(f"{row['op']}/{row['precision']}",
                          (row["intensity"], row["achieved_gflops"]), fontsize="x-small",
                          xytext=(4, 4), textcoords="offset points")
    log_scale(axis, "x")
    log_scale(axis, "y")
    axis.set_xlim(low, high)
    axis.set_xlabel("Arithmetic intensity (FLOP/byte)")
    axis.set_ylabel("Performance (GFLOP/s)")
    axis.set_title(f"Roofline: device {ceilings.device}, isa {ceilings.isa}")
    axis.grid(True, which="major", linewidth=0.3)
    axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return figure


def precision_figure(tradeoffs: pd.DataFrame) -> Figure:
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
    colors = op_colors(sorted_ops(tradeoffs["op"]))
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


def comparison_figure(matched: pd.DataFrame, first_label: str, second_label: str) -> Figure:
    """Ratio of median times per matched row, one column of points per op."""
    if matched.empty:
        raise NoData("no rows matched between the runs")
    figure = Figure(figsize=(9.0, 4.8))
    axis = figure.subplots(gridspec_kw={"left": 0.1, "right": 0.97, "bottom": 0.15,
                                        "top": 0.9})
    ops = sorted_ops(matched["op"])
    colors = op_colors(ops)
    generator = np.random.default_rng(0)  # fixed jitter: identical PNGs on rebuild
    for index, op in enumerate(ops):
        ratios = matched.loc[matched["op"] == op, "ratio"]
        jitter = generator.uniform(-0.15, 0.15, len(ratios))
        axis.scatter(index + jitter, ratios, color=colors[op], alpha=0.8)
        positive = ratios[positive_mask(ratios)]
        if len(positive):
            mean = float(np.exp(np.log(positive.astype(float)).mean()))
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
