"""Merge several runs of one sweep into one results set by pooling each configuration's samples."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.records import (
    RESULTS_FILENAME,
    STATUS_ERROR,
    STATUS_OK,
    ResultRow,
    ResultsWriter,
    dumps_compact,
    encode_samples,
    samples_from_row,
    summarize,
)

class MergeError(ValueError):
    """Runs that cannot be pooled (another machine, other code, a key seen twice in one run)."""


def _index_run(rows: Sequence[ResultRow], position: int) -> dict[str, ResultRow]:
    """One run's rows by task_key; a key seen twice in a run has no single set of samples."""
    indexed: dict[str, ResultRow] = {}
    for row in rows:
        if row.task_key in indexed:
            raise MergeError(f"run {position}: duplicate task_key {row.task_key!r}")
        indexed[row.task_key] = row
    return indexed


def _check_same_identity(rows: Sequence[tuple[int, ResultRow]]) -> None:
    """Refuse to pool samples measured on another machine or with other impl code."""
    for field in ("fingerprint", "code_version"):
        values = {getattr(row, field) for _, row in rows}
        if len(values) > 1:
            first = rows[0][1]
            raise MergeError(
                f"task_key {first.task_key} ({first.op}/{first.impl}): {field} differs between "
                f"the runs ({', '.join(sorted(values))}); only runs of one checkout on one "
                "machine can be merged"
            )


def _finite_values(rows: Sequence[ResultRow], field: str) -> list[float]:
    """The finite values of a numeric field across rows."""
    values = [getattr(row, field) for row in rows]
    return [value for value in values if isinstance(value, float) and math.isfinite(value)]


def _pooled_row(rows: Sequence[ResultRow], run_id: str, total_runs: int) -> ResultRow:
    """One ok row whose samples are all rows' samples and whose statistics are recomputed."""
    first = rows[0]
    samples = [sample for row in rows for sample in samples_from_row(row)]
    summary = summarize(samples)
    median = summary.median_s
    merged = dataclasses.replace(first, run_id=run_id, timestamp=rows[-1].timestamp)
    merged.samples_s = encode_samples(samples)
    merged.n_samples = len(samples)
    if len({row.calls_per_sample for row in rows}) > 1:
        merged.calls_per_sample = 0  # samples averaging different numbers of calls: unknown
    merged.median_s, merged.mean_s, merged.min_s = median, summary.mean_s, summary.min_s
    merged.p90_s, merged.p99_s, merged.iqr_s = summary.p90_s, summary.p99_s, summary.iqr_s
    # Rates depend on the median: rescale them from the first row's own median.
    scale = first.median_s / median if first.median_s > 0 and median > 0 else math.nan
    merged.samples_per_s = first.samples_per_s * scale
    merged.gbps = first.gbps * scale
    merged.gflops = first.gflops * scale
    # Telemetry: averages of the per-run averages, the worst memory peak, the total energy.
    for field in ("cpu_util", "avg_power_w"):
        values_of_field = _finite_values(rows, field)
        setattr(merged, field, float(np.mean(values_of_field)) if values_of_field else math.nan)
    peaks = _finite_values(rows, "peak_rss_bytes")
    merged.peak_rss_bytes = max(peaks) if peaks else math.nan
    energies = _finite_values(rows, "energy_j")
    merged.energy_j = float(sum(energies)) if energies else math.nan
    merged.joules_per_sample = (
        merged.avg_power_w / merged.samples_per_s if merged.samples_per_s > 0 else math.nan
    )
    metrics = json.loads(first.metrics or "{}")
    metrics["merged_runs"] = len(rows)
    metrics["merged_of"] = total_runs
    if median > 0:
        metrics["noise_iqr_over_median"] = round(merged.iqr_s / median, 4)
        metrics["noisy"] = summary.noisy
    merged.metrics = dumps_compact(metrics)
    return merged


def _merged_row(
    located: Sequence[tuple[int, ResultRow]], run_id: str, total_runs: int
) -> ResultRow:
    """The merged row of one task_key from its (run position, row) pairs."""
    _check_same_identity(located)
    for position, row in located:
        if row.status == STATUS_ERROR:
            # One failure taints the whole set: pooled samples would hide a flaky crash.
            failed = dataclasses.replace(row, run_id=run_id)
            failed.error = f"error in run {position + 1} of {total_runs}: {row.error}"
            return failed
    for _, row in located:
        if row.status != STATUS_OK:
            # Skipped in some run: nothing complete was measured, so the set is skipped.
            return dataclasses.replace(row, run_id=run_id)
    return _pooled_row([row for _, row in located], run_id, total_runs)


def merge_runs(runs: Sequence[Sequence[ResultRow]], run_id: str = "merged") -> list[ResultRow]:
    """One row per task_key over all runs: samples concatenated, statistics recomputed."""
    # An error in any run makes an error row, a skip (and no error) a skipped row; rows keep
    # their fingerprint and code_version, which must agree. Order: first seen, run by run.
    if not runs:
        raise MergeError("no runs to merge")
    indexed_runs = [_index_run(rows, position) for position, rows in enumerate(runs)]
    order: dict[str, None] = {}
    for indexed in indexed_runs:
        order.update(dict.fromkeys(indexed))
    merged = []
    for task_key in order:
        located = [
            (position, indexed[task_key])
            for position, indexed in enumerate(indexed_runs)
            if task_key in indexed
        ]
        merged.append(_merged_row(located, run_id, len(runs)))
    return merged


def write_results(rows: Sequence[ResultRow], directory: str | os.PathLike) -> Path:
    """Write rows as directory/results.csv (replacing it); returns the file's path."""
    path = Path(directory) / RESULTS_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with ResultsWriter(path) as writer:
        for row in rows:
            writer.write(row)
    return path
