"""Execute a planned sweep: run directory, env.json, rows streamed to results.csv."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench import registry
from bench.records import ResultsWriter, dumps_compact, read_rows, write_json
from bench.run import devices, sweep
from bench.run.settings import WorkerSettings
from bench.run.worker import skipped_row


class RunDirectoryError(Exception):
    """The run directory cannot be created or written; the message is one line."""


class Progress:
    """A tqdm bar with ETA over the sweep's tasks, naming the configuration being measured."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.total = total
        self.bar = tqdm(total=total, unit="cfg", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5, disable=None)
        self.done = 0

    def describe(self, task) -> None:
        """Show what runs now."""
        self.bar.set_description(f"{task.op}/{task.impl} {task.workload.name} {task.precision}",
                                 refresh=False)

    def advance(self, row) -> None:
        """One configuration finished."""
        self.done += 1
        self.bar.update(1)
        if self.bar.disable:  # no terminal: print a line per configuration instead
            print(f"[{self.done}/{self.total}] {row.op}/{row.impl} {row.workload} "
                  f"{row.precision}: {row.status}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()


def execute(argv, planned, directory: Path, run_id: str, resuming: bool, policy,
            task_timeout_s: float, count_policy=None, counting=None, replicates: int = 1) -> int:
    """Run the planned tasks into directory; 0 when every task has a row, 130 if interrupted.

    count_policy (a callgrind.CountPolicy): count instructions under callgrind instead of
    timing; counting: the facts that then stand for the timing policy in fingerprints.
    replicates K > 1: every configuration is measured in K fresh worker processes, replicate 1
    of every group first, then replicate 2, ...; its rows carry metrics replicate k."""
    settings = WorkerSettings(run_id, policy, count_policy, counting,
                              log_path=directory / "worker.log", task_timeout_s=task_timeout_s)
    results_path = directory / "results.csv"
    done = _completed(results_path, replicates) if resuming else set()
    if not resuming:
        _start_run_directory(directory, argv, settings, planned)
    # (planned item, replicate): skips are written once, as replicate 1.
    pending = [(item, k) for k in range(1, replicates + 1) for item in planned
               if (item.task.key(), k) not in done and (k == 1 or not item.skip_reason)]
    if resuming:
        total = sum(1 if item.skip_reason else replicates for item in planned)
        print(f"resuming {directory}: {total - len(pending)} of {total} "
              "configurations already recorded", file=sys.stderr)
    progress = Progress(len(pending))
    with ResultsWriter(results_path) as writer:
        try:
            for item, k in pending:
                if item.skip_reason:
                    row = skipped_row(item.task, settings, item.skip_reason)
                    _Replicate(writer, k, replicates).write(row)
                    progress.advance(row)
            for k in range(1, replicates + 1):  # a fresh worker per group for each replicate
                runnable = [item.task for item, kk in pending if kk == k and not item.skip_reason]
                sweep.run_tasks(runnable, settings, _Replicate(writer, k, replicates),
                                progress=progress.advance, describe=progress.describe)
        except KeyboardInterrupt:
            progress.close()
            print(f"interrupted: finished rows are in {results_path}; "
                  f"finish with: python run_bench.py --resume {directory}", file=sys.stderr)
            return 130
    progress.close()
    return 0


class _Replicate:
    """A results writer that stamps each row with its replicate (when there are several)."""

    def __init__(self, writer: ResultsWriter, index: int, count: int):
        self.writer, self.index, self.count = writer, index, count

    def write(self, row) -> None:
        """Write row, its metrics carrying replicate and replicates when count > 1."""
        if self.count > 1:
            metrics = json.loads(row.metrics or "{}")
            metrics.update({"replicate": self.index, "replicates": self.count})
            row.metrics = dumps_compact(metrics)
        self.writer.write(row)


def _completed(results_path: Path, replicates: int) -> set[tuple[str, int]]:
    """(task_key, replicate) of the rows already in a results file (for --resume)."""
    if not results_path.exists():
        return set()
    done = set()
    for row in read_rows(results_path):
        index = json.loads(row.metrics or "{}").get("replicate", 1) if replicates > 1 else 1
        done.add((row.task_key, index))
    return done


def _start_run_directory(directory: Path, argv, settings: WorkerSettings, planned) -> None:
    """Create the run directory with args.json and env.json; RunDirectoryError if it cannot."""
    first_created = None  # the outermost folder this call creates, removed on failure
    probe = directory
    while not probe.exists() and probe != probe.parent:
        first_created, probe = probe, probe.parent
    # The facts behind every fingerprint of the run, so that the checker can say which
    # facts differ when two runs' fingerprints do.
    configurations = {(item.task.device, item.task.isa, item.task.threads) for item in planned}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "args.json", {"argv": argv, "run_id": settings.run_id,
                                             "timing_policy": settings.policy.__dict__,
                                             **({"counting": settings.counting}
                                                if settings.counting else {}),
                                             "op_facts": registry.facts()})
        write_json(directory / "env.json", {"run_id": settings.run_id, **devices.host_facts(),
                                            "perf_counters": devices.perf_counter_support(),
                                            "fingerprint_facts": devices.fingerprint_records(
                                                configurations, settings.fingerprint_policy)})
    except OSError as error:
        if first_created is not None:  # leave nothing behind for a run that never started
            shutil.rmtree(first_created, ignore_errors=True)
        raise RunDirectoryError(f"cannot write the run directory {directory}: "
                                f"{error.strerror or error}") from None
