"""Replicates: a shift between worker processes is noise the wall-clock check must not call a
regression; a change consistent across processes still is one."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest

from bench.records import STATUS_OK, ResultRow, read_rows
from bench.run import execute as executing
from bench.run import sweep as sweeping
from bench.run.tasks import Task
from conftest import FAST_POLICY, FIXTURES_DIR, tiny_workload
from reports.check import check_verdicts, load_results, main, run_check, update_baseline
from reports.compare import compare_rows
from reports.spread import DEFAULT_PROCESS_SD, pool_replicates, replicate_index

FIXTURES = FIXTURES_DIR / "check" / "replicates"


def _verdicts(baseline: str, candidate: str, **options) -> dict[str, object]:
    """The plain check's verdicts of two fixture files, by task_key."""
    verdicts = check_verdicts(load_results(FIXTURES / f"{baseline}.csv"),
                              load_results(FIXTURES / f"{candidate}.csv"), **options)
    return {verdict.task_key: verdict for verdict in verdicts}


def _first_replicate(name: str) -> list[ResultRow]:
    """Replicate 1 of a fixture, as the plain run one process would have written."""
    rows = [row for row in load_results(FIXTURES / f"{name}.csv") if replicate_index(row) == 1]
    return [dataclasses.replace(row, metrics="{}") for row in rows]


def test_identical_code_shifted_between_processes_is_not_regressed(tmp_path, capsys):
    # Each process of either side is shifted as a whole (up to +50%): the candidate's
    # processes happened to be the slow ones, so the pooled samples differ "significantly".
    verdicts = _verdicts("aa_baseline", "aa_candidate")
    assert {v.verdict for v in verdicts.values()} == {"INCONCLUSIVE"}
    assert all(v.ratio == pytest.approx(1.235, abs=0.01) and v.p_value >= 0.01
               for v in verdicts.values())
    assert "3 vs 3 replicates" in verdicts["k1"].reason
    # The wolf: the samples of one process each, tested alone, call it a regression.
    alone = compare_rows(_first_replicate("aa_baseline"), _first_replicate("aa_candidate"))
    assert {v.verdict for v in alone} == {"REGRESSED"}
    assert run_check(FIXTURES / "aa_baseline.csv", FIXTURES / "aa_candidate.csv",
                     out_dir=tmp_path) == 0
    output = capsys.readouterr().out
    assert "6 rows INCONCLUSIVE" in output and "OK: no regression" in output
    assert set(pd.read_csv(tmp_path / "verdicts.csv")["verdict"]) == {"INCONCLUSIVE"}


def test_a_quiet_host_agrees_with_itself():
    assert {v.verdict for v in _verdicts("quiet_baseline", "quiet_candidate").values()} == {
        "UNCHANGED"}


def test_25_percent_more_work_consistent_across_replicates_is_regressed(tmp_path, capsys):
    verdicts = _verdicts("quiet_baseline", "slow_candidate")
    assert {v.verdict for v in verdicts.values()} == {"REGRESSED"}
    # The ratio is that of the replicates' geometric means (the fixture's process factors).
    expected = 1.25 * (1.02 * 0.98 * 1.01) ** (1 / 3) / (1.00 * 1.03 * 0.99) ** (1 / 3)
    assert all(v.ratio == pytest.approx(expected, rel=1e-3) for v in verdicts.values())
    assert all(v.p_value < 0.01 for v in verdicts.values())
    assert "between processes (3 vs 3 replicates)" in verdicts["k1"].reason
    assert run_check(FIXTURES / "quiet_baseline.csv", FIXTURES / "slow_candidate.csv",
                     out_dir=tmp_path) == 1
    assert "FAIL: 6 REGRESSED" in capsys.readouterr().out


def test_single_replicate_shift_inside_the_spread_is_inconclusive_and_exits_zero(
        tmp_path, capsys):
    # One process a side, k1 40% slower: with nothing known of this host's spread between
    # processes, the conservative default explains 40%.
    code = main(["--baseline", str(FIXTURES / "single_baseline.csv"),
                 "--candidate", str(FIXTURES / "single_candidate.csv"),
                 "--out-dir", str(tmp_path)])
    assert code == 0
    output = capsys.readouterr().out
    assert "1 rows INCONCLUSIVE" in output and "--replicates 5" in output
    verdicts = pd.read_csv(tmp_path / "verdicts.csv").set_index("task_key")
    assert verdicts.loc["k1", "verdict"] == "INCONCLUSIVE"
    assert verdicts.loc["k1", "ratio"] == pytest.approx(1.4)
    assert f"process sd {DEFAULT_PROCESS_SD:g}" in verdicts.loc["k1", "reason"]
    assert set(verdicts.drop(index="k1")["verdict"]) == {"UNCHANGED"}
    # A host known to be quiet (a measured figure) makes the same 40% a regression.
    code = main(["--baseline", str(FIXTURES / "single_baseline.csv"),
                 "--candidate", str(FIXTURES / "single_candidate.csv"),
                 "--out-dir", str(tmp_path), "--process-sd", "0.02"])
    assert code == 1
    assert pd.read_csv(tmp_path / "verdicts.csv").set_index("task_key").loc[
        "k1", "verdict"] == "REGRESSED"


def test_a_single_candidate_borrows_the_spread_of_a_replicated_baseline():
    # The baseline's replicates show how far this host's processes differ: 3% proves 40%...
    quiet = _verdicts("quiet_baseline", "single_candidate")
    assert quiet["k1"].verdict == "REGRESSED" and "3 vs 1 replicates" in quiet["k1"].reason
    assert all(quiet[key].verdict == "UNCHANGED" for key in ("k2", "k3", "k4", "k5", "k6"))
    # ...and +-30% does not.
    noisy = _verdicts("aa_baseline", "single_candidate")
    assert noisy["k1"].verdict == "INCONCLUSIVE"


def test_a_gross_change_is_proven_by_one_process_a_side():
    def row(median):
        return ResultRow(task_key="k", op="sls", impl="i", fingerprint="f", code_version="c",
                         median_s=median,
                         samples_s=json.dumps([median * (1 + 0.01 * j) for j in range(8)]))
    (verdict,) = check_verdicts([row(1.0)], [row(4.0)])
    assert verdict.verdict == "REGRESSED" and verdict.ratio == pytest.approx(4.0)
    (verdict,) = check_verdicts([row(1.0)], [row(1.5)])
    assert verdict.verdict == "INCONCLUSIVE"
    # Without a spread (a library caller that asks for none), the samples alone decide.
    (verdict,) = compare_rows([row(1.0)], [row(1.5)])
    assert verdict.verdict == "REGRESSED"


def test_instruction_verdicts_ignore_the_process_spread():
    def row(count):
        return ResultRow(task_key="k", op="sls", impl="i", fingerprint="f", code_version="c",
                         instructions=count, instruction_calls=3, samples_s="[]")
    (verdict,) = check_verdicts([row(1000.0)], [row(1250.0)], factor=0.05,
                                metric="instructions", process_sd=1.0)
    assert verdict.verdict == "REGRESSED" and verdict.ratio == pytest.approx(1.25)
    assert math.isnan(verdict.p_value)


def test_bad_process_sd_exits_two(tmp_path, capsys):
    code = main(["--baseline", str(FIXTURES / "single_baseline.csv"),
                 "--candidate", str(FIXTURES / "single_candidate.csv"),
                 "--out-dir", str(tmp_path), "--process-sd", "-1"])
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "verdicts.csv").exists()


def test_pooling_refuses_a_replicate_seen_twice_and_keeps_a_failure():
    rows = load_results(FIXTURES / "quiet_baseline.csv")
    with pytest.raises(ValueError, match="duplicate task_key 'k1' replicate 1"):
        compare_rows(rows + rows[:1], rows)
    failed = [dataclasses.replace(row, status="error", error="boom")
              if row.task_key == "k2" and replicate_index(row) == 2 else row for row in rows]
    pooled = {row.task_key: row for row in pool_replicates(failed).rows}
    assert pooled["k2"].status == "error" and "boom" in pooled["k2"].error
    assert pooled["k1"].status == STATUS_OK and pooled["k1"].n_samples == 24
    assert replicate_index(pooled["k1"]) is None
    verdicts = {v.task_key: v.verdict for v in check_verdicts(rows, failed)}
    assert verdicts["k2"] == "NEWLY_FAILING"


def test_a_replicated_baseline_is_stored_with_its_replicates(tmp_path):
    path = update_baseline(FIXTURES / "quiet_baseline.csv", tmp_path)
    stored = read_rows(path)
    assert len(stored) == 18 and {replicate_index(row) for row in stored} == {1, 2, 3}


def test_sweep_interleaves_replicates_in_fresh_workers_and_resumes_each(tmp_path, monkeypatch):
    from bench.run.worker import base_row

    calls = []

    def fake_run_tasks(tasks, settings, writer, progress=None, describe=None):
        calls.append([(task.key(), task.threads) for task in tasks])
        for task in tasks:
            row = base_row(task, settings)
            row.status, row.samples_s = STATUS_OK, "[0.001, 0.001, 0.001]"
            writer.write(row)
            if progress:
                progress(row)

    monkeypatch.setattr(sweeping, "run_tasks", fake_run_tasks)
    workload = tiny_workload()
    tasks = [Task(op="sls", impl="embedding_bag", workload=workload, variant={"mode": "sum"},
                  precision="fp32", device="cpu", isa="native", threads=threads, seed=0)
             for threads in (1, 2)]
    skipped = Task(op="sls", impl="embedding_bag", workload=workload, variant={"mode": "sum"},
                   precision="int4", device="cpu", isa="native", threads=1, seed=0)
    planned = [sweeping.PlannedTask(task) for task in tasks] + [
        sweeping.PlannedTask(skipped, "no int4 kernel")]
    directory = tmp_path / "run"
    assert executing.execute(["--replicates", "3"], planned, directory, "run", False,
                             FAST_POLICY, 60.0, replicates=3) == 0
    # One call of run_tasks (fresh workers for every group) per replicate, in order.
    assert calls == [[(task.key(), task.threads) for task in tasks]] * 3
    rows = read_rows(directory / "results.csv")
    stamped = [(row.task_key, replicate_index(row)) for row in rows if row.status == STATUS_OK]
    assert stamped == [(task.key(), k) for k in (1, 2, 3) for task in tasks]
    assert [replicate_index(row) for row in rows if row.status != STATUS_OK] == [1]
    # Resume: a run cut short after replicate 1 runs exactly replicates 2 and 3 again.
    lines = (directory / "results.csv").read_text().splitlines()
    keep = [lines[0]] + [line for line in lines[1:] if '""replicate"":1' in line]
    (directory / "results.csv").write_text("\n".join(keep) + "\n")
    calls.clear()
    assert executing.execute(["--replicates", "3"], planned, directory, "run", True,
                             FAST_POLICY, 60.0, replicates=3) == 0
    assert calls == [[], [(task.key(), task.threads) for task in tasks],
                     [(task.key(), task.threads) for task in tasks]]
    assert len(read_rows(directory / "results.csv")) == 7
