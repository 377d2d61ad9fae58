"""Tests of the CI regression check: merged runs, A/B mode, --calls-per-rep, the check CLI."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import commands
from bench.commands import ab, sweep as cli
from bench.run import ci_sweep, worker
from bench.run.settings import WorkerSettings
from bench import registry
from bench.registry import Impl, Prepared
from bench.records import ResultRow, read_rows, samples_from_row
from bench.run.tasks import Task
from bench.run.timing import TimingPolicy
from reports.compare import compare_rows
from reports.merge import MergeError, merge_runs, write_results
from workloads import presets
from conftest import FIXTURES_DIR, REPO_ROOT

FIXTURES = FIXTURES_DIR / "check"
CLEAN_RUN = FIXTURES / "clean_run"
BASELINE_FAST = FIXTURES / "baseline_fast.csv"
# The smallest sweep that still runs a real op: the end-to-end A/B test's stand-in for CI.
TINY_SWEEP_ARGS = ("--workload", "smoke", "--ops", "sls", "--impls", "embedding_bag",
                   "--sls-modes", "sum",
                   "--precision", "fp32", "--min-run-time", "0.02", "--threads", "1",
                   "--no-report")
# Tests never look at speed; this only keeps run_task short.
FAST_POLICY = TimingPolicy(min_run_time_s=0.01, min_samples=3, max_run_time_s=1.0,
                           warmup_calls=1)


def _row(task_key="key", samples=(1.0, 2.0, 3.0), status="ok", error="", **fields) -> ResultRow:
    """An ok row whose statistics match its samples, unless fields say otherwise."""
    values = np.asarray(samples, dtype=np.float64)
    median = float(np.median(values)) if len(values) else math.nan
    defaults = dict(op="sls", impl="embedding_bag", workload="smoke", precision="fp32",
                    fingerprint="fp", code_version="cv", median_s=median, samples_per_s=64 / median,
                    bytes_moved=1e6, gbps=1e6 / median / 1e9, metrics='{"calls_per_rep":1}')
    defaults.update(fields)
    return ResultRow(task_key=task_key, status=status, error=error,
                     samples_s=json.dumps(list(samples)), n_samples=len(samples), **defaults)


# --- merging runs -------------------------------------------------------------------------

def test_merge_concatenates_samples_and_recomputes_statistics():
    runs = [[_row("a", (1.0, 2.0, 3.0)), _row("b", (5.0, 5.0, 5.0))],
            [_row("a", (4.0, 5.0)), _row("b", (6.0, 6.0, 6.0))],
            [_row("a", (6.0,)), _row("b", (7.0, 7.0, 7.0))]]
    merged = {row.task_key: row for row in merge_runs(runs, run_id="A")}
    row = merged["a"]
    assert samples_from_row(row) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert row.n_samples == 6
    assert row.median_s == pytest.approx(3.5)
    assert row.mean_s == pytest.approx(3.5)
    assert row.min_s == 1.0
    assert row.p90_s == pytest.approx(np.percentile([1, 2, 3, 4, 5, 6], 90))
    assert row.iqr_s == pytest.approx(np.percentile([1, 2, 3, 4, 5, 6], 75)
                                      - np.percentile([1, 2, 3, 4, 5, 6], 25))
    # Rates follow the new median; identity columns are kept.
    assert row.samples_per_s == pytest.approx(64 / 3.5)
    assert row.gbps == pytest.approx(1e6 / 3.5 / 1e9)
    assert (row.fingerprint, row.code_version, row.run_id) == ("fp", "cv", "A")
    metrics = json.loads(row.metrics)
    assert metrics["merged_runs"] == 3 and metrics["calls_per_rep"] == 1
    assert merged["b"].median_s == pytest.approx(6.0)
    assert [row.task_key for row in merge_runs(runs)] == ["a", "b"]


def test_merge_keeps_an_error_in_any_round_as_error():
    runs = [[_row("a"), _row("b")],
            [_row("a", status="error", error="RuntimeError: boom", samples=()), _row("b")],
            [_row("a"), _row("b", status="skipped", error="no kernel", samples=())]]
    merged = {row.task_key: row for row in merge_runs(runs)}
    assert merged["a"].status == "error"
    assert merged["a"].error == "error in run 2 of 3: RuntimeError: boom"
    assert merged["b"].status == "skipped"


def test_merge_refuses_other_machines_and_other_code():
    with pytest.raises(MergeError, match="fingerprint differs"):
        merge_runs([[_row("a")], [_row("a", fingerprint="other")]])
    with pytest.raises(MergeError, match="code_version differs"):
        merge_runs([[_row("a")], [_row("a", code_version="other")]])
    with pytest.raises(MergeError, match="duplicate task_key"):
        merge_runs([[_row("a"), _row("a")]])


def test_merged_rows_round_trip_through_results_csv(tmp_path):
    runs = [read_rows(CLEAN_RUN / "results.csv"), read_rows(CLEAN_RUN / "results.csv")]
    path = write_results(merge_runs(runs), tmp_path / "merged")
    rows = read_rows(path)
    originals = read_rows(CLEAN_RUN / "results.csv")
    assert [row.n_samples for row in rows] == [2 * row.n_samples for row in originals]
    assert [row.median_s for row in rows] == pytest.approx([row.median_s for row in originals])


# --- compare_rows in A/B mode ----------------------------------------------------------------

def test_code_version_is_ignored_only_when_asked():
    baseline = [_row("a", (1.0, 1.01, 0.99, 1.02, 0.98, 1.0), code_version="old")]
    candidate = [_row("a", (2.0, 2.01, 1.99, 2.02, 1.98, 2.0), code_version="new")]
    (default,) = compare_rows(baseline, candidate)
    assert default.verdict == "NOT_COMPARABLE" and "code changed" in default.reason
    (ab_verdict,) = compare_rows(baseline, candidate, check_code_version=False)
    assert ab_verdict.verdict == "REGRESSED"
    assert ab_verdict.ratio == pytest.approx(2.0)
    assert "(impl code changed)" in ab_verdict.reason
    (same_code,) = compare_rows(baseline, [_row("a", (1.0,) * 6, code_version="old")],
                                check_code_version=False)
    assert "code changed" not in same_code.reason


# --- --calls-per-rep -----------------------------------------------------------------------

def test_calls_per_rep_becomes_an_option_but_not_part_of_the_task_key():
    base = ["--workload", "smoke", "--ops", "sls", "--sls-modes", "sum", "--precision", "fp32"]
    assert "calls_per_rep" not in cli._options(cli.parse_sweep(base))
    options = cli._options(cli.parse_sweep([*base, "--calls-per-rep", "5"]))
    assert options["calls_per_rep"] == 5
    task = Task(op="sls", impl="embedding_bag", workload=presets.smoke(), variant={"mode": "sum"},
                precision="fp32", device="cpu", isa="native", threads=1, seed=0)
    repeated_task = Task(**{**task.__dict__, "options": options})
    assert task.key() == repeated_task.key()


def test_calls_per_rep_below_one_is_a_usage_error(capsys):
    assert commands.main(["--workload", "smoke", "--ops", "sls", "--calls-per-rep", "0"]) == 2
    error = capsys.readouterr().err
    assert "--calls-per-rep: '0': give a whole number >= 1" in error and error.count("\n") == 1


def test_repeated_calls_the_closure_back_to_back():
    calls = []
    closure = worker.repeated(lambda: calls.append(1) or len(calls), 4)
    assert closure() == 4 and len(calls) == 4
    run = object()
    assert worker.repeated(run, 1) is run  # one call: the closure itself, no wrapper


@pytest.mark.parametrize("calls_per_rep", [1, 3])
def test_run_task_times_calls_per_rep_calls_and_records_it(monkeypatch, calls_per_rep):
    import torch

    counts = {"run": 0, "timed": 0}

    def build_counting(context) -> Prepared:
        def run():
            counts["run"] += 1
            return torch.ones(4)

        return Prepared(run=run, reference=lambda: torch.ones(4, dtype=torch.float64),
                        samples=8, flops=0.0, bytes_moved=32.0)

    counting = Impl(op="sls", name="counting", build=build_counting, precisions=("fp32",))
    real_impls, real_measure = registry.impls, worker.timing.measure
    monkeypatch.setattr(registry, "impls", lambda op: {**real_impls(op), "counting": counting})

    def counting_measure(fn, *arguments, **keywords):
        def timed():
            counts["timed"] += 1
            return fn()

        return real_measure(timed, *arguments, **keywords)

    monkeypatch.setattr(worker.timing, "measure", counting_measure)
    options = {"calls_per_rep": calls_per_rep} if calls_per_rep != 1 else {}
    task = Task(op="sls", impl="counting", workload=presets.smoke(), variant={"mode": "sum"},
                precision="fp32", device="cpu", isa="native", threads=1, seed=0, options=options)
    row = worker.run_task(task, WorkerSettings("test", FAST_POLICY))
    assert row.status == "ok", row.error
    assert json.loads(row.metrics)["calls_per_rep"] == calls_per_rep
    assert counts["timed"] > 0
    # One untimed call checks the output against the reference; every timed call runs N times.
    assert counts["run"] == 1 + calls_per_rep * counts["timed"]
    # Rates count the work of all N calls of a repetition.
    assert row.samples_per_s == pytest.approx(calls_per_rep * 8 / row.median_s)


# --- the check command line ------------------------------------------------------------------

def _check(capsys, *arguments: str) -> tuple[int, str, str]:
    """Run `run_bench.py check ARGS` in-process; returns (exit code, stdout, stderr)."""
    code = commands.main(["check", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_exit_codes_on_fixture_runs(tmp_path, capsys):
    out = ["--out-dir", str(tmp_path)]
    code, output, _ = _check(capsys, "--candidate", str(CLEAN_RUN), "--baseline", str(CLEAN_RUN),
                             *out)
    assert code == 0 and "OK: no regression" in output
    # One process a side: 1.67x is within the default spread between processes...
    code, output, _ = _check(capsys, "--candidate", str(CLEAN_RUN), "--baseline",
                             str(BASELINE_FAST), *out)
    assert code == 0 and "3 rows INCONCLUSIVE" in output
    # ...and a regression on a host known to be quiet between processes.
    out += ["--process-sd", "0.02"]
    code, output, _ = _check(capsys, "--candidate", str(CLEAN_RUN), "--baseline",
                             str(BASELINE_FAST), *out)
    assert code == 1 and "FAIL: 3 REGRESSED" in output
    assert (f"re-baseline with: python run_bench.py check --candidate {CLEAN_RUN} "
            "--update-baseline") in output
    # The CI factor (0.5) still flags a 1.67x slowdown.
    code, output, _ = _check(capsys, "--ci", "--candidate", str(CLEAN_RUN), "--baseline",
                             str(BASELINE_FAST), *out)
    assert code == 1 and "more than 50%" in output
    code, _, error = _check(capsys, "--candidate", str(tmp_path / "nope"), *out)
    assert code == 2 and error.count("\n") == 1
    assert pd.read_csv(tmp_path / "verdicts.csv")["verdict"].eq("REGRESSED").all()


def test_stored_baseline_round_trip_and_ci_skip(tmp_path, capsys):
    root = ["--baselines-root", str(tmp_path / "baselines"), "--out-dir", str(tmp_path)]
    code, _, error = _check(capsys, "--candidate", str(CLEAN_RUN), *root)
    assert code == 2 and "no baseline for fingerprint fp-a1b2c3" in error
    assert f"--baselines-root {tmp_path / 'baselines'}" in error
    code, output, _ = _check(capsys, "--ci", "--candidate", str(CLEAN_RUN), *root)
    assert code == 0 and output.startswith("check: skipped: no baseline")
    code, output, _ = _check(capsys, "--update-baseline", "--candidate", str(CLEAN_RUN), *root)
    assert code == 0 and (tmp_path / "baselines" / "fp-a1b2c3.csv").is_file()
    code, output, _ = _check(capsys, "--candidate", str(CLEAN_RUN), *root)
    assert code == 0 and "OK: no regression" in output


def test_check_without_candidate_runs_the_ci_sweep(tmp_path, capsys, monkeypatch):
    swept = []

    def fake_sweep(out_dir, run_id, *arguments, **keywords):
        run_dir = Path(out_dir) / run_id
        shutil.copytree(CLEAN_RUN, run_dir)
        swept.append(run_dir)
        return run_dir

    monkeypatch.setattr(ci_sweep, "run_ci_sweep", fake_sweep)
    ci_out = tmp_path / "ci"
    code, output, _ = _check(capsys, "--ci-out", str(ci_out), "--baseline", str(BASELINE_FAST),
                             "--process-sd", "0.02")
    assert code == 1 and len(swept) == 1 and swept[0].parent == ci_out
    assert (swept[0] / "verdicts.csv").is_file()
    # The hint names the run the sweep just wrote, so it can be pasted as is.
    assert f"python run_bench.py check --candidate {swept[0]} --update-baseline" in output
    code, output, _ = _check(capsys, "--ci-out", str(ci_out), "--update-baseline",
                             "--baselines-root", str(tmp_path / "baselines"))
    assert code == 0 and (tmp_path / "baselines" / "fp-a1b2c3.csv").is_file()


def test_ci_sweep_command_lets_extra_arguments_override():
    command = ci_sweep.sweep_command(Path("/out"), "run", ("--calls-per-rep", "5"), "python")
    assert command[:2] == ["python", "run_bench.py"]
    assert command[-6:] == ["--calls-per-rep", "5", "--out", "/out", "--run-id", "run"]
    assert "--threads" in command and "--no-report" in command
    parsed = cli.parse_sweep(command[2:])
    assert parsed.calls_per_rep == 5 and parsed.min_run_time == 0.3


# --- --ab ------------------------------------------------------------------------------------

def test_ab_argument_validation(capsys):
    code, _, error = _check(capsys, "--ab", "no-such-revision-anywhere")
    assert code == 2 and error.count("\n") == 1 and "unknown revision" in error
    code, _, error = _check(capsys, "--ab", "HEAD", "--candidate", str(CLEAN_RUN))
    assert code == 2 and "drop --candidate" in error and error.count("\n") == 1
    code, _, error = _check(capsys, "--ab", "HEAD", "--rounds", "0")
    assert code == 2 and "--rounds must be >= 1" in error
    code, _, error = _check(capsys, "--rounds", "2", "--candidate", str(CLEAN_RUN))
    assert code == 2 and "--ab only" in error


def _worktrees() -> list[str]:
    listing = subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "list", "--porcelain"],
                             capture_output=True, text=True)
    return [line for line in listing.stdout.splitlines() if line.startswith("worktree ")]


@pytest.mark.slow
def test_ab_end_to_end_on_a_tiny_sweep(tmp_path, capsys, monkeypatch):
    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout with a commit")
    created = []
    real_worktree = ab.base_worktree

    @contextlib.contextmanager
    def recorded_worktree(*arguments):
        with real_worktree(*arguments) as path:
            created.append(path)
            yield path

    # Record which worktree this run made: other test runs may hold their own meanwhile.
    monkeypatch.setattr(ab, "base_worktree", recorded_worktree)
    # A planted 50x slowdown of the working tree's side: each of its repetitions runs the op
    # 50 times (--calls-per-rep), so every round's ratio is far beyond the factor. Whether
    # three rounds PROVE it depends on the machine's noise (on a VM at load 6 they sometimes
    # did not), so the test checks what is certain: the per-round ratios, and that the
    # verdict and the exit code follow the paired test's adjusted p-value.
    real_sweep = ci_sweep.run_ci_sweep

    def slower_working_tree(out_dir, run_id, extra_args=(), **options):
        if run_id.startswith("B-"):
            # 50, not 5: on a loaded 2-vCPU VM three rounds of a 5x slowdown gave per-round
            # ratios 11.7, 4.8 and 9.9, which the paired test rightly calls unproven (p 0.016).
            extra_args = (*extra_args, "--calls-per-rep", "50")
        return real_sweep(out_dir, run_id, extra_args, **options)

    monkeypatch.setattr(ci_sweep, "run_ci_sweep", slower_working_tree)
    # Three rounds: the paired t-test on the rounds' log ratios needs a spread (df 2).
    code = ab.run_ab("HEAD", rounds=3, out_dir=tmp_path, sweep_args=TINY_SWEEP_ARGS)
    output = capsys.readouterr().out
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert list(verdicts["op"]) == ["sls"]
    verdict = verdicts.iloc[0]
    listed = re.search(r"ratios per round: ([0-9., ]+)\)", verdict["reason"])
    assert listed, output
    per_round = [float(value) for value in listed.group(1).split(", ")]
    assert len(per_round) == 3 and min(per_round) > 2.0, output
    assert verdict["ratio"] > 2.0
    proven = verdict["p_value"] < 0.01
    assert verdict["verdict"] == ("REGRESSED" if proven else "UNCHANGED"), output
    assert code == (1 if proven else 0), output
    for side, calls in (("A", 1), ("B", 50)):
        (row,) = read_rows(tmp_path / side / "results.csv")
        metrics = json.loads(row.metrics)
        assert row.status == "ok" and metrics["merged_runs"] == 3
        assert metrics["calls_per_rep"] == calls
        assert all((tmp_path / f"{side}-{number}" / "results.csv").is_file()
                   for number in (1, 2, 3))
    (worktree,) = created
    assert not worktree.exists() and not worktree.parent.exists()
    assert f"worktree {worktree}" not in _worktrees()


def test_ab_rounds_are_tested_pairwise():
    """A/B: the rounds' log ratios decide (paired t-test), not a rank test on pooled samples."""
    from bench.records import ResultRow
    from reports.compare import Side, compare_rows

    def rows(median, samples=(1.0, 1.0, 1.0)):
        return [ResultRow(task_key="k", op="sls", median_s=median, fingerprint="f",
                          samples_s=json.dumps([median * value for value in samples]))]

    def verdict(candidate_medians):
        baseline_rounds = [rows(1.0) for _ in candidate_medians]
        candidate_rounds = [rows(median) for median in candidate_medians]
        (result,) = compare_rows(Side(rows(1.0), rounds=baseline_rounds),
                                 Side(rows(float(np.median(candidate_medians))),
                                      rounds=candidate_rounds),
                                 factor=0.1, alpha=0.01, check_code_version=False)
        return result

    agreeing = verdict([1.25, 1.26, 1.24])
    assert agreeing.verdict == "REGRESSED" and agreeing.ratio == pytest.approx(1.25, abs=0.01)
    # One wild round: the spread of the rounds, not the pooled samples, says "not shown".
    disagreeing = verdict([1.6, 1.02, 0.95])
    assert disagreeing.verdict == "UNCHANGED"
    assert "1.60, 1.02, 0.95" in disagreeing.reason
    one_round = verdict([2.0])
    assert one_round.verdict == "NOT_COMPARABLE" and "at least 2" in one_round.reason


def test_across_hosts_compares_what_the_checker_refuses():
    baseline = [_row("a", (1.0, 1.01, 0.99, 1.02, 0.98), fingerprint="host-a")]
    candidate = [_row("a", (2.0, 2.02, 1.98, 2.04, 1.96), fingerprint="host-b")]
    (checked,) = compare_rows(baseline, candidate)
    assert checked.verdict == "NOT_COMPARABLE" and "different host" in checked.reason
    (report,) = compare_rows(baseline, candidate, across_hosts=True)
    assert report.verdict == "REGRESSED" and report.ratio == pytest.approx(2.0)
    assert "(different hosts)" in report.reason
