"""Run directories as frames: results.csv, env.json and args.json read into one Run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from bench.records import (ARGS_FILENAME, COLUMNS, ENV_FILENAME, RESULTS_FILENAME, STATUS_OK,
                           ResultRow, dumps_compact, read_rows)

CEILING_OPS = ("membw", "gemm_peak")
_FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(ResultRow)}


@dataclasses.dataclass
class Run:
    """One run directory: its results as a frame plus its host facts and arguments."""

    directory: Path
    label: str
    frame: pd.DataFrame
    env: dict[str, Any]
    args: dict[str, Any]
    rows: list[ResultRow] = dataclasses.field(default_factory=list)  # what frame was made of
    # Report order of the ops, as the run recorded it (args.json "op_facts": each Op's
    # report_order); reports load no torch, so they cannot ask the registry.
    op_order: dict[str, float] = dataclasses.field(default_factory=dict)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict; missing or malformed files give an empty dict."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def parse_json_object(text: str) -> dict[str, Any]:
    """A JSON object cell as a dict; anything else gives an empty dict."""
    try:
        value = json.loads(text or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def canonical_json(text: str) -> str:
    """Stable text of a JSON cell so that key order never breaks matching."""
    try:
        return dumps_compact(json.loads(text or "{}"))
    except (TypeError, ValueError):
        return str(text)


def rows_to_frame(rows: list[ResultRow]) -> pd.DataFrame:
    """Result rows as a typed frame with a row_id, canonical params and calls per second."""
    frame = pd.DataFrame([dataclasses.asdict(row) for row in rows], columns=list(COLUMNS))
    for name, kind in _FIELD_TYPES.items():
        if kind == "float":
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(float)
        elif kind == "int":
            frame[name] = pd.to_numeric(frame[name], errors="coerce").fillna(0).astype(int)
        elif kind == "bool":
            frame[name] = frame[name].astype(bool)
        else:
            frame[name] = frame[name].fillna("").astype(str)
    frame["params"] = frame["params"].map(canonical_json)
    median = frame["median_s"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["calls_per_s"] = np.where(median > 0, 1.0 / median, np.nan)
    frame.insert(0, "row_id", np.arange(len(frame)))
    return frame


def recorded_op_order(args: dict[str, Any]) -> dict[str, float]:
    """The report order of the ops a run's args.json recorded (op_facts' report_order)."""
    facts = args.get("op_facts")
    if not isinstance(facts, dict):
        return {}
    order = {}
    for name, op_facts in facts.items():
        position = op_facts.get("report_order") if isinstance(op_facts, dict) else None
        if isinstance(position, (int, float)):
            order[name] = position
    return order


def merged_op_order(runs: Iterable[Run]) -> dict[str, float]:
    """One op order for several runs: an op takes the position of the first run recording it."""
    merged: dict[str, float] = {}
    for run in runs:
        for name, position in run.op_order.items():
            merged.setdefault(name, position)
    return merged


def load_run(directory: Path, label: str | None = None) -> Run:
    """Read results.csv, env.json and args.json of a run directory."""
    directory = Path(directory)
    rows = read_rows(directory / RESULTS_FILENAME)
    args = read_json_object(directory / ARGS_FILENAME)
    return Run(
        directory=directory,
        label=label or directory.name,
        frame=rows_to_frame(rows),
        env=read_json_object(directory / ENV_FILENAME),
        args=args,
        rows=rows,
        op_order=recorded_op_order(args),
    )


def measured_op_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of real operators (not the machine-ceiling probes)."""
    mask = (frame["status"] == STATUS_OK) & ~frame["op"].isin(CEILING_OPS)
    return frame[mask]
