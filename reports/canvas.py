"""The figures' canvas: Figure objects on Agg (no pyplot), panel grids, log axes, PNG bytes."""

from __future__ import annotations

import io
import math

import matplotlib

# Figure objects draw on the Agg canvas without pyplot: no display, no global figure state.
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

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
