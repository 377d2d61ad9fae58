"""Markdown table and figure of the TT-Rec trade-off study (pandas and matplotlib only)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from bench.records import write_atomic
from reports.canvas import figure_to_png, log_scale

MARKDOWN_NAME = "tt_study.md"
FIGURE_NAME = "tt_study.png"
MEBIBYTE = 1 << 20
DENSE_COLOR = "black"
# The paper's published Kaggle figures, quoted in the notes (the CSV holds them per row).
PAPER_NOTE = ("117x for 7 tables at rank 32, 221x for 7 tables at rank 8, about 4x for 3 tables "
              "(Yin et al., TT-Rec, MLSys 2021)")
PAPER_LOSS_NOTE = "a loss of 0.03% to 0.3% (Yin et al., TT-Rec, MLSys 2021)"


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
    """The study's trained models as a markdown table (sizes in MiB, times in milliseconds)."""
    headers = ["config", "seed", "embedding MiB", "model MiB", "embedding compression",
               "model compression", "paper formula, full-size Kaggle (not measured)",
               "paper reported", "steps (best)", "log-loss", "AUC", "accuracy",
               "step median ms", "step IQR ms", "TT cache hit rate"]
    lines = [_markdown_row(headers), _markdown_row(["---"] * len(headers))]
    for row in frame.itertuples(index=False):
        # The paper's 3-table figure is quoted as "about 4x", the others exactly.
        approximate = row.tt_tables == 3
        stop = "" if not row.stopped_early else ", stopped"
        lines.append(_markdown_row([
            str(row.config),
            str(int(row.seed)),
            _number(row.embedding_bytes / MEBIBYTE, 2),
            _number(row.model_bytes / MEBIBYTE, 2),
            _ratio(row.embedding_compression),
            _ratio(row.model_compression),
            _ratio(row.paper_embedding_compression),
            _ratio(row.paper_reported, approximate),
            f"{int(row.steps_trained)} ({int(row.best_step)}{stop})",
            _number(row.logloss, 4),
            _number(row.auc, 4),
            _number(row.accuracy, 4),
            _milliseconds(row.step_median_s),
            _milliseconds(row.step_iqr_s),
            _number(row.tt_hit_rate, 3),
        ]))
    return "\n".join(lines)


METRICS = ("auc", "logloss", "accuracy")
SUMMARY_NAME = "tt_study_summary.csv"


def seed_differences(frame: pd.DataFrame) -> pd.DataFrame:
    """Each TT model's metrics minus its own seed's dense model's (absolute and percent)."""
    dense = frame[frame.tt_tables == 0].set_index("seed")
    if dense.index.duplicated().any():
        raise ValueError("tt_study.csv has more than one dense model for a seed")
    students = frame[frame.tt_tables > 0].copy()
    missing = sorted(set(students.seed) - set(dense.index))
    if missing:
        raise ValueError(f"tt_study.csv has TT models without a dense model for seeds {missing}")
    for metric in METRICS:
        baseline = students.seed.map(dense[metric])
        students[f"{metric}_diff"] = students[metric] - baseline
        students[f"{metric}_diff_percent"] = 100.0 * students[f"{metric}_diff"] / baseline
    return students


def _t_interval(values: pd.Series, confidence: float) -> tuple[float, float]:
    """Two-sided Student-t interval of the mean over seeds; NaN with fewer than two seeds."""
    values = values.dropna()
    if len(values) < 2:
        return float("nan"), float("nan")
    if float(values.std()) == 0.0:
        # Identical differences: the interval collapses (scipy would return NaN).
        return float(values.iloc[0]), float(values.iloc[0])
    low, high = stats.t.interval(confidence, len(values) - 1, loc=float(values.mean()),
                                 scale=float(stats.sem(values)))
    return float(low), float(high)


def difference_summary(frame: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per TT config: mean paired difference to dense over seeds with a t-interval."""
    differences = seed_differences(frame)
    records = []
    for config, rows in differences.groupby("config", sort=False):
        record = {"config": config, "tt_tables": int(rows.tt_tables.iloc[0]),
                  "rank": int(rows["rank"].iloc[0]), "cache": rows.cache.iloc[0],
                  "seeds": int(rows.seed.nunique()),
                  "embedding_compression": float(rows.embedding_compression.mean()),
                  "steps_trained_mean": float(rows.steps_trained.mean()),
                  "stopped_early": int(rows.stopped_early.astype(bool).sum()),
                  "tt_hit_rate": float(rows.tt_hit_rate.mean())}
        for metric in METRICS:
            for column in (f"{metric}_diff", f"{metric}_diff_percent"):
                low, high = _t_interval(rows[column], confidence)
                record.update({column: float(rows[column].mean()), f"{column}_low": low,
                               f"{column}_high": high})
        records.append(record)
    summary = pd.DataFrame.from_records(records)
    summary["confidence"] = confidence
    return summary


def _interval(row, column: str, digits: int) -> str:
    """'mean [low, high]' of a summary column."""
    mean, low, high = (getattr(row, name) for name in (column, f"{column}_low", f"{column}_high"))
    if pd.isna(low):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def summary_table(summary: pd.DataFrame) -> str:
    """The per-config differences to dense as a markdown table."""
    headers = ["config", "seeds", "embedding compression", "steps (mean)", "stopped early",
               "AUC - dense", "AUC - dense, %", "log-loss - dense, %", "accuracy - dense, %",
               "TT cache hit rate"]
    lines = [_markdown_row(headers), _markdown_row(["---"] * len(headers))]
    for row in summary.itertuples(index=False):
        lines.append(_markdown_row([
            str(row.config), str(row.seeds), _ratio(row.embedding_compression),
            _number(row.steps_trained_mean, 0), f"{row.stopped_early}/{row.seeds}",
            _interval(row, "auc_diff", 4), _interval(row, "auc_diff_percent", 2),
            _interval(row, "logloss_diff_percent", 2), _interval(row, "accuracy_diff_percent", 2),
            _number(row.tt_hit_rate, 3)]))
    return "\n".join(lines)


def render_markdown(frame: pd.DataFrame, summary: pd.DataFrame | None = None) -> str:
    """The study's markdown page: setup, teacher ceiling, differences to dense, every model."""
    first = frame.iloc[0]
    dense = frame[frame.tt_tables == 0]
    seeds = sorted(int(seed) for seed in frame.seed.unique())
    lines = [
        "# TT-Rec accuracy study",
        "",
        f"Workload `{first.workload}` (largest table {int(first.largest_table_rows)} rows, "
        f"indices {first.distribution}), seeds {', '.join(map(str, seeds))}: each seed draws "
        "its own teacher, data stream and student initialisation. Budget "
        f"{int(first.budget_samples)} training samples per model (batch "
        f"{int(first.batch_size)}, SGD lr {first.learning_rate:g}), early stopping on "
        f"{int(first.validation_samples)} held-out validation samples (the best validated "
        f"state is kept), tested on {int(first.eval_samples)} other teacher-labelled samples.",
        f"Teacher (the labelling model; the ceiling), mean over seeds: log-loss "
        f"{frame.teacher_logloss.mean():.4f}, AUC {frame.teacher_auc.mean():.4f}; dense "
        f"students: log-loss {dense.logloss.mean():.4f}, AUC {dense.auc.mean():.4f}.",
        "",
    ]
    if summary is not None and not summary.empty:
        level = int(round(100 * summary.confidence.iloc[0]))
        lines += [
            f"## Difference to the dense student (mean over seeds [{level}% t-interval])",
            "",
            summary_table(summary),
            "",
            "- Differences are paired: each TT model minus the dense model of its own seed "
            "(same teacher, stream and MLP initialisation); the interval is Student's t over "
            "the seeds' differences (scipy.stats.t), empty with one seed. Percentages are "
            "relative to the dense student's value; a negative AUC or accuracy difference "
            "and a positive log-loss difference are losses.",
            f"- The paper's accuracy cost on full Criteo Kaggle is {PAPER_LOSS_NOTE}: compare "
            "the percentage columns with it.",
            "",
        ]
    lines += [
        "## Every trained model",
        "",
        markdown_table(frame),
        "",
        "- Bytes and the two measured compressions are of the studied (row-capped) tables; "
        "TT bytes include the cores plus the hot-row cache and its index maps.",
        "- The paper-formula column is computed by `bench.models.ttrec.factorize."
        "embedding_compression_ratio` for the full-size Kaggle tables (dim 16, fp32, TT cores "
        "only, no cache): a formula, not a measurement.",
        f"- Paper reported: {PAPER_NOTE}.",
        "- steps (best): SGD steps run and the step whose state was kept; 'stopped' where "
        "early stopping ended training before the budget.",
        "- Step times are wall seconds of each training step (forward, loss, backward, SGD) "
        "on whatever machine ran the study: not a speed figure.",
        "",
    ]
    return "\n".join(lines)


def _series_color(tt_tables: int, palette: dict) -> str | tuple:
    return DENSE_COLOR if tt_tables == 0 else palette[tt_tables]


def config_means(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per config (first-seen order): the mean of every numeric column over seeds."""
    numeric = frame.select_dtypes("number").columns
    grouped = frame.groupby("config", sort=False)
    means = grouped[list(numeric)].mean().reset_index()
    # pandas reads the dense row's "n/a" as missing; a missing group key would drop it.
    means["cache"] = grouped.cache.first().fillna("n/a").values
    means["workload"] = grouped.workload.first().values
    return means


def render_figure(frame: pd.DataFrame) -> Figure:
    """Measured embedding compression (log x) against log-loss and AUC (means over seeds)."""
    seeds = frame.seed.nunique()
    frame = config_means(frame)
    figure = Figure(figsize=(12.0, 4.8))
    # Fixed margins: automatic layouts cost more than the drawing.
    figure.subplots_adjust(left=0.085, right=0.98, top=0.83, bottom=0.14, wspace=0.28)
    first = frame.iloc[0]
    figure.suptitle(f"TT-Rec accuracy on {first.workload} (largest table "
                    f"{int(first.largest_table_rows)} rows): budget "
                    f"{int(first.budget_samples)} samples, early stopping, mean of {seeds} "
                    "seed(s); labels show the rank")
    tt_counts = sorted(int(count) for count in frame.tt_tables.unique() if count > 0)
    colors = matplotlib.colormaps["tab10"]
    palette = {count: colors(position % 10) for position, count in enumerate(tt_counts)}
    panels = [("logloss", "teacher_logloss", "evaluation log-loss (lower is better)", "log-loss"),
              ("auc", "teacher_auc", "evaluation AUC (higher is better)", "AUC")]
    for position, (column, teacher_column, label, short) in enumerate(panels):
        axis = figure.add_subplot(1, 2, position + 1)
        for (tt_tables, cache), rows in frame.groupby(["tt_tables", "cache"], sort=True):
            count = int(tt_tables)
            name = ("dense" if count == 0
                    else f"TT on the {count} largest table{'s' if count > 1 else ''}, "
                         f"cache {cache}")
            rows = rows.sort_values("embedding_compression")
            axis.plot(rows.embedding_compression, rows[column], marker="o", linestyle="-",
                      color=_series_color(count, palette), label=name)
            # Ranks of one K land at nearly the same spot: stack their labels, each with a
            # leader line to its own point.
            color = _series_color(count, palette)
            if cache == "none":
                axis.lines[-1].set_linestyle("--")
            for stack, row in enumerate(rows.itertuples(index=False)):
                if count == 0:
                    continue
                axis.annotate(f"R={int(row.rank)}",
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
    """Write tt_study_summary.csv, tt_study.md and tt_study.png for a tt_study.csv; returns
    their paths."""
    frame = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    if frame.empty:
        raise ValueError(f"{csv_path}: no rows to render")
    summary = difference_summary(frame) if (frame.tt_tables > 0).any() else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / SUMMARY_NAME
    markdown_path, figure_path = out / MARKDOWN_NAME, out / FIGURE_NAME
    write_atomic(summary_path, (summary if summary is not None else pd.DataFrame())
                 .to_csv(index=False))
    write_atomic(markdown_path, render_markdown(frame, summary).encode())
    write_atomic(figure_path, figure_to_png(render_figure(frame)))
    return [summary_path, markdown_path, figure_path]
