"""SIGTERM ends a sweep's workers and leaves it resumable; a worker outlives no parent."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.commands import main as cli_main
from bench.commands.common import EXIT_INTERRUPTED, EXIT_USAGE
from bench.records import STATUS_OK, read_rows
from bench.run import lifeline
from conftest import REPO_ROOT

# One configuration whose timing lasts long enough to be signalled mid-measurement, and short
# enough that --resume (which re-reads these arguments) finishes it in a test.
LONG_SWEEP = ["--ops", "sls", "--impls", "embedding_bag", "--workload", "smoke",
              "--precision", "fp32", "--sls-modes", "sum", "--no-report"]
RESUMABLE_RUN_TIME = "15"
# An orphan would write its row (and die of the closed pipe) only after this much timing: far
# past the bound the test waits for a worker to stop by itself.
ORPHAN_RUN_TIME = "600"
START_BOUND_S = 240.0  # a fresh worker imports torch; the machine is shared
EXIT_BOUND_S = 60.0


def _state(pid: int) -> str:
    """The process's state letter from /proc ('' when there is no such process)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _state(pid) not in ("", "Z", "X")  # a zombie has ended; only its entry is left


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains text."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _start_sweep(tmp_path: Path, run_time: str) -> tuple[subprocess.Popen, Path, int]:
    """A long sweep in its own session, once its worker has started its task: (sweep, run
    directory, worker pid)."""
    directory = tmp_path / "signalled"
    sweep = subprocess.Popen([sys.executable, "run_bench.py", *LONG_SWEEP, "--min-run-time",
                              run_time, "--out", str(tmp_path),
                              "--run-id", directory.name], cwd=REPO_ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = directory / "worker.log"
    deadline = time.monotonic() + START_BOUND_S
    worker = None
    while worker is None and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        found = re.search(r"worker (\d+): task 0 started", log.read_text() if log.exists() else "")
        worker = int(found.group(1)) if found else None
    assert worker is not None, f"no worker started (sweep exit {sweep.poll()})"
    assert sweep.poll() is None, "the sweep finished before it could be signalled"
    return sweep, directory, worker


@pytest.mark.slow
def test_sigterm_to_the_sweep_ends_its_worker_and_resume_finishes(tmp_path):
    sweep, directory, worker = _start_sweep(tmp_path, RESUMABLE_RUN_TIME)
    assert _alive(worker)
    os.kill(sweep.pid, signal.SIGTERM)  # the parent only, as `timeout` or a CI runner does
    try:
        _, stderr = sweep.communicate(timeout=EXIT_BOUND_S)
    finally:
        for pid in (sweep.pid, worker):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert sweep.returncode == EXIT_INTERRUPTED, stderr
    assert f"--resume {directory}" in stderr
    # The sweep reaps its worker before it exits: nothing of the run is left running.
    assert not _alive(worker)
    assert _processes_naming(str(directory)) == []
    assert not (directory / "results.csv").exists() or read_rows(directory / "results.csv") == []

    resumed = subprocess.run([sys.executable, "run_bench.py", "--resume", str(directory)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(directory / "results.csv")
    assert [row.status for row in rows] == [STATUS_OK]


@pytest.mark.slow
def test_a_worker_whose_sweep_is_killed_stops_by_itself(tmp_path):
    sweep, directory, worker = _start_sweep(tmp_path, ORPHAN_RUN_TIME)
    try:
        os.kill(sweep.pid, signal.SIGKILL)  # no cleanup runs in the parent
        sweep.wait()
        deadline = time.monotonic() + EXIT_BOUND_S
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the orphaned worker is still running"
        assert _processes_naming(str(directory)) == []
    finally:
        if _alive(worker):  # a failing run must not leave its orphan timing beside others
            os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("flags, message", [
    (["--min-run-time", "1e9"], "--min-run-time: 1e+09: give at most 3600 seconds"),
    (["--min-run-time", "3601"], "--min-run-time: 3601: give at most 3600 seconds"),
    (["--task-timeout", "1e9"], "--task-timeout: 1e+09: give at most 86400 seconds"),
])
def test_absurd_time_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code = cli_main(["--ops", "sls", "--workload", "smoke", *flags, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == EXIT_USAGE
    assert message in captured.err and captured.err.count("\n") == 1
    assert not out.exists()


def test_sigterm_inside_the_block_is_an_interrupt_and_the_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with lifeline.terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, long before the sleep ends
    assert signal.getsignal(signal.SIGTERM) is before


CHILD = ("import sys, time\nfrom bench.run import lifeline\n"
         "lifeline.{call}\nprint('survived', flush=True)\ntime.sleep(60)\n")


@pytest.mark.parametrize("call", [
    "die_with_parent({parent}, 9)",  # prctl, with the parent already gone by then
    "_start_watchdog({parent}, 9)",  # the polling fallback
])
def test_a_child_whose_parent_is_already_gone_ends_itself(call):
    # The child's parent is this process; told pid 1 instead, it sees what a child whose
    # parent died before the call sees (a parent pid that is no longer the one it was given).
    child = subprocess.run([sys.executable, "-c", CHILD.format(call=call.format(parent=1))],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "survived" not in child.stdout


def test_a_child_of_a_living_parent_carries_on():
    child = subprocess.run([sys.executable, "-c",
                            CHILD.format(call=f"die_with_parent({os.getpid()}, 9)")
                            .replace("time.sleep(60)", "")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert child.returncode == 0, child.stderr
    assert "survived" in child.stdout


LAUNCHER = (
    "import subprocess, sys\nfrom bench.run.lifeline import tied_command\n"
    "child = subprocess.Popen(tied_command([sys.executable, '-c', 'import os, time; "
    "print(os.environ[\"BENCH_TIED_PID\"], os.getpid(), flush=True); time.sleep(120)']))\n"
    "child.wait()\n")


def test_a_tied_command_ends_with_its_launcher():
    # How the dist launcher starts torchrun: the command (exec'd, same pid) gets SIGTERM
    # when the launcher is killed outright, and its children learn its pid.
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    named, command = (int(value) for value in launcher.stdout.readline().split())
    try:
        assert named == command
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + EXIT_BOUND_S
        while _alive(command) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(command)
    finally:
        if _alive(command):
            os.kill(command, signal.SIGKILL)
