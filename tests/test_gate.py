"""The instruction gate and the corrected statistics: counts by factor, BH across rows, policies."""

from __future__ import annotations

import json
import math

import pytest

from bench.records import ResultRow
from reports import check
from reports.compare import adjust_p_values, compare_rows


def _counted(task_key="k", instructions=1_000_000.0, code_version="cv", **fields) -> ResultRow:
    """An ok row of a --metric instructions run (no times)."""
    return ResultRow(task_key=task_key, op="sls", impl="embedding_bag", fingerprint="fp",
                     code_version=code_version, instructions=instructions,
                     instruction_calls=3, **fields)


def test_instruction_counts_are_decided_by_the_factor():
    baseline = [_counted("same"), _counted("up"), _counted("down"), _counted("small")]
    candidate = [_counted("same"), _counted("up", 1_250_000.0), _counted("down", 700_000.0),
                 _counted("small", 1_010_000.0)]
    verdicts = {v.task_key: v for v in compare_rows(baseline, candidate, factor=0.02,
                                                    metric="instructions")}
    assert verdicts["up"].verdict == "REGRESSED" and verdicts["up"].ratio == pytest.approx(1.25)
    assert "1,000,000 -> 1,250,000" in verdicts["up"].reason
    assert verdicts["down"].verdict == "IMPROVED"
    assert verdicts["small"].verdict == "UNCHANGED" and verdicts["same"].verdict == "UNCHANGED"
    assert all(math.isnan(v.p_value) for v in verdicts.values())


def test_changed_code_is_reported_as_changed_with_its_count_not_as_regressed():
    (verdict,) = compare_rows([_counted()], [_counted(instructions=1_250_000.0,
                                                      code_version="new")],
                              factor=0.02, metric="instructions")
    assert verdict.verdict == "NOT_COMPARABLE"
    assert "impl code changed" in verdict.reason and "x1.250" in verdict.reason


def test_rows_without_counts_are_not_comparable_in_instruction_mode():
    timed = ResultRow(task_key="k", op="sls", impl="embedding_bag", fingerprint="fp",
                      code_version="cv", samples_s="[1.0, 1.0, 1.0]", median_s=1.0)
    (verdict,) = compare_rows([timed], [_counted()], metric="instructions")
    assert verdict.verdict == "NOT_COMPARABLE" and "baseline" in verdict.reason


def test_benjamini_hochberg_raises_a_lone_small_p_among_many_rows():
    adjusted = adjust_p_values([0.004] + [0.5] * 9)
    assert adjusted[0] == pytest.approx(0.04)  # 0.004 x 10 rows / rank 1
    assert all(value <= 1 for value in adjusted)
    assert adjust_p_values([]) == []


def test_p_values_are_adjusted_across_rows():
    # Ten rows: one with a small within-run shift that a lone rank test calls significant.
    baseline = [ResultRow(task_key=f"k{i}", op="op", impl="impl", fingerprint="fp",
                          code_version="cv", samples_s=json.dumps([1.0 + 0.01 * j
                                                                   for j in range(8)]))
                for i in range(10)]
    shifted = [1.5 + 0.01 * j for j in range(8)]
    candidate = [ResultRow(**{**row.__dict__, "samples_s": json.dumps(
        shifted if row.task_key == "k0" else [1.0 + 0.01 * j for j in range(8)])})
        for row in baseline]
    single = compare_rows(baseline[:1], candidate[:1], factor=0.1, alpha=0.01)
    together = {v.task_key: v for v in compare_rows(baseline, candidate, factor=0.1, alpha=0.01)}
    assert together["k0"].p_value > single[0].p_value  # the correction costs the lone row
    assert together["k0"].verdict == "REGRESSED"  # a clear shift still passes it
    assert all(together[f"k{i}"].verdict == "UNCHANGED" for i in range(1, 10))


def test_different_timing_policies_are_not_comparable():
    row = ResultRow(task_key="k", op="op", impl="impl", fingerprint="fp", code_version="cv",
                    samples_s="[1.0, 1.0, 1.0]")
    (verdict,) = compare_rows([row], [row], baseline_policy={"min_run_time_s": 0.3},
                              candidate_policy={"min_run_time_s": 1.0})
    assert verdict.verdict == "NOT_COMPARABLE"
    assert "min_run_time_s: 0.3 vs 1.0" in verdict.reason


def _write_run(directory, rows):
    from bench.records import ResultsWriter

    directory.mkdir(parents=True)
    with ResultsWriter(directory / "results.csv") as writer:
        for row in rows:
            writer.write(row)
    return directory


def test_a_failing_instruction_check_names_the_moved_rows_and_the_rebaseline_command(
        tmp_path, capsys):
    baseline = _write_run(tmp_path / "base", [_counted("a"), _counted("b")])
    candidate = _write_run(tmp_path / "cand", [_counted("a"), _counted("b", 1_250_000.0)])
    code = check.run_check(baseline, candidate, factor=0.02, metric="instructions")
    output = capsys.readouterr().out
    assert code == check.EXIT_REGRESSED
    assert "REGRESSED: sls/embedding_bag" in output and "+25.0% instructions" in output
    assert f"--candidate {candidate} --update-baseline" in output


def test_the_check_refuses_a_run_of_the_other_metric(tmp_path, capsys):
    counted = _write_run(tmp_path / "counted", [_counted()])
    code = check.run_check(counted, counted)  # metric time, but the runs hold counts
    assert code == check.EXIT_CANNOT_COMPARE
    assert "add --metric instructions" in capsys.readouterr().err
