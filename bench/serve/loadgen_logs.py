"""LoadGen's own figures, read from the detail log it writes (mlperf_log_detail.txt)."""

from __future__ import annotations

import json
from pathlib import Path

DETAIL_FILENAME = "mlperf_log_detail.txt"
DETAIL_PREFIX = ":::MLLOG "
# Latency percentiles LoadGen reports, as its detail-log keys name them, and the names used
# for them in rows (seconds).
PERCENTILE_KEYS = {"50.00": "p50_s", "90.00": "p90_s", "95.00": "p95_s", "97.00": "p97_s",
                   "99.00": "p99_s", "99.90": "p999_s"}


class LoadGenLogError(ValueError):
    """A LoadGen log that is missing or lacks the result entries."""


def read_detail(directory: Path) -> dict:
    """Every key of the detail log's MLLOG entries -> its value (the last one wins)."""
    path = Path(directory) / DETAIL_FILENAME
    if not path.is_file():
        raise LoadGenLogError(f"{path}: LoadGen wrote no detail log")
    entries = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(DETAIL_PREFIX):
            try:
                record = json.loads(line[len(DETAIL_PREFIX):])
            except ValueError:
                continue  # LoadGen's own warnings can be multi-line; skip what is not JSON
            entries[record.get("key")] = record.get("value")
    return entries


def figures(directory: Path) -> dict:
    """A run's results from the detail log: validity, QPS, latency percentiles in seconds."""
    entries = read_detail(directory)
    if "result_validity" not in entries:
        raise LoadGenLogError(f"{Path(directory) / DETAIL_FILENAME}: no result_validity entry "
                              "(the run did not finish)")
    found = {"result": entries["result_validity"],
             "valid": entries["result_validity"] == "VALID",
             "scenario": entries.get("effective_scenario"),
             "perf_constraints_met": entries.get("result_perf_constraints_met"),
             "min_duration_met": entries.get("result_min_duration_met"),
             "min_queries_met": entries.get("result_min_queries_met"),
             "early_stopping_met": entries.get("early_stopping_met"),
             "invalid_reason": entries.get("result_invalid_reason", ""),
             "query_count": entries.get("result_query_count"),
             "overlatency_query_count": entries.get("result_overlatency_query_count"),
             "target_qps": entries.get("effective_target_qps"),
             "target_latency_s": _seconds(entries.get("effective_target_latency_ns")),
             "target_latency_percentile": entries.get("effective_target_latency_percentile"),
             "min_duration_ms": entries.get("effective_min_duration_ms"),
             "min_query_count": entries.get("effective_min_query_count"),
             "loadgen_version": entries.get("loadgen_version")}
    # QPS: Server reports scheduled and completed samples per second, Offline samples per
    # second, SingleStream none (its QPS is 1 / the mean latency, with LoadGen's overhead).
    for key, name in (("result_scheduled_samples_per_sec", "scheduled_qps"),
                      ("result_completed_samples_per_sec", "completed_qps"),
                      ("result_samples_per_second", "completed_qps"),
                      ("result_qps_with_loadgen_overhead", "completed_qps")):
        if key in entries and name not in found:
            found[name] = float(entries[key])
    for key, name in (("result_min_latency_ns", "min_s"), ("result_max_latency_ns", "max_s"),
                      ("result_mean_latency_ns", "mean_s")):
        found[name] = _seconds(entries.get(key))
    for percentile, name in PERCENTILE_KEYS.items():
        found[name] = _seconds(entries.get(f"result_{percentile}_percentile_latency_ns"))
    return found


def _seconds(nanoseconds) -> float:
    return float("nan") if nanoseconds is None else float(nanoseconds) / 1e9
