"""The roofline figure of one (device, isa) group: its measured roofs and the op rows under them."""

from __future__ import annotations

import math
from typing import Mapping

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from reports.canvas import log_scale, marker_for, op_colors
from reports.order import precision_sort_key, sorted_ops
from reports.roofs import CACHE_ROOF_MARGIN, GATHER_ROOF, Ceilings
from reports.values import is_positive, positive_mask

# Beyond this many points the labels overlap; the legend still names every op/precision.
MAX_ANNOTATED_POINTS = 16


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
    bandwidths = [(ceilings.memory_gbps, ceilings.stream_roof, "-")]
    if is_positive(ceilings.cache_gbps) and not (
            is_positive(ceilings.memory_gbps)
            and ceilings.cache_gbps <= ceilings.memory_gbps * CACHE_ROOF_MARGIN):
        bandwidths.append((ceilings.cache_gbps, ceilings.cache_roof, "--"))
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
    draw_nominal_peaks(axis, ceilings, low, high)


def draw_nominal_peaks(axis, ceilings: Ceilings, low: float, high: float) -> None:
    """The derived peaks a GPU records, dotted and labelled nominal: beside the roofs, not one."""
    nominal = [(precision, peak) for precision, peak in ceilings.nominal_gflops.items()
               if is_positive(peak)]
    palette = matplotlib.colormaps["Oranges"]
    for index, (precision, peak) in enumerate(sorted(
            nominal, key=lambda item: precision_sort_key(item[0]))):
        axis.plot([low, high], [peak, peak], color=palette(0.5 + 0.4 * index / len(nominal)),
                  linestyle=":", linewidth=1.0,
                  label=f"{precision} nominal {peak:.4g} GFLOP/s")


def roofline_figure(ceilings: Ceilings, points: pd.DataFrame,
                    op_order: Mapping[str, float]) -> Figure:
    """Log-log roofline of one (device, isa) group with every placeable op row."""
    placed = points[positive_mask(points["intensity"])
                    & positive_mask(points["achieved_gflops"])]
    figure = Figure(figsize=(10.0, 5.5))
    axis = figure.subplots(gridspec_kw={"left": 0.09, "right": 0.68, "bottom": 0.11,
                                        "top": 0.92})
    low, high = roof_range(ceilings, placed["intensity"])
    draw_roofs(axis, ceilings, low, high)
    colors = op_colors(sorted_ops(placed["op"], op_order))
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
