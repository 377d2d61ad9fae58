"""Execute a planned sweep: run directory, env.json, rows streamed to results.csv, summary."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench import devices, sweep
from bench.cli import EXIT_ALL_ERRORED, EXIT_SOME_ERRORED, UsageError
from bench.schema import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, ResultsWriter, read_rows
from bench.summary import render_summary
from bench.worker import skipped_row


def _write_json(path: Path, value) -> None:
    """Write JSON atomically (temp file + rename): never a half-written file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str))
    temporary.replace(path)


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


def execute(args, argv, planned, directory: Path, run_id: str, resuming: bool, policy) -> int:
    """Run the planned tasks into directory; returns the exit code (see exit_code)."""
    results_path = directory / "results.csv"
    done = sweep.completed_keys(results_path) if resuming else set()
    if not resuming:
        _start_run_directory(directory, argv, run_id, policy)
    pending = [item for item in planned if item.task.key() not in done]
    if resuming:
        print(f"resuming {directory}: {len(planned) - len(pending)} of {len(planned)} "
              "configurations already recorded", file=sys.stderr)
    progress = Progress(len(pending))
    with ResultsWriter(results_path) as writer:
        try:
            for item in pending:
                if item.skip_reason:
                    row = skipped_row(item.task, run_id, item.skip_reason)
                    writer.write(row)
                    progress.advance(row)
            runnable = [item.task for item in pending if not item.skip_reason]
            sweep.run_tasks(runnable, run_id, policy, writer, directory / "worker.log",
                            args.task_timeout, progress=progress.advance,
                            describe=progress.describe)
        except KeyboardInterrupt:
            progress.close()
            print(f"interrupted: finished rows are in {results_path}; "
                  f"finish with: python run_bench.py --resume {directory}", file=sys.stderr)
            return 130
    progress.close()
    rows = read_rows(results_path)
    print(render_summary(rows))
    counts = {status: sum(row.status == status for row in rows)
              for status in (STATUS_OK, STATUS_SKIPPED, STATUS_ERROR)}
    print(f"\n{counts[STATUS_OK]} measured, {counts[STATUS_SKIPPED]} skipped, "
          f"{counts[STATUS_ERROR]} errors -> {results_path}")
    if not args.no_report:
        _build_report(directory)
    code = exit_code(counts[STATUS_OK], counts[STATUS_ERROR])
    if code == EXIT_ALL_ERRORED:
        print(f"error: every configuration that ran failed; nothing was measured (see the "
              f"error column of {results_path})", file=sys.stderr)
    elif code == EXIT_SOME_ERRORED:
        print(f"warning: {counts[STATUS_ERROR]} configurations failed (exit "
              f"{EXIT_SOME_ERRORED}); see the error column of {results_path}", file=sys.stderr)
    return code


def exit_code(measured: int, errors: int) -> int:
    """0 without error rows; 1 when rows errored and none measured; 3 when some errored."""
    # A CI job must not pass on a sweep whose kernels crashed or failed their float64 check,
    # so any error row is non-zero; 3 tells "partly measured" from "nothing measured".
    if not errors:
        return 0
    return EXIT_SOME_ERRORED if measured else EXIT_ALL_ERRORED


def _start_run_directory(directory: Path, argv, run_id: str, policy) -> None:
    """Create the run directory with args.json and env.json; one-line error if it cannot."""
    first_created = None  # the outermost folder this call creates, removed on failure
    probe = directory
    while not probe.exists() and probe != probe.parent:
        first_created, probe = probe, probe.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / "args.json", {"argv": argv, "run_id": run_id,
                                              "timing_policy": policy.__dict__})
        _write_json(directory / "env.json", {"run_id": run_id, **devices.host_facts(),
                                             "perf_counters": devices.perf_counter_support()})
    except OSError as error:
        if first_created is not None:  # leave nothing behind for a run that never started
            shutil.rmtree(first_created, ignore_errors=True)
        raise UsageError(f"cannot write the run directory {directory}: "
                         f"{error.strerror or error}") from None


def _build_report(directory: Path) -> None:
    """Build the HTML report; a report failure never touches the finished results."""
    try:
        from reports.build import build_report

        report = build_report([directory])
        print(f"report: {report / 'index.html'}")
    except Exception as error:  # the results are safe on disk; say what failed
        print(f"warning: report not built ({type(error).__name__}: {error}); "
              f"retry with: python run_bench.py report {directory}", file=sys.stderr)
