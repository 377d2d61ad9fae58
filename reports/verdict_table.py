"""The verdict table a check prints and the verdicts.csv it writes."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.records import write_atomic
from reports.compare import Verdict, count_verdicts, geometric_mean_ratio

_TABLE_HEADERS = ("op", "impl", "workload", "precision", "ratio", "p-value", "verdict", "reason")
_VERDICT_COLUMNS = tuple(field.name for field in dataclasses.fields(Verdict))


def _one_line(text: object) -> str:
    """Collapse whitespace so a message fits on one terminal line."""
    return " ".join(str(text).split())


def _format_ratio(ratio: float) -> str:
    """Ratio with three decimals, '-' when there is none."""
    return f"{ratio:.3f}" if math.isfinite(ratio) else "-"


def _format_p_value(p_value: float) -> str:
    """p-value readable both near 1 and near 0, '-' when there is none."""
    if not math.isfinite(p_value):
        return "-"
    return f"{p_value:.3f}" if p_value >= 0.001 else f"{p_value:.1e}"


def _summary_reason(verdicts: Sequence[Verdict]) -> str:
    """Text of the summary row: how many ratios went in and the verdict counts."""
    with_ratio = sum(1 for v in verdicts if math.isfinite(v.ratio) and v.ratio > 0)
    counts = ", ".join(f"{count} {name}" for name, count in count_verdicts(verdicts).items())
    return f"over {with_ratio} rows with a ratio; " + (counts or "no rows")


def render_table(verdicts: Iterable[Verdict]) -> str:
    """Fixed-width table of the verdicts; the last line is the geometric-mean summary."""
    verdicts = list(verdicts)
    body = [(v.op, v.impl, v.workload, v.precision, _format_ratio(v.ratio),
             _format_p_value(v.p_value), v.verdict, _one_line(v.reason)) for v in verdicts]
    summary = (
        "geomean", "", "", "", _format_ratio(geometric_mean_ratio(verdicts)), "", "",
        _summary_reason(verdicts),
    )
    lines_cells = [_TABLE_HEADERS, *body, summary]
    # The reason column is last and free text, so it is left unpadded.
    widths = [
        max(len(cells[column]) for cells in lines_cells) for column in range(len(_TABLE_HEADERS))
    ]
    numeric_columns = {4, 5}

    def format_line(cells: Sequence[str]) -> str:
        parts = []
        for column, cell in enumerate(cells):
            if column == len(cells) - 1:
                parts.append(cell)
            elif column in numeric_columns:
                parts.append(cell.rjust(widths[column]))
            else:
                parts.append(cell.ljust(widths[column]))
        return "  ".join(parts).rstrip()

    separator = "  ".join("-" * width for width in widths)
    lines = [format_line(_TABLE_HEADERS), separator]
    lines += [format_line(cells) for cells in body]
    lines += [separator, format_line(summary)]
    return "\n".join(lines)


def atomic_write_csv(path: Path, fieldnames: Sequence[str], records: Iterable[dict]) -> None:
    """Write a CSV next to its destination and rename it in, so readers never see half a file."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(records)
    write_atomic(path, text.getvalue())


def _verdict_record(verdict: Verdict) -> dict:
    """Verdict as a CSV record with NaN written as an empty cell."""
    record = dataclasses.asdict(verdict)
    for key, value in record.items():
        if isinstance(value, float) and math.isnan(value):
            record[key] = ""
    return record


def write_verdicts_csv(verdicts: Iterable[Verdict], path: str | os.PathLike) -> None:
    """Write the verdicts to path atomically (bench.records.write_atomic)."""
    atomic_write_csv(Path(path), _VERDICT_COLUMNS, (_verdict_record(v) for v in verdicts))
