"""Bad input as a new user gives it: one stderr line, exit 2, no results directory; error runs."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from bench import commands
from bench.commands import sweep as cli
from bench.run import execute as runner
from bench.records import STATUS_ERROR, STATUS_OK, read_rows
from bench.run.settings import WorkerSettings

# Cheap sweep arguments: if validation let a case through, it would run one small row.
SMALL = ["--workload", "smoke", "--precision", "fp32", "--min-run-time", "0.01", "--no-report"]
SLS = ["--ops", "sls", "--sls-modes", "sum", *SMALL]
FC = ["--ops", "fc", "--fc-layers", "linear", *SMALL]
CONCURRENT_PROCESSES = 4  # each imports torch; a shared 2-core machine cannot take more at once


def _inputs(folder: Path) -> dict[str, Path]:
    """Corrupt and empty input files of the kinds a user passes in."""
    files = {
        "corrupt_npy": folder / "corrupt.npy",
        "bad_csv": folder / "bad.csv",
        "empty_txt": folder / "empty.txt",
        "float_npy": folder / "float.npy",
        "bad_tsv": folder / "bad.tsv",
        "a_file": folder / "a_file",
    }
    files["corrupt_npy"].write_bytes(b"garbage\x00\x01 not an array")
    files["bad_csv"].write_text("row\n1\n2,x\n")
    files["empty_txt"].write_text("\n")
    np.save(files["float_npy"], np.array([0.5, 1.5]))
    files["bad_tsv"].write_text("1\t2\tnot criteo\n")
    files["a_file"].write_text("not a directory\n")
    (folder / "not_a_run").mkdir()
    (folder / "empty_run").mkdir()
    existing = folder / "out" / "taken"
    existing.mkdir(parents=True)
    (existing / "results.csv").write_text("schema_version\n")
    return files


def _cases(folder: Path, files: dict[str, Path]) -> dict[str, tuple[list[str], str, list[str]]]:
    """name -> (arguments, the error line's prefix, words the line must contain)."""
    out = str(folder / "out")
    sweep = "run_bench.py: error: "
    return {
        "trace-corrupt-npy": ([*SLS, "--dist", f"trace:{files['corrupt_npy']}", "--out", out],
                              sweep, ["corrupt.npy", "not a readable .npy array"]),
        "trace-non-integer-csv": ([*SLS, "--dist", f"trace:{files['bad_csv']}", "--out", out],
                                  sweep, ["bad.csv:3", "non-integer entry 'x'"]),
        "trace-empty": ([*SLS, "--dist", f"trace:{files['empty_txt']}", "--out", out],
                        sweep, ["empty.txt", "trace is empty"]),
        "trace-float-ids": ([*SLS, "--dist", f"trace:{files['float_npy']}", "--out", out],
                            sweep, ["float.npy", "float64", "integers"]),
        "tt-rank-zero": (["--ops", "tt_sls", *SMALL, "--tt-rank", "0", "--out", out],
                         sweep, ["--tt-rank", ">= 1"]),
        "tt-rank-text": (["--ops", "tt_sls", *SMALL, "--tt-rank", "8,big", "--out", out],
                         sweep, ["--tt-rank", "8,big"]),
        "out-under-a-file": ([*FC, "--out", f"{files['a_file']}/results"],
                             sweep, ["--out", "a_file is not a directory"]),
        "run-id-is-a-path": ([*FC, "--run-id", "../escaped", "--out", out],
                             sweep, ["--run-id", "plain name"]),
        "run-id-holds-a-run": ([*FC, "--run-id", "taken", "--out", out],
                               sweep, ["already holds a run", "--resume"]),
        "task-timeout-negative": ([*FC, "--task-timeout", "-1", "--out", out],
                                  sweep, ["--task-timeout", "-1"]),
        "min-run-time-nan": ([*FC, "--min-run-time", "nan", "--out", out],
                             sweep, ["--min-run-time", "nan"]),
        "max-rows-text": ([*FC, "--max-rows", "lots", "--out", out],
                          sweep, ["--max-rows", "'lots'", "--help"]),
        "max-rows-negative": ([*FC, "--max-rows", "-1", "--out", out], sweep, ["--max-rows"]),
        "batch-size-malformed": ([*FC, "--batch-size", "64x", "--out", out],
                                 sweep, ["--batch-size", "64x"]),
        "workload-unknown": ([*FC, "--workload", "smoke,kagle", "--out", out],
                             sweep, ["'kagle'", "kaggle"]),
        "criteo-missing": (["--ops", "fc", "--workload", f"criteo:{folder}/none.tsv",
                            "--no-report", "--out", out], sweep, ["none.tsv", "does not exist"]),
        "criteo-corrupt": (["--ops", "fc", "--workload", f"criteo:{files['bad_tsv']}",
                            "--no-report", "--out", out], sweep, ["bad.tsv:1", "40 expected"]),
        "precision-int3": ([*FC, "--precision", "int3", "--out", out], sweep, ["'int3'", "int4"]),
        "isa-amx9": ([*FC, "--isa", "amx9", "--out", out], sweep, ["'amx9'", "amx"]),
        "threads-zero": ([*FC, "--threads", "0", "--out", out], sweep, ["--threads"]),
        "dist-task-timeout-absurd": (["dist", "--workload", "smoke", "--task-timeout", "1e9",
                                      "--out", out], "run_bench.py dist: error: ",
                                     ["--task-timeout", "at most 86400 seconds"]),
        "dist-threads-zero": (["dist", "--workload", "smoke", "--threads", "0", "--out", out],
                              "run_bench.py dist: error: ", ["--threads", ">= 1"]),
        "reference-min-run-time-absurd": (
            ["reference", "--min-run-time", "1e9", "--out", out],
            "run_bench.py reference: error: ", ["--min-run-time", "at most 3600 seconds"]),
        "resume-not-a-run": (["--resume", str(folder / "not_a_run")],
                             sweep, ["--resume", "args.json"]),
        "report-empty-dir": (["report", str(folder / "empty_run")],
                             "run_bench.py report: error: ", ["empty_run", "no results.csv"]),
        "check-missing-baseline": (
            ["check", "--candidate", str(REPO_ROOT / "tests/fixtures/check/candidate_run"),
             "--baseline", str(folder / "no_baseline.csv"), "--out-dir", str(folder / "check")],
            "check: cannot compare: ", ["no_baseline.csv"]),
    }


def _run(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_bench.py", *arguments], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def _tree(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Every case run through run_bench.py, a few processes at a time; the folder before/after."""
    folder = tmp_path_factory.mktemp("bad_input")
    files = _inputs(folder)
    cases = _cases(folder, files)
    before = _tree(folder)
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_PROCESSES) as pool:
        futures = {name: pool.submit(_run, arguments)
                   for name, (arguments, _, _) in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    return folder, cases, results, before, _tree(folder)


BAD_INPUT_NAMES = list(_cases(Path("/x"), {name: Path(f"/x/{name}") for name in (
    "corrupt_npy", "bad_csv", "empty_txt", "float_npy", "bad_tsv", "a_file")}))


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_input_is_refused_in_one_line_before_any_work(refused, name):
    folder, cases, results, _, _ = refused
    _, prefix, words = cases[name]
    result = results[name]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_refused_input_leaves_no_results_directory_behind(refused):
    folder, _, _, before, after = refused
    # Whatever a refused case might have written (a run directory, args.json beside the
    # existing run, a check directory, a run escaping --out) shows as a new path.
    assert after == before, sorted(after - before)
    assert not (folder / "escaped").exists()


def test_a_run_whose_rows_all_error_exits_one(tmp_path):
    # A timeout no configuration can meet turns every row into an error row.
    result = _run([*FC, "--task-timeout", "0.001", "--out", str(tmp_path / "out"),
                   "--run-id", "all-errors"])
    assert result.returncode == cli.EXIT_ALL_ERRORED, result.stderr[-2000:]
    assert "nothing was measured" in result.stderr
    rows = read_rows(tmp_path / "out" / "all-errors" / "results.csv")
    assert rows and all(row.status == STATUS_ERROR for row in rows)


@pytest.mark.parametrize("measured, errors, code", [
    (5, 0, 0), (0, 0, 0), (0, 3, cli.EXIT_ALL_ERRORED), (4, 1, cli.EXIT_SOME_ERRORED),
])
def test_exit_code_follows_error_rows(measured, errors, code):
    assert cli.exit_code(measured, errors) == code


def test_a_run_with_some_error_rows_exits_three_and_writes_every_row(capsys, monkeypatch,
                                                                     tmp_path):
    import bench.run.sweep
    from bench.run.worker import skipped_row

    def half_failing(tasks, settings, writer, progress=None, describe=None):
        for index, task in enumerate(tasks):
            row = skipped_row(task, settings, "")
            row.status, row.error = (STATUS_OK, "") if index == 0 else (STATUS_ERROR, "planted")
            writer.write(row)
        return []

    monkeypatch.setattr(bench.run.sweep, "run_tasks", half_failing)
    code = commands.main(["--ops", "fc", "--impls", "torch_linear", "--fc-layers", "linear",
                          "--workload", "smoke", "--precision", "fp32,bf16", "--no-report",
                          "--out", str(tmp_path),
                     "--run-id", "some-errors"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_SOME_ERRORED, captured.err
    rows = read_rows(tmp_path / "some-errors" / "results.csv")
    assert [row.status for row in rows] == [STATUS_OK, STATUS_ERROR]
    assert "1 configurations failed" in captured.err and "1 errors" in captured.out


def test_exit_codes_are_in_the_help_text():
    text = cli.build_parser().format_help()
    for phrase in ("exit status", "1 every configuration that ran errored", "3 some"):
        assert phrase in " ".join(text.split()), phrase


def test_run_directory_that_cannot_be_written_is_one_line_and_removed(monkeypatch, tmp_path):
    # A failure after the checks (a full disk, a race) still ends in one line, nothing left.
    def full_disk(path, value):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "write_json", full_disk)
    with pytest.raises(runner.RunDirectoryError, match="No space left on device"):
        runner._start_run_directory(tmp_path / "out" / "run", [],
                                    WorkerSettings("run", cli.QUICK_POLICY), [])
    assert list(tmp_path.iterdir()) == []
