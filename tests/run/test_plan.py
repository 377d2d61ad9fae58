"""Plan pruning: what cannot run is a skip row only when asked for by name, else left out and
counted by reason; plan-time facts agree with the builders' own refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import registry
from bench.records import ResultRow
from bench.registry import BuildContext, Impl, Unsupported
from bench.run.execute import print_left_out
from bench.run.sweep import LeftOut, Named, plan
from conftest import run_cli
from reports.compare import FAILING_VERDICTS, compare_rows
from reports.check import report_verdicts
from reports.build import problems_section
from reports.runs import rows_to_frame
from reports.tables import left_out_table
from workloads import presets

SMOKE = presets.smoke()
NOTHING = Named()


def _plan(ops, precisions, named, device="cpu", options=None, impls=None):
    left_out = LeftOut()
    planned = plan(ops, [SMOKE], precisions, [device], ["native"], [1], seed=0,
                   options=options, impl_filter=impls, named=named, left_out=left_out)
    return planned, left_out


def _labels(planned) -> set[tuple]:
    return {(item.task.op, item.task.impl, item.task.precision) for item in planned}


def test_a_default_cross_product_plans_no_skip_rows_and_counts_what_it_left_out():
    everything = plan(["interaction", "fc"], [SMOKE], ["fp32", "bf16", "int8"], ["cpu"],
                      ["native"], [1], seed=0, options={"fc_layers": ["linear"]})
    planned, left_out = _plan(["interaction", "fc"], ["fp32", "bf16", "int8"], NOTHING,
                              options={"fc_layers": ["linear"]})
    assert planned and not any(item.skip_reason for item in planned)
    # Every configuration is either planned or counted, never lost.
    assert len(planned) + left_out.total() == len(everything)
    skipped_before = {item.task.key() for item in everything if item.skip_reason}
    assert skipped_before and not skipped_before & {item.task.key() for item in planned}
    records = {record["reason"]: record for record in left_out.records()}
    assert records["no int8 kernel"]["impls"] == ["fc/onednn", "interaction/cat",
                                                  "interaction/dot"]
    assert records["no int8 kernel"]["configurations"] == 3
    assert records["no bf16 kernel"]["impls"] == ["fc/onednn"]


def test_an_impl_and_a_precision_both_named_give_a_skip_row_with_its_reason():
    named = Named(impls=frozenset({"fbgemm_tbe"}), precisions=frozenset({"bf16"}))
    planned, left_out = _plan(["sls"], ["bf16"], named, options={"sls_modes": ["sum"]},
                              impls={"fbgemm_tbe"})
    assert len(planned) == 1 and left_out.total() == 0
    assert planned[0].skip_reason == ("sls/fbgemm_tbe has no bf16 kernel; it supports "
                                      "fp32, fp16")


def test_a_named_impl_at_a_default_precision_is_left_out():
    named = Named(impls=frozenset({"onednn"}))
    planned, left_out = _plan(["fc"], ["fp32", "bf16", "int8"], named,
                              options={"fc_layers": ["linear"]}, impls={"onednn"})
    assert _labels(planned) == {("fc", "onednn", "fp32")}
    assert not planned[0].skip_reason
    assert {record["reason"] for record in left_out.records()} == {"no bf16 kernel",
                                                                   "no int8 kernel"}


def test_an_impl_that_cannot_run_here_is_a_row_when_named(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    named = Named(impls=frozenset({"triton_tbe"}))
    planned, left_out = _plan(["sls"], ["fp32"], named, options={"sls_modes": ["sum"]},
                              impls={"triton_tbe"})
    assert len(planned) == 1 and "runs on cuda" in planned[0].skip_reason
    unnamed, left_out = _plan(["sls"], ["fp32"], NOTHING, options={"sls_modes": ["sum"]})
    assert "triton_tbe" not in {item.task.impl for item in unnamed}
    assert any("runs on cuda" in record["reason"] and record["impls"] == ["sls/triton_tbe"]
               for record in left_out.records())


def test_an_op_named_with_nothing_runnable_gets_one_skip_row_per_impl(monkeypatch):
    # The Triton TT impls would otherwise refuse the CPU before the precision.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    planned, left_out = _plan(["tt_sls"], ["int8"], Named(ops=frozenset({"tt_sls"})))
    assert {item.task.impl for item in planned} == set(registry.impls("tt_sls"))
    assert len(planned) == len(registry.impls("tt_sls"))
    assert all("no int8 kernel" in item.skip_reason for item in planned)
    # The same op from the default op list is left out entirely.
    planned, left_out = _plan(["tt_sls"], ["int8"], NOTHING)
    assert planned == [] and left_out.total() > 0


def test_variants_sized_for_another_device_are_never_rows():
    named = Named(ops=frozenset({"gemm_peak"}), impls=frozenset({"matmul"}),
                  precisions=frozenset({"fp32"}))
    planned, left_out = _plan(["gemm_peak"], ["fp32"], named, impls={"matmul"})
    sizes = {item.task.variant.get("size") for item in planned} - {None}
    assert sizes == {256, 512, 1024}
    assert not any(item.skip_reason for item in planned)
    assert [record["configurations"] for record in left_out.records()] == [3]
    # The builder's safety net refuses with the planner's reason.
    implementation = registry.impls("gemm_peak")["matmul"]
    context = BuildContext(workload=SMOKE, variant={"size": 8192}, precision="fp32",
                           device=torch.device("cpu"), seed=0)
    with pytest.raises(Unsupported) as refused:
        implementation.build(context)
    assert str(refused.value) == left_out.records()[0]["reason"]
    # On a GPU the big squares are its plateau.
    refusal = registry.refusal(implementation, {"size": 8192}, "fp32", "cuda:0", {})
    assert refusal is None


def test_tt_fused_needs_tt_tables_and_dense_only_impls_skip_tt_variants():
    named = Named(impls=frozenset({"tt_fused"}))
    planned, _ = _plan(["dlrm_train"], ["fp32"], named, impls={"tt_fused"})
    assert len(planned) == 1 and "--tt-tables" in planned[0].skip_reason
    planned, left_out = _plan(["dlrm_train"], ["fp32"], NOTHING,
                              options={"tt_tables": 1, "tt_ranks": [4]})
    by_impl = {}
    for item in planned:
        by_impl.setdefault(item.task.impl, []).append(bool(item.task.variant.get("tt_tables")))
    assert by_impl["tt_fused"] == [True]  # its dense variant is left out
    assert by_impl["per_table"] == [False, True]
    for dense_only in ("compiled", "onednn", "fused_sgd", "fbgemm_tbe", "fbgemm_tbe_adagrad"):
        assert by_impl[dense_only] == [False], dense_only
    assert not any(item.skip_reason for item in planned)
    reasons = {record["reason"] for record in left_out.records()}
    assert "has no TT-Rec tables (its dense variant runs)" in reasons


def test_refusal_reads_modules_and_device_precisions_without_building():
    def build(context):
        raise AssertionError("the planner must not build")

    peer = Impl("sls", "peer", build, ("fp32",),
                requires={"no_such_module_for_plan_test": "pip install it"})
    refusal = registry.refusal(peer, {}, "fp32", "cpu", {})
    assert refusal.about == registry.ABOUT_IMPL
    assert "no_such_module_for_plan_test" in refusal.reason and "pip install it" in refusal.reason
    lookups = registry.impls("sls")["embedding_bag"]
    assert registry.refusal(lookups, {"mode": "sum"}, "int8", "cpu", {}) is None
    on_gpu = registry.refusal(lookups, {"mode": "sum"}, "int8", "cuda:0", {})
    assert on_gpu.about == registry.ABOUT_PRECISION and on_gpu.short == "no int8 kernel on cuda"
    assert registry.refusal(lookups, {"mode": "sum"}, "bf16", "cuda:0", {}) is None


def test_host_facts_decide_at_plan_time(monkeypatch):
    """Peers not installed and huge pages switched off: a row when named, else left out."""
    from bench.ops import common

    monkeypatch.setattr(registry, "missing_module", lambda name: name == "fbgemm_gpu")
    monkeypatch.setattr(common, "transparent_huge_pages", lambda: "never")
    planned, left_out = _plan(["sls"], ["fp32"], NOTHING, options={"sls_modes": ["sum"]})
    impls = {item.task.impl for item in planned}
    assert "embedding_bag" in impls and not impls & {"fbgemm_tbe", "huge_pages"}
    reasons = {record["reason"]: record["impls"] for record in left_out.records()}
    missing = next(reason for reason in reasons if reason.startswith("fbgemm_gpu is not"))
    assert "install it with: pip install" in missing
    # The impl's own refusal comes before its precisions (fbgemm_tbe_infer has no fp32 too).
    assert reasons[missing] == ["sls/fbgemm_tbe", "sls/fbgemm_tbe_infer"]
    named = Named(impls=frozenset({"fbgemm_tbe", "huge_pages"}))
    planned, _ = _plan(["sls"], ["fp32"], named, options={"sls_modes": ["sum"]},
                       impls={"fbgemm_tbe", "huge_pages"})
    rows = {item.task.impl: item.skip_reason for item in planned}
    assert "needs fbgemm_gpu" in rows["fbgemm_tbe"]
    assert "transparent huge pages are 'never'" in rows["huge_pages"]


def test_the_plan_and_its_summary_are_deterministic():
    first = _plan(["sls", "dlrm_infer"], ["fp32", "bf16", "int8"], NOTHING)
    second = _plan(["sls", "dlrm_infer"], ["fp32", "bf16", "int8"], NOTHING)
    assert [item.task.key() for item in first[0]] == [item.task.key() for item in second[0]]
    assert first[1].records() == second[1].records()


def test_the_summary_prints_one_line_per_reason_and_the_report_shows_it(capsys):
    _, left_out = _plan(["interaction", "fc"], ["fp32", "bf16", "int8"], NOTHING,
                        options={"fc_layers": ["linear"]})
    print_left_out(left_out)
    lines = capsys.readouterr().err.splitlines()
    assert f"left out of the plan: {left_out.total()} configurations" in lines[0]
    assert len(lines) == 1 + len(left_out.records())
    assert lines[1].split()[:4] == ["3", "no", "int8", "kernel:"]
    # args.json carries the records; the report (no torch) turns them into a table.
    args = json.loads(json.dumps({"left_out": left_out.records()}))
    table = left_out_table(args)
    assert list(table["configurations"]) == [record["configurations"]
                                             for record in left_out.records()]
    assert left_out_table({"left_out": "garbage"}).empty
    section = problems_section(rows_to_frame([]), args)
    titles = [getattr(block, "title", "") for block in section.blocks]
    assert any(title.startswith("Left out of the plan") for title in titles)
    assert not any(getattr(block, "title", "").startswith("Left out")
                   for block in problems_section(rows_to_frame([]), {}).blocks)


def _row(task_key: str, status: str) -> ResultRow:
    samples = [1.0, 1.0, 1.0] if status == "ok" else []
    return ResultRow(task_key=task_key, op="op", impl="impl", fingerprint="fp",
                     code_version="cv", status=status, samples_s=json.dumps(samples),
                     median_s=1.0 if status == "ok" else math.nan)


def test_a_baseline_skip_row_the_plan_now_leaves_out_is_no_failure(tmp_path, capsys):
    baseline = [_row("measured", "ok"), _row("planned_skip", "skipped")]
    candidate = [_row("measured", "ok")]
    verdicts = {verdict.task_key: verdict.verdict
                for verdict in compare_rows(baseline, candidate)}
    assert verdicts["planned_skip"] not in FAILING_VERDICTS
    code = report_verdicts(list(compare_rows(baseline, candidate)), "a", "b", 0.5, 0.001,
                           tmp_path / "verdicts.csv")
    assert code == 0


@pytest.mark.slow
def test_the_sweep_prints_and_records_what_it_left_out_and_resumes(tmp_path):
    arguments = ["--ops", "interaction", "--workload", "smoke", "--precision", "fp32,int8",
                 "--min-run-time", "0.01", "--no-report", "--out", str(tmp_path)]
    result = run_cli(*arguments, "--run-id", "run")
    assert result.returncode == 0, result.stderr
    assert "left out of the plan: 2 configurations" in result.stderr
    run = tmp_path / "run"
    args = json.loads((run / "args.json").read_text())
    assert args["left_out"] == [{"reason": "no int8 kernel", "configurations": 2,
                                 "impls": ["interaction/cat", "interaction/dot"]}]
    assert "0 skipped" in result.stdout
    resumed = run_cli("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert "2 of 2 configurations already recorded" in resumed.stderr
