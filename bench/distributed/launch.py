"""Start a dist job through torchrun, end it when a rank fails or stops progressing, and
write an error row naming the rank for each configuration that did not finish."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.records import STATUS_ERROR, ResultRow, ResultsWriter, read_rows, write_json
from bench.run import lifeline, timing


def _statuses(directory: Path) -> dict[int, dict]:
    found = {}
    for path in directory.glob("rank*.json"):
        try:
            found[int(path.stem[4:])] = json.loads(path.read_text())
        except (ValueError, OSError):
            continue  # being replaced right now; the next poll reads it
    return found


def blame(statuses: dict[int, dict], timed_out: bool, stderr: str) -> tuple[int, str]:
    """(config index, message) of the failure: a rank's own error, else the rank that made
    the least progress (a hang), else torchrun's root-cause summary."""
    failed = [(status["time"], rank, status) for rank, status in statuses.items()
              if status.get("error")]
    if failed:
        _, rank, status = min(failed)
        return status["config"], f"rank {rank} failed at {status['stage']}: {status['error']}"
    if timed_out and statuses:
        laggard = min(statuses, key=lambda rank: (statuses[rank]["config"],
                                                  statuses[rank]["sequence"]))
        status = statuses[laggard]
        return status["config"], (f"rank {laggard} hung at {status['stage']} (no progress "
                                  "within the timeout); the job was ended")
    if timed_out:
        return 0, "no rank reported progress within the timeout (start-up hung); job ended"
    match = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", stderr, re.S)
    config = min((status["config"] for status in statuses.values()), default=0)
    if match:
        return config, f"rank {match.group(1)} exited with code {match.group(2)}"
    return config, "the job ended before any rank reported (see worker.log): " + \
        stderr.strip().splitlines()[-1][:300] if stderr.strip() else "no output"


def _end(process: subprocess.Popen, statuses: dict[int, dict]) -> None:
    """End a stuck job: SIGTERM to torchrun (it stops its workers), then SIGKILL to its group
    and to every rank it started (torchrun puts each worker in a session of its own)."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for status in statuses.values():
        try:
            os.kill(status["pid"], signal.SIGKILL)
        except (ProcessLookupError, KeyError, PermissionError):
            pass  # already gone


def launch(job: dict, directory: Path, nproc: int, nnodes: int, rdzv_endpoint: str,
           timeout_s: float) -> tuple[bool, str]:
    """Run torchrun on the job until it ends or no rank progresses for timeout_s; returns
    (succeeded, failure text)."""
    status_dir = directory / "status"
    status_dir.mkdir(parents=True, exist_ok=True)
    for stale in status_dir.glob("rank*.json"):
        stale.unlink()
    job = {**job, "status_dir": str(status_dir), "timeout_s": timeout_s}
    job_path = write_json(directory / "job.json", job)
    rendezvous = (["--standalone"] if nnodes == 1 and not rdzv_endpoint else
                  ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"])
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--nnodes={nnodes}", "--max-restarts=0", *rendezvous,
               "-m", "bench.distributed.rank", str(job_path)]
    # Tied to this process: if the dist command is killed, torchrun gets SIGTERM and ends its
    # ranks (each rank is tied to torchrun in turn), instead of running on as orphans.
    command = lifeline.tied_command(command, signal.SIGTERM)
    log_path = directory / "worker.log"
    with open(log_path, "ab") as log:
        # A new session: on a hang the whole process group (torchrun and its ranks) is ended.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ})
        last_progress, last_seen = timing.monotonic_s(), None
        timed_out = False
        while process.poll() is None:
            time.sleep(0.2)
            seen = {rank: status["sequence"] for rank, status in _statuses(status_dir).items()}
            if seen != last_seen:
                last_seen, last_progress = seen, timing.monotonic_s()
            elif timing.monotonic_s() - last_progress > timeout_s:
                timed_out = True
                _end(process, _statuses(status_dir))
    if process.returncode == 0 and not timed_out:
        return True, ""
    text = log_path.read_text(errors="replace")[-20000:]
    config, message = blame(_statuses(status_dir), timed_out, text)
    return False, json.dumps({"config": config, "message": message})


def run_job(job: dict, directory: Path, nproc: int, nnodes: int, rdzv_endpoint: str,
            timeout_s: float, error_row) -> None:
    """Launch until every configuration has a row: a failed configuration gets an error row
    and the job restarts with the ones after it."""
    results = Path(job["results"])
    configs = list(job["configs"])
    while configs:
        succeeded, failure = launch({**job, "configs": configs}, directory, nproc, nnodes,
                                    rdzv_endpoint, timeout_s)
        done = {row.task_key for row in read_rows(results)} if results.exists() else set()
        if succeeded:
            return
        detail = json.loads(failure)
        failed = configs[min(detail["config"], len(configs) - 1)]
        print(f"error: {failed['op']}/{failed['impl']} {failed['workload']['name']}: "
              f"{detail['message']}", file=sys.stderr)
        if failed["task_key"] not in done:
            with ResultsWriter(results) as writer:
                row: ResultRow = error_row(failed)
                row.status, row.error = STATUS_ERROR, detail["message"][:500]
                writer.write(row)
            done.add(failed["task_key"])
        configs = [config for config in configs if config["task_key"] not in done]
