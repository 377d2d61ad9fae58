"""Tables of one run: best configurations, problem rows, precision trade-offs and run facts."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import pandas as pd

from bench.records import STATUS_OK
from reports.energy import row_energy
from reports.order import sort_report_rows
from reports.runs import Run, measured_op_rows
from reports.values import is_positive, joined_unique, positive_mask

REFERENCE_KEYS = ["op", "workload", "params", "batch_size", "device", "isa", "threads"]
ENV_FACTS = ("cpu_model", "l1d_bytes", "l2_bytes", "l3_bytes", "torch_version", "fingerprint")
# First metric that every row of a group has decides the group's throughput unit.
THROUGHPUT_METRICS = (
    ("samples_per_s", "samples/s"),
    ("gbps", "GB/s"),
    ("gflops", "GFLOP/s"),
    ("calls_per_s", "calls/s"),
)


def throughput_metric(rows: pd.DataFrame) -> tuple[str, str]:
    """The first throughput column every row has, and its unit."""
    for column, unit in THROUGHPUT_METRICS:
        if not rows.empty and positive_mask(rows[column]).all():
            return column, unit
    return "calls_per_s", "calls/s"


SUMMARY_COLUMNS = ["op", "workload", "device", "impl", "precision", "isa", "threads",
                   "batch_size", "throughput", "unit", "joules_per_sample", "avg_power_w",
                   "median_s", "efficiency", "roof", "noise", "configs"]


def best_rows(frame: pd.DataFrame) -> list[tuple[pd.Series, str, str, int]]:
    """Per (op, workload, device): the fastest measured row, its throughput column and unit,
    and how many configurations it beat (ties go to the lower median time)."""
    best = []
    for _, group in measured_op_rows(frame).groupby(["op", "workload", "device"]):
        column, unit = throughput_metric(group)
        ranked = group.assign(_rate=group[column].fillna(-math.inf))
        row = ranked.sort_values(["_rate", "median_s"], ascending=[False, True]).iloc[0]
        best.append((row, column, unit, len(group)))
    return best


def summary_table(frame: pd.DataFrame, roofline: pd.DataFrame,
                  op_order: Mapping[str, float]) -> pd.DataFrame:
    """Best configuration per (op, workload, device): throughput, energy, efficiency, noise."""
    efficiency = roofline.set_index("row_id")["efficiency"] if not roofline.empty else {}
    roofs = roofline.set_index("row_id")["roof"] if not roofline.empty else {}
    records = []
    for best, column, unit, configs in best_rows(frame):
        noise = best["iqr_s"] / best["median_s"] if is_positive(best["median_s"]) else math.nan
        energy = row_energy(best)
        records.append({
            "op": best["op"], "workload": best["workload"], "device": best["device"],
            "impl": best["impl"], "precision": best["precision"], "isa": best["isa"],
            "threads": best["threads"], "batch_size": best["batch_size"],
            "throughput": best[column], "unit": unit,
            "joules_per_sample": energy["joules_per_sample"],
            "avg_power_w": energy["avg_power_w"], "median_s": best["median_s"],
            "efficiency": float(efficiency.get(best["row_id"], math.nan)),
            "roof": roofs.get(best["row_id"], ""),
            "noise": noise, "configs": configs,
        })
    return sort_report_rows(pd.DataFrame(records, columns=SUMMARY_COLUMNS), op_order)


def problem_rows_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Skipped and failed configurations grouped by reason."""
    columns = ["status", "op", "impl", "precision", "reason", "rows", "isa", "threads",
               "workloads"]
    failed = frame[frame["status"] != STATUS_OK]
    records = []
    keys = ["status", "op", "impl", "precision", "error"]
    for key, rows in failed.groupby(keys, sort=True):
        record = dict(zip(keys, key))
        record["reason"] = record.pop("error") or "(no reason given)"
        record.update(rows=len(rows), isa=joined_unique(rows["isa"]),
                      threads=joined_unique(rows["threads"]),
                      workloads=joined_unique(rows["workload"]))
        records.append(record)
    return pd.DataFrame(records, columns=columns)


LEFT_OUT_COLUMNS = ["reason", "configurations", "impls"]


def left_out_records(args: Mapping[str, Any]) -> list[dict]:
    """The well-formed records of args.json's "left_out" (the planner's summary)."""
    records = args.get("left_out")
    if not isinstance(records, list):
        return []
    return [record for record in records if isinstance(record, dict)
            and isinstance(record.get("reason"), str)
            and isinstance(record.get("configurations"), int)]


def left_out_table(args: Mapping[str, Any]) -> pd.DataFrame:
    """Configurations the planner left out (cannot run here, not asked for by name), by reason."""
    return pd.DataFrame([(record["reason"], record["configurations"],
                          ", ".join(str(name) for name in record.get("impls") or []))
                         for record in left_out_records(args)], columns=LEFT_OUT_COLUMNS)


TRADEOFF_COLUMNS = ["op", "impl", "workload", "device", "isa", "threads", "precision",
                    "speedup_vs_fp32", "rel_error", "auc_delta", "ctr_abs_diff"]


def precision_tradeoffs(frame: pd.DataFrame, op_order: Mapping[str, float]) -> pd.DataFrame:
    """Each non-fp32 row against the fastest fp32 row of the same problem and machine slot."""
    rows = measured_op_rows(frame)
    fp32 = rows[(rows["precision"] == "fp32") & positive_mask(rows["median_s"])]
    if fp32.empty:
        return pd.DataFrame(columns=TRADEOFF_COLUMNS)
    reference = (fp32.sort_values("median_s").drop_duplicates(REFERENCE_KEYS)
                 [REFERENCE_KEYS + ["median_s", "auc"]]
                 .rename(columns={"median_s": "fp32_median_s", "auc": "fp32_auc"}))
    lower = rows[rows["precision"] != "fp32"].merge(reference, on=REFERENCE_KEYS, how="inner")
    lower["speedup_vs_fp32"] = lower["fp32_median_s"] / lower["median_s"]
    lower["auc_delta"] = lower["auc"] - lower["fp32_auc"]
    return sort_report_rows(lower[TRADEOFF_COLUMNS], op_order)


def sample_label(calls_per_sample: Any) -> str:
    """What one timing sample is: a single call, or the mean of a block of N calls."""
    try:
        calls = int(calls_per_sample)
    except (TypeError, ValueError):
        calls = 0
    if calls == 1:
        return "single calls"
    if calls > 1:
        return f"{calls}-call block means"
    return "samples of unrecorded block size"


def clock_and_isa_facts(run: Run) -> list[tuple[str, str]]:
    """The spin-loop clock the run saw, what the libraries reported and which are unverified."""
    facts = []
    clock = run.env.get("effective_clock")
    if isinstance(clock, dict) and clock.get("effective_clock_hz"):
        facts.append(("effective clock (spin loop, one core)",
                      f"{clock['effective_clock_hz'] / 1e9:.2f} GHz"))
    elif isinstance(clock, dict):
        facts.append(("effective clock", f"not measured: {clock.get('reason', 'no reason')}"))
    for effective in sorted({value for value in run.frame["isa_effective"] if value}):
        unverified = [part.split("=", 1)[0] for part in effective.split(";")
                      if part.endswith("(unverified)")]
        note = (f" ({', '.join(unverified)}: unverified, the knob's value, not the library's "
                "report)" if unverified else "")
        facts.append(("isa_effective", effective + note))
    return facts


def run_facts_table(run: Run) -> pd.DataFrame:
    """Host facts, arguments and row counts of a run as fact/value lines."""
    facts = [("directory", str(run.directory)), ("label", run.label)]
    run_ids = joined_unique(value for value in run.frame["run_id"] if value)
    if run_ids:
        facts.append(("run_id", run_ids))
    facts += [(key, run.env[key]) for key in ENV_FACTS if key in run.env]
    facts += clock_and_isa_facts(run)
    counts = run.frame["status"].value_counts()
    facts += [(f"rows {status}", int(count)) for status, count in counts.items()]
    left_out = left_out_records(run.args)
    if left_out:
        facts.append(("left out of the plan", f"{sum(r['configurations'] for r in left_out)} "
                      "configurations (by reason under Skipped and failed configurations)"))
    facts += [(f"args.{key}", value) for key, value in sorted(run.args.items())
              if key != "left_out"]
    return pd.DataFrame(
        [(name, value if isinstance(value, (str, int, float)) else json.dumps(value))
         for name, value in facts],
        columns=["fact", "value"],
    )
