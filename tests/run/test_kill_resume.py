"""A sweep whose process group is SIGKILLed keeps its finished rows; --resume completes it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.records import STATUS_OK, read_rows
from conftest import REPO_ROOT

SWEEP = ["--workload", "smoke", "--ops", "sls,fc", "--impls", "embedding_bag,torch_linear",
         "--sls-modes", "sum,mean,weighted",
         "--fc-layers", "linear,bottom_mlp,top_mlp", "--precision", "fp32,bf16",
         "--min-run-time", "0.05", "--no-report"]
EXPECTED_ROWS = 12  # (3 sls modes + 3 fc layers) x 2 precisions


def _data_rows(path: Path) -> int:
    if not path.exists():
        return 0
    return max(0, path.read_text().count("\n") - 1)


def test_sigkill_of_the_process_group_then_resume(tmp_path):
    results = tmp_path / "killed" / "results.csv"
    sweep = subprocess.Popen([sys.executable, "run_bench.py", *SWEEP, "--out", str(tmp_path),
                              "--run-id", "killed"], cwd=REPO_ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _data_rows(results) < 3 and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sweep.poll() is None, "the sweep finished before it could be killed"
    os.killpg(sweep.pid, signal.SIGKILL)  # the parent and its worker, mid-sweep
    sweep.wait()

    finished = read_rows(results)
    assert 3 <= len(finished) < EXPECTED_ROWS
    assert all(row.status == STATUS_OK and row.median_s > 0 for row in finished)

    resumed = subprocess.run([sys.executable, "run_bench.py", "--resume",
                              str(tmp_path / "killed")], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(results)
    keys = [row.task_key for row in rows]
    assert len(rows) == EXPECTED_ROWS and len(set(keys)) == EXPECTED_ROWS
    # The rows finished before the kill are kept as they were, not measured again.
    assert [row.task_key for row in rows[:len(finished)]] == [row.task_key for row in finished]
