"""Two runs side by side: the checker's verdicts on their shared task keys, per row and per op."""

from __future__ import annotations

from typing import Mapping

import pandas as pd

from bench.records import ResultRow
from reports.compare import DEFAULT_ALPHA, DEFAULT_FACTOR, compare_rows
from reports.order import sort_report_rows
from reports.runs import Run
from reports.values import geometric_mean

COMPARISON_COLUMNS = ["op", "impl", "workload", "precision", "params", "device", "isa",
                      "threads", "batch_size", "median_s_a", "median_s_b", "ratio", "verdict",
                      "p_value", "code_changed", "reason"]


# Verdicts that compared two medians; the rest (NOT_COMPARABLE, status changes) did not.
COMPARED_VERDICTS = ("IMPROVED", "REGRESSED", "UNCHANGED")


def _latest_by_task_key(rows: list[ResultRow]) -> list[ResultRow]:
    """One row per task key, the last one, as a resumed run may have measured a key twice."""
    return list({row.task_key: row for row in rows}.values())


def compare_runs(first: Run, second: Run,
                 op_order: Mapping[str, float]) -> tuple[pd.DataFrame, int, int]:
    """The checker's verdicts (reports.compare.compare_rows, across hosts and code versions)
    for the task keys both runs have, with ratio = second median / first median, plus the
    counts of task keys only one run has."""
    first_rows, second_rows = _latest_by_task_key(first.rows), _latest_by_task_key(second.rows)
    verdicts = compare_rows(first_rows, second_rows, DEFAULT_FACTOR, DEFAULT_ALPHA,
                            check_code_version=False, across_hosts=True)
    by_key = {"a": {row.task_key: row for row in first_rows},
              "b": {row.task_key: row for row in second_rows}}
    records = []
    for verdict in verdicts:
        row_a, row_b = by_key["a"].get(verdict.task_key), by_key["b"].get(verdict.task_key)
        if row_a is None or row_b is None:
            continue  # NEW or MISSING: counted below, not matched
        records.append({
            "op": verdict.op, "impl": verdict.impl, "workload": verdict.workload,
            "precision": verdict.precision, "params": row_b.params, "device": row_b.device,
            "isa": row_b.isa, "threads": row_b.threads, "batch_size": row_b.batch_size,
            "median_s_a": row_a.median_s, "median_s_b": row_b.median_s, "ratio": verdict.ratio,
            "verdict": verdict.verdict, "p_value": verdict.p_value,
            "code_changed": row_a.code_version != row_b.code_version, "reason": verdict.reason,
        })
    only_first = sum(verdict.verdict == "MISSING" for verdict in verdicts)
    only_second = sum(verdict.verdict == "NEW" for verdict in verdicts)
    matched = pd.DataFrame(records, columns=COMPARISON_COLUMNS)
    return sort_report_rows(matched, op_order), only_first, only_second


def comparison_summary(matched: pd.DataFrame, op_order: Mapping[str, float]) -> pd.DataFrame:
    """Per op: matched rows, geometric-mean ratio, extremes and the checker's verdict counts."""
    columns = ["op", "matched", "geomean_ratio", "min_ratio", "max_ratio", "improved",
               "regressed", "unchanged", "not_comparable", "code_changed"]
    records = []
    for op, rows in matched.groupby("op", sort=False):
        verdicts = rows["verdict"]
        records.append({
            "op": op, "matched": len(rows), "geomean_ratio": geometric_mean(rows["ratio"]),
            "min_ratio": rows["ratio"].min(), "max_ratio": rows["ratio"].max(),
            "improved": int((verdicts == "IMPROVED").sum()),
            "regressed": int((verdicts == "REGRESSED").sum()),
            "unchanged": int((verdicts == "UNCHANGED").sum()),
            "not_comparable": int((~verdicts.isin(COMPARED_VERDICTS)).sum()),
            "code_changed": int(rows["code_changed"].sum()),
        })
    return sort_report_rows(pd.DataFrame(records, columns=columns), op_order)
