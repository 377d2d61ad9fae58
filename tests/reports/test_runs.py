"""Loaded runs carry their own op order; shared value helpers; module sizes of reports/."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from bench.precisions import stored_row_bytes
from bench.records import ResultRow, ResultsWriter
from reports import order, runs
from reports.compare import Side, compare_rows, geometric_mean_ratio, Verdict
from reports.footprint import params_row_bytes
from reports.values import geometric_mean
from conftest import REPO_ROOT

MODULE_LINE_LIMIT = 500


def write_run(directory: Path, ops: list[str], op_facts: dict) -> Path:
    """A run with one measured row per op and the given op_facts in args.json."""
    directory.mkdir(parents=True)
    with ResultsWriter(directory / "results.csv") as writer:
        for op in ops:
            writer.write(ResultRow(op=op, impl="x", median_s=1.0, status="ok", task_key=op))
    (directory / "args.json").write_text(json.dumps({"op_facts": op_facts}), encoding="utf-8")
    return directory


def test_each_run_carries_its_own_op_order(tmp_path):
    first = runs.load_run(write_run(tmp_path / "a", ["sls", "fc"],
                                    {"sls": {"report_order": 2}, "fc": {"report_order": 1}}))
    second = runs.load_run(write_run(tmp_path / "b", ["sls", "fc", "mlp"],
                                     {"sls": {"report_order": 1}, "fc": {"report_order": 3},
                                      "mlp": {"report_order": 2}, "bad": "not facts"}))
    # Loading the second run changes nothing about the first (no module-level state).
    assert first.op_order == {"sls": 2, "fc": 1}
    assert second.op_order == {"sls": 1, "fc": 3, "mlp": 2}
    assert order.sorted_ops(["sls", "fc", "zz"], first.op_order) == ["fc", "sls", "zz"]
    assert order.sorted_ops(["sls", "fc", "mlp"], second.op_order) == ["sls", "mlp", "fc"]
    # Several runs: the first run recording an op decides its place.
    assert runs.merged_op_order([first, second]) == {"sls": 2, "fc": 1, "mlp": 2}
    assert runs.merged_op_order([second, first]) == second.op_order
    again = runs.load_run(tmp_path / "a")
    assert again.op_order == first.op_order


def test_a_run_without_op_facts_sorts_ops_by_name(tmp_path):
    (tmp_path / "args.json").write_text("[1, 2]", encoding="utf-8")  # not an object
    with ResultsWriter(tmp_path / "results.csv") as writer:
        writer.write(ResultRow(op="sls", impl="x", median_s=1.0, task_key="k"))
    run = runs.load_run(tmp_path)
    assert run.op_order == {} and order.sorted_ops(["sls", "fc"], run.op_order) == ["fc", "sls"]


def test_geometric_mean_skips_what_has_no_logarithm():
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([2.0, 8.0, 0.0, -1.0, math.nan, math.inf]) == pytest.approx(4.0)
    assert math.isnan(geometric_mean([])) and math.isnan(geometric_mean([0.0, math.nan]))
    verdicts = [Verdict("k", "op", "impl", "w", "fp32", "UNCHANGED", ratio)
                for ratio in (0.5, 2.0, math.nan)]
    assert geometric_mean_ratio(verdicts) == pytest.approx(1.0)


def test_reports_read_row_sizes_from_the_shared_precision_table():
    assert stored_row_bytes(64, "int8") == 72  # 64 values + an fp32 scale and bias
    assert stored_row_bytes(64, "int4") == 36  # 32 bytes + an fp16 scale and bias
    for precision in ("fp32", "fp16", "bf16", "int8", "int4"):
        assert params_row_bytes({"dim": 16}, precision) == stored_row_bytes(16, precision)
    assert math.isnan(params_row_bytes({"dim": 16}, "fp8"))
    assert math.isnan(params_row_bytes({}, "fp32"))


def test_a_side_holds_what_bare_rows_did():
    rows = [ResultRow(task_key="a", op="sls", median_s=1.0, fingerprint="f",
                      samples_s=json.dumps([1.0, 1.01, 0.99, 1.0]))]
    slower = [dataclasses.replace(rows[0], median_s=2.0,
                                  samples_s=json.dumps([2.0, 2.01, 1.99, 2.0]))]
    assert compare_rows(rows, slower) == compare_rows(Side(rows), Side(slower))
    (verdict,) = compare_rows(Side(rows, policy={"min_run_time_s": 0.3}),
                              Side(slower, policy={"min_run_time_s": 1.0}))
    assert verdict.verdict == "NOT_COMPARABLE" and "min_run_time_s" in verdict.reason
    with pytest.raises(ValueError, match="rounds of both sides"):
        compare_rows(Side(rows, rounds=[rows]), slower)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Side(rows).policy = {}


def oversized_modules(directory: Path, limit: int = MODULE_LINE_LIMIT) -> list[str]:
    """The modules of a directory longer than limit lines."""
    return sorted(path.name for path in directory.glob("*.py")
                  if len(path.read_text(encoding="utf-8").splitlines()) > limit)


def test_no_reports_module_is_over_500_lines(tmp_path):
    assert oversized_modules(REPO_ROOT / "reports") == []
    (tmp_path / "long.py").write_text("x = 1\n" * (MODULE_LINE_LIMIT + 1), encoding="utf-8")
    (tmp_path / "short.py").write_text("x = 1\n" * MODULE_LINE_LIMIT, encoding="utf-8")
    assert oversized_modules(tmp_path) == ["long.py"]
