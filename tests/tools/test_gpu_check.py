"""tools/gpu_check.sh: every step bounded and listed with its status, a failing step does not
stop the next, and one tarball whose results read back; run here on the CPU at tiny sizes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench.records import read_rows
from conftest import FIXTURES_DIR, REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "gpu_check.sh"
STEPS = ["env", "gpu_tests", "roofs", "sls", "kaggle_models", "tables", "mlperf", "dist", "serve",
         "reference", "readback"]
RUN_STEPS = {"roofs", "sls", "kaggle_models", "tables", "mlperf", "dist", "serve", "reference"}
STATUSES = {"ok", "partial", "failed", "timeout", "skipped", "not_run"}


def _check(tmp_path: Path, *args: str, python: str = sys.executable, timeout: float = 60,
           **environment) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("OUT", "LOADGEN_WHEEL", "DLRM_REPO")}
    env.update(PYTHON=python, TMPDIR=str(tmp_path), **environment)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "gpu_check_summary.tsv", newline="") as handle:
        return {row["step"]: row for row in csv.DictReader(handle, delimiter="\t")}


def _tar_members(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {member.name: tar.extractfile(member).read()
                for member in tar.getmembers() if member.isfile()}


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device tpu"),
    (["--budget", "ten"], "--budget"),
    (["--loadgen-wheel", "/nonexistent/loadgen.whl"], "no such file"),
    (["--bogus"], "unknown argument"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, message):
    out = tmp_path / "out"
    result = _check(tmp_path, *args, "--out", str(out))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not out.exists()


def test_failing_steps_do_not_stop_the_later_ones(tmp_path):
    # Planted fault: an interpreter that fails every command at once (exit 7).
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho planted failure >&2\nexit 7\n")
    broken.chmod(0o755)
    out = tmp_path / "out"
    result = _check(tmp_path, "--device", "cpu", "--tiny", "--out", str(out),
                    python=str(broken))
    assert result.returncode == 1, result.stderr
    summary = _summary(out)
    assert list(summary) == STEPS
    for name, row in summary.items():
        if name == "serve":  # LoadGen cannot be imported by that interpreter
            assert row["status"] == "skipped" and "mlperf_loadgen" in row["note"]
        elif name == "reference":  # no checkout given
            assert row["status"] == "skipped" and "dlrm" in row["note"]
        else:
            assert (row["status"], row["exit"]) == ("failed", "7"), name
            assert "planted failure" in row["note"]
    members = _tar_members(out)
    assert {"gpu_check.log", "gpu_check_summary.tsv"} <= set(members)
    assert members["gpu_check_summary.tsv"] == (out / "gpu_check_summary.tsv").read_bytes()
    log = (out / "gpu_check.log").read_text()
    assert all(f"step {name}: " in log for name in STEPS)
    # The GPU tests never include this test (it would run the script inside itself).
    (tests_line,) = [line for line in log.splitlines() if "step gpu_tests: start" in line]
    assert "tests/run/test_cuda.py" in tests_line and "tests/tools" not in tests_line


@pytest.mark.slow
def test_tiny_cpu_check_writes_one_tarball_whose_results_read_back(tmp_path):
    out = tmp_path / "out"
    # Bounded: --budget caps the steps together; the subprocess timeout is a backstop. Two
    # quick test files stand for the GPU tests (which take minutes on a shared CPU).
    result = _check(tmp_path, "--device", "cpu", "--tiny", "--out", str(out), "--budget",
                    "1200", "--dlrm-repo", str(FIXTURES_DIR / "reference"), "--tests",
                    "tests/run/test_cuda.py tests/run/test_telemetry.py", timeout=1500)
    summary = _summary(out)
    assert list(summary) == STEPS, result.stderr
    assert all(row["status"] in STATUSES for row in summary.values())
    assert all(float(row["wall_s"]) >= 0 for row in summary.values())
    failed = {name: row["note"] for name, row in summary.items()
              if row["status"] not in ("ok", "skipped")}
    assert result.returncode == (1 if failed else 0)
    assert not failed, failed
    try:
        import mlperf_loadgen  # noqa: F401
    except ImportError:
        assert summary["serve"]["status"] == "skipped"
    members = _tar_members(out)
    log = members["gpu_check.log"].decode()
    assert all(f"step {name}: " in log for name in STEPS)
    readback = json.loads(members["runs/readback.json"])
    results = {name: data for name, data in members.items() if name.endswith("results.csv")}
    ran = {name for name, row in summary.items()
           if name in RUN_STEPS and row["status"] == "ok"}
    assert {name.split("/")[1] for name in results} == ran
    for name, data in results.items():
        path = tmp_path / "readback" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows = read_rows(path)
        assert rows, name
        counts = {}
        for row in rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        assert readback[name.removeprefix("runs/")] == counts
        assert all(row.device == "cpu" for row in rows)
    assert b"testcase" in members["runs/gpu_tests.xml"]
