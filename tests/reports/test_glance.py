"""The report's first screen: best whole model against the reference, the roofline, facts folded."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest

from bench.records import ResultRow
from reports import glance, roofline, roofs, runs
from reports.build import build_report
from conftest import FIXTURES_DIR, write_run

FIXTURES = FIXTURES_DIR / "reports"
ENV = {"cpu_model": "Hand CPU", "torch_version": "2.13.0", "l3_bytes": 8 << 20}


def model_row(op: str, impl: str, precision: str, median_s: float, batch_size: int = 2048,
              threads: int = 1, baseline: bool = False) -> ResultRow:
    """A measured whole-model row."""
    return ResultRow(op=op, impl=impl, precision=precision, median_s=median_s,
                     iqr_s=0.01 * median_s, is_baseline=baseline, workload="kaggle",
                     device="cpu", isa="native", threads=threads, batch_size=batch_size,
                     samples_per_s=batch_size / median_s, status="ok",
                     task_key=f"{op}-{impl}-{precision}-{threads}-{batch_size}")


def test_best_whole_model_is_the_fastest_non_reference_row_with_its_same_slot_ratio():
    rows = [model_row("dlrm_train", "per_table", "fp32", 0.08, baseline=True),
            model_row("dlrm_train", "fused", "bf16", 0.02),
            model_row("dlrm_train", "dlrm_reference", "fp32", 0.10),
            # Faster per sample, but the reference never ran with 2 threads: no ratio there.
            model_row("dlrm_infer", "per_table", "fp32", 0.004, threads=2, baseline=True),
            model_row("dlrm_infer", "per_table", "fp32", 0.010, baseline=True),
            model_row("dlrm_infer", "dlrm_reference", "fp32", 0.020),
            model_row("sls_multi", "batched", "fp32", 0.0001)]  # not a whole model
    models = glance.best_model_table(runs.rows_to_frame(rows), {}).set_index("op")
    assert set(models.index) == {"dlrm_train", "dlrm_infer"}
    train = models.loc["dlrm_train"]
    assert (train["impl"], train["precision"]) == ("fused", "bf16")
    assert train["samples_per_s"] == pytest.approx(2048 / 0.02)
    assert train["vs_reference"] == pytest.approx(5.0)
    assert train["reference_samples_per_s"] == pytest.approx(2048 / 0.10)
    infer = models.loc["dlrm_infer"]
    assert infer["threads"] == 2 and math.isnan(infer["vs_reference"])
    line = glance.model_line(glance.best_model_table(runs.rows_to_frame(rows), {}))
    assert "dlrm_infer" in line and "no dlrm_reference row in the same slot" in line


def test_only_the_reference_or_no_model_rows_give_no_best_model():
    only_reference = [model_row("dlrm_train", "dlrm_reference", "fp32", 0.1)]
    assert glance.best_model_table(runs.rows_to_frame(only_reference), {}).empty
    assert glance.best_model_table(runs.rows_to_frame([]), {}).empty


def test_placement_says_what_bounds_each_ops_best_configuration():
    run = runs.load_run(FIXTURES / "handmade")
    placed_rows = roofline.roofline_table(run.frame, roofs.group_ceilings(run.frame, run.env))
    placement = glance.placement_table(run.frame, placed_rows, run.op_order).set_index("op")
    # The summary's best rows (sls fbgemm int8, fc fbgemm int8) and their bounds.
    assert placement.loc["sls", ["precision", "bound"]].tolist() == ["int8", "memory"]
    assert placement.loc["sls", "efficiency"] == pytest.approx(0.02)
    assert placement.loc["fc", ["precision", "bound"]].tolist() == ["int8", "compute"]
    assert placement.loc["interaction", "bound"] == "memory"
    line = glance.placement_line(placement.reset_index())
    assert "2 memory-bound, 1 compute-bound" in line and "2.0% to 50.0%" in line


def test_the_report_opens_with_the_glance_and_folds_the_run_facts(tmp_path):
    op_facts = {"dlrm_train": {"report_order": 1, "probe": False, "single_table": False}}
    rows = [model_row("dlrm_train", "per_table", "fp32", 0.08, baseline=True),
            model_row("dlrm_train", "dlrm_reference", "fp32", 0.10)]
    report = build_report([write_run(tmp_path / "run", rows, ENV, {"op_facts": op_facts})])
    page = (report / "index.html").read_text(encoding="utf-8")
    sections = re.findall(r'<section id="([^"]+)">', page)
    assert sections[:2] == ["glance", "runs"]
    first_screen = page[page.index('<section id="glance">'):page.index('<section id="runs">')]
    assert "Run run on Hand CPU, torch 2.13.0: 2 row(s) measured, 0 skipped, 0 failed." in page
    assert "1.25x the public reference (dlrm_reference)" in first_screen
    assert "nothing is placed on the roofline" in first_screen  # no probes in this run
    # The raw arguments (op_facts JSON) are in the run section, inside a closed <details>.
    facts = page[page.index('<section id="runs">'):]
    facts = facts[:facts.index("</section>")]
    assert "args.op_facts" in facts and "args.op_facts" not in first_screen
    assert facts.count("<details>") == 1 and facts.index("<details>") < facts.index("op_facts")
    markdown = (report / "summary.md").read_text(encoding="utf-8")
    assert markdown.index("## At a glance") < markdown.index("## Runs")
    assert "<details><summary>Run run: host facts" in markdown


def test_the_fixture_runs_get_a_glance(tmp_path):
    handmade = Path(shutil.copytree(FIXTURES / "handmade", tmp_path / "handmade"))
    page = (build_report([handmade]) / "index.html").read_text(encoding="utf-8")
    first_screen = page[page.index('<section id="glance">'):page.index('<section id="runs">')]
    assert "No measured whole-model rows (dlrm_train, dlrm_infer)" in first_screen
    assert "2 memory-bound, 1 compute-bound" in first_screen
