"""Markdown table and figure of the TT-Rec trade-off study (pandas and matplotlib only)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from bench.records import write_atomic
from reports.plots import figure_to_png, log_scale

MARKDOWN_NAME = "tt_study.md"
FIGURE_NAME = "tt_study.png"
MEBIBYTE = 1 << 20
DENSE_COLOR = "black"
# The paper's published Kaggle figures, quoted in the notes (the CSV holds them per row).
PAPER_NOTE = ("117x for 7 tables at rank 32, 221x for 7 tables at rank 8, about 4x for 3 tables "
              "(Yin et al., TT-Rec, MLSys 2021)")


def _number(value, digits: int) -> str:
    """A float with fixed decimals, empty when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{float(value):.{digits}f}"


def _ratio(value, approximate: bool = False) -> str:
    """A compression ratio as '12.3x', empty when missing."""
    text = _number(value, 1)
    if not text:
        return ""
    return f"{'~' if approximate else ''}{text}x"


def _milliseconds(value) -> str:
    """Seconds shown as milliseconds."""
    return _number(float(value) * 1e3, 2) if pd.notna(value) else ""


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(frame: pd.DataFrame) -> str:
    """The study's rows as a markdown table (sizes in MiB, times in milliseconds)."""
    headers = ["config", "embedding MiB", "model MiB", "embedding compression",
               "model compression", "paper formula, full-size Kaggle (not measured)",
               "paper reported", "log-loss", "AUC", "step median ms", "step IQR ms",
               "TT cache hit rate"]
    lines = [_markdown_row(headers), _markdown_row(["---"] * len(headers))]
    for row in frame.itertuples(index=False):
        # The paper's 3-table figure is quoted as "about 4x", the others exactly.
        approximate = row.tt_tables == 3
        lines.append(_markdown_row([
            str(row.config),
            _number(row.embedding_bytes / MEBIBYTE, 2),
            _number(row.model_bytes / MEBIBYTE, 2),
            _ratio(row.embedding_compression),
            _ratio(row.model_compression),
            _ratio(row.paper_embedding_compression),
            _ratio(row.paper_reported, approximate),
            _number(row.logloss, 4),
            _number(row.auc, 4),
            _milliseconds(row.step_median_s),
            _milliseconds(row.step_iqr_s),
            _number(row.tt_hit_rate, 3),
        ]))
    return "\n".join(lines)


def render_markdown(frame: pd.DataFrame) -> str:
    """The study's markdown page: setup, teacher ceiling, table and notes."""
    first = frame.iloc[0]
    return "\n".join([
        "# TT-Rec trade-off study",
        "",
        f"Workload `{first.workload}` (largest table {int(first.largest_table_rows)} rows), "
        f"{int(first.steps)} SGD steps (lr {first.learning_rate:g}) x batch "
        f"{int(first.batch_size)} per model, evaluated on {int(first.eval_samples)} "
        "teacher-labelled samples.",
        f"Teacher (the labelling model; the ceiling): log-loss {first.teacher_logloss:.4f}, "
        f"AUC {first.teacher_auc:.4f}.",
        "",
        markdown_table(frame),
        "",
        "- Bytes and the two measured compressions are of the studied (row-capped) tables; "
        "TT bytes include the cores plus the hot-row cache and its index maps.",
        "- The paper-formula column is computed by `bench.models.ttrec.factorize."
        "embedding_compression_ratio` for the full-size Kaggle tables (dim 16, fp32, TT cores "
        "only, no cache): a formula, not a measurement.",
        f"- Paper reported: {PAPER_NOTE}.",
        "- Step times are wall seconds of each training step (forward, loss, backward, SGD).",
        "",
    ])


def _series_color(tt_tables: int, palette: dict) -> str | tuple:
    return DENSE_COLOR if tt_tables == 0 else palette[tt_tables]


def render_figure(frame: pd.DataFrame) -> Figure:
    """Measured embedding compression (log x) against log-loss and AUC, step time annotated."""
    figure = Figure(figsize=(12.0, 4.8))
    # Fixed margins: automatic layouts cost more than the drawing.
    figure.subplots_adjust(left=0.085, right=0.98, top=0.83, bottom=0.14, wspace=0.28)
    first = frame.iloc[0]
    figure.suptitle(f"TT-Rec trade-off on {first.workload} (largest table "
                    f"{int(first.largest_table_rows)} rows): {int(first.steps)} SGD steps x "
                    f"batch {int(first.batch_size)}; labels show ms per training step")
    tt_counts = sorted(int(count) for count in frame.tt_tables.unique() if count > 0)
    colors = matplotlib.colormaps["tab10"]
    palette = {count: colors(position % 10) for position, count in enumerate(tt_counts)}
    panels = [("logloss", "teacher_logloss", "evaluation log-loss (lower is better)", "log-loss"),
              ("auc", "teacher_auc", "evaluation AUC (higher is better)", "AUC")]
    for position, (column, teacher_column, label, short) in enumerate(panels):
        axis = figure.add_subplot(1, 2, position + 1)
        for tt_tables, rows in frame.groupby("tt_tables", sort=True):
            count = int(tt_tables)
            name = ("dense" if count == 0
                    else f"TT on the {count} largest table{'s' if count > 1 else ''}")
            rows = rows.sort_values("embedding_compression")
            axis.plot(rows.embedding_compression, rows[column], marker="o", linestyle="-",
                      color=_series_color(count, palette), label=name)
            # Ranks of one K land at nearly the same spot: stack their labels, each with a
            # leader line to its own point.
            color = _series_color(count, palette)
            for stack, row in enumerate(rows.itertuples(index=False)):
                rank = "" if count == 0 else f"R={int(row.rank)}: "
                axis.annotate(f"{rank}{row.step_median_s * 1e3:.1f} ms",
                              (row.embedding_compression, getattr(row, column)),
                              textcoords="offset points", xytext=(12, 6 + 11 * stack),
                              fontsize=7.5, color=color,
                              arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.5})
        # The teacher is quoted, not drawn: its line would squash the students' differences.
        axis.set_title(f"teacher (ceiling) {short}: {first[teacher_column]:.4f}", fontsize=10)
        log_scale(axis, "x")
        axis.margins(x=0.2, y=0.25)
        axis.set_xlabel("embedding compression, measured (x; TT bytes include the cache)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    return figure


def render_tt_study(csv_path: Path | str, out_dir: Path | str) -> list[Path]:
    """Write tt_study.md and tt_study.png for a tt_study.csv; returns their paths."""
    frame = pd.read_csv(csv_path)
    if frame.empty:
        raise ValueError(f"{csv_path}: no rows to render")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown_path, figure_path = out / MARKDOWN_NAME, out / FIGURE_NAME
    write_atomic(markdown_path, render_markdown(frame).encode())
    write_atomic(figure_path, figure_to_png(render_figure(frame)))
    return [markdown_path, figure_path]
