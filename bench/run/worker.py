"""`python -m bench.run.worker`: runs tasks in a fresh process; streams result rows upward."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import traceback
import warnings
from typing import Any, Callable, Optional

import torch

from bench import registry
from bench.compare_outputs import compare, relative_row_bound
from bench.ops.common import clear_shared_inputs
from bench.run import callgrind, devices, isa_probe, lifeline, telemetry, timing
from bench.registry import BuildContext, Prepared, Unsupported
from bench.records import (STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, ResultRow, dumps_compact,
                           record_summary, utc_timestamp)
from bench.run.settings import WorkerSettings
from bench.run.tasks import Task


def base_row(task: Task, settings: WorkerSettings, isa_effective: str = "") -> ResultRow:
    """The identifying columns of a task's row, before any measurement."""
    implementation = registry.impls(task.op)[task.impl]
    return ResultRow(
        run_id=settings.run_id, task_key=task.key(), op=task.op, impl=task.impl,
        is_baseline=implementation.baseline, code_version=implementation.code_version,
        workload=task.workload.name, params=dumps_compact(task.variant), device=task.device,
        device_name=devices.device_name(task.device), isa=task.isa, isa_effective=isa_effective,
        threads=task.threads, precision=task.precision, batch_size=task.workload.batch_size,
        fingerprint=devices.fingerprint(task.device, task.isa, task.threads,
                                        settings.fingerprint_policy),
        timestamp=utc_timestamp(),
    )


def skipped_row(task: Task, settings: WorkerSettings, reason: str) -> ResultRow:
    """A row for a combination that cannot run, with the reason."""
    row = base_row(task, settings)
    row.status, row.error = STATUS_SKIPPED, reason
    return row


def _fail(row: ResultRow, message: str) -> ResultRow:
    row.status, row.error = STATUS_ERROR, message.replace("\n", " ")[:500]
    return row


def repeated(run: Callable[[], Any], calls: int) -> Callable[[], Any]:
    """A closure calling run `calls` times back to back (run itself when calls is 1)."""
    if calls == 1:
        return run

    def run_repeatedly() -> Any:
        for _ in range(calls - 1):
            run()
        return run()

    return run_repeatedly


def check(prepared: Prepared, row: ResultRow, precision: str,
          phases: Optional["_PhaseClock"] = None) -> str:
    """Compare the impl with its float64 reference, row by row; the failure message, or ''.
    phases (if given) is told where the checked call ends and the reference ends."""
    tolerance = (prepared.tolerance if prepared.tolerance is not None
                 else registry.TOLERANCE[precision])
    lap = phases.lap if phases is not None else (lambda column: 0.0)
    stage = "check_s"
    try:
        output = (prepared.check or prepared.run)()
        lap(stage)
        stage = "reference_s"
        expected = prepared.reference()
        lap(stage)
        stage = "check_s"  # the comparison counts as checking
        bound = (prepared.error_bound(expected) if prepared.error_bound is not None
                 else relative_row_bound(expected, tolerance))
        comparison = compare(output, expected, bound)
    except Exception as error:  # NaN, wrong shape, or a kernel that raised
        return f"check against float64 reference failed: {error}"
    finally:
        lap(stage)
    row.rel_error = comparison.rel_error
    # Kept in the row's metrics, error rows included: how close a correct kernel comes.
    row.metrics = dumps_compact({"error_bound_ratio": float(f"{comparison.ratio:.4g}"),
                                 "error_bound_row": comparison.row})
    worst = "" if comparison.passed else f"{precision} error bound exceeded at " + (
        comparison.describe())
    if not row.rel_error <= tolerance:
        return (f"relative error {row.rel_error:.3g} exceeds the {precision} tolerance "
                f"{tolerance:g}" + (f"; {worst}" if worst else ""))
    return worst


class _PhaseClock:
    """Contiguous phases of one row's wall: each lap adds the time since the previous lap to a
    row column, so the columns add up to the wall from the first reading to the last."""

    def __init__(self, row: ResultRow, started_s: float):
        self.row, self.last = row, started_s

    def lap(self, column: str) -> float:
        """Add the seconds since the previous lap to column; returns them."""
        now = timing.monotonic_s()
        elapsed, self.last = now - self.last, now
        current = getattr(self.row, column)
        setattr(self.row, column, elapsed if math.isnan(current) else current + elapsed)
        return elapsed


def _record_quality(prepared: Prepared, row: ResultRow, metrics: dict) -> str:
    """Model-level accuracy (dlrm_infer) into the row; the failure message, or ''."""
    if prepared.accuracy is None:
        return ""
    try:
        quality = prepared.accuracy()
    except Exception as error:
        return f"accuracy evaluation failed: {type(error).__name__}: {error}"
    row.auc, row.logloss = quality["auc"], quality["logloss"]
    row.ctr_abs_diff = quality["ctr_abs_diff"]
    metrics.update(quality.get("metrics", {}))
    return ""


def _record_timing(row: ResultRow, prepared: Prepared, summary, observed, calls: int,
                   metrics: dict) -> None:
    """Times, rates and telemetry of a measurement into the row."""
    record_summary(row, summary)
    # Times are per repetition (calls_per_rep calls); rates count the work of every call.
    row.samples_per_s = calls * prepared.samples / summary.median_s
    row.gbps = calls * prepared.bytes_moved / summary.median_s / 1e9
    row.gflops = calls * prepared.flops / summary.median_s / 1e9 if prepared.flops else math.nan
    row.cpu_util, row.peak_rss_bytes = observed.cpu_util, observed.peak_rss_bytes
    row.avg_power_w, row.energy_j = observed.avg_power_w, observed.energy_j
    row.joules_per_sample = observed.avg_power_w * summary.median_s / (calls * prepared.samples)
    if observed.gpu:
        metrics["gpu"] = observed.gpu
    if row.device.startswith("cuda"):
        metrics["l2_flush"] = prepared.flush_between_reps
        # The energy counter is read around the timed loop, which interleaves the flushes.
        metrics["energy_window"] = ("timed repetitions and the L2 flushes between them"
                                    if prepared.flush_between_reps else "timed repetitions")
    if observed.sources:
        metrics["energy_source"] = ", ".join(observed.sources)
    metrics["noise_iqr_over_median"] = round(summary.iqr_s / summary.median_s, 4)
    metrics["noisy"] = summary.noisy


def _record_count(row: ResultRow, count: callgrind.Count, metrics: dict) -> None:
    """Instruction counts (and simulated misses) of one configuration into the row."""
    row.instructions = count.median("instructions")
    row.instruction_calls = count.calls
    row.d1_misses_simulated = count.median("d1_misses")
    row.ll_misses_simulated = count.median("ll_misses")
    metrics["instructions_per_count"] = [round(figures["instructions"], 1)
                                         for figures in count.per_dump]
    metrics["counted_under"] = "valgrind callgrind (the CPU it shows has no AVX-512/AMX)"
    if count.caches:
        metrics["simulated_caches"] = count.caches


def run_task(task: Task, settings: WorkerSettings, isa_effective: str = "",
             counter: callgrind.Counter | None = None) -> ResultRow:
    """Build, check against float64, then time (or count) one task; never raises for its faults.

    With a counter (the worker runs under callgrind) the checked closure's instructions are
    counted instead of timed: times under Valgrind are ~50x off and would mislead."""
    started_s = timing.monotonic_s()  # the row's wall starts here
    row = base_row(task, settings, isa_effective)
    phases = _PhaseClock(row, started_s)
    implementation = registry.impls(task.op)[task.impl]
    device = torch.device(task.device)
    context = BuildContext(workload=task.workload, variant=task.variant, precision=task.precision,
                           device=device, seed=task.seed, options=task.options,
                           time_calls=timing.time_each_call)
    try:
        prepared = implementation.build(context)
    except Unsupported as reason:
        row.status, row.error = STATUS_SKIPPED, str(reason)
        return row
    except (MemoryError, torch.OutOfMemoryError) as error:
        phases.lap("setup_s")
        return _fail(row, f"out of memory while building inputs ({error}); use --max-rows "
                          "or a smaller --batch-size")
    except Exception as error:  # a builder bug must not stop the sweep: record it
        phases.lap("setup_s")
        return _fail(row, f"build failed: {type(error).__name__}: {error}")
    row.params = dumps_compact({**task.variant, **prepared.params})
    row.flops, row.bytes_moved = float(prepared.flops), float(prepared.bytes_moved)
    phases.lap("setup_s")
    problem = check(prepared, row, task.precision, phases)
    metrics = {**prepared.metrics, **json.loads(row.metrics or "{}")}
    problem = problem or _record_quality(prepared, row, metrics)
    phases.lap("check_s")  # model accuracy is part of checking
    if problem:
        return _fail(row, problem)
    # --calls-per-rep: a known amount of extra work per repetition, to validate the checker.
    calls = int(task.options.get("calls_per_rep", 1))
    metrics["calls_per_rep"] = calls
    if counter is not None:
        try:
            count = counter.count(repeated(prepared.run, calls),
                                  settings.count_policy or callgrind.CountPolicy())
        except Exception as error:
            phases.lap("timing_s")
            return _fail(row, f"instruction count failed: {type(error).__name__}: {error}")
        _record_count(row, count, metrics)
        row.warmup_s = 0.0  # callgrind's count holds its own warm-up: all of it is timing_s
        phases.lap("timing_s")
        return _finish(row, task, isa_effective, metrics)
    try:
        summary, observed = timing.measure(
            repeated(prepared.run, calls), device, settings.policy, task.threads,
            flush_l2=prepared.flush_between_reps, monitor=telemetry.Monitor(task.device))
    except Exception as error:
        phases.lap("timing_s")
        return _fail(row, f"timing failed: {type(error).__name__}: {error}")
    _record_timing(row, prepared, summary, observed, calls, metrics)
    # measure splits its own wall; what it cannot see (making the Monitor, recording the row)
    # is timing overhead too, so the phases still add up to the task's wall.
    row.warmup_s = summary.warmup_wall_s
    row.timing_s = phases.lap("timing_s") - summary.warmup_wall_s
    return _finish(row, task, isa_effective, metrics)


def _finish(row: ResultRow, task: Task, isa_effective: str, metrics: dict) -> ResultRow:
    """ISA notes and metrics into a measured row, marked ok."""
    mismatch = isa_probe.isa_mismatch(task.isa, isa_effective)
    if mismatch:
        metrics["isa_mismatch"] = mismatch
    unverified = isa_probe.unverified_libraries(isa_effective)
    if unverified:
        metrics["isa_unverified"] = ", ".join(unverified)
    row.metrics = dumps_compact(metrics)
    row.status = STATUS_OK
    return row


def pin_threads(threads: int, device: str = "cpu", first: int = 0) -> list[int]:
    """Pin a CPU worker to `threads` CPUs (from the first-th allowed one: co-located serving
    workers take disjoint cores) and set torch's thread count; returns the CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    if device.startswith("cuda"):
        # A GPU worker's host side is the launching thread plus the NVML sampler and the CUDA
        # driver's threads; squeezed onto `threads` cores they would delay kernel launches.
        torch.set_num_threads(threads)
        return allowed
    chosen = allowed[first:first + threads]
    os.sched_setaffinity(0, chosen)
    torch.set_num_threads(threads)
    return chosen


class EventStream:
    """JSON-lines events to the parent on a dedicated pipe (stdout may carry library logs)."""

    def __init__(self, descriptor: int):
        self._handle = os.fdopen(descriptor, "w", buffering=1)

    def send(self, **event) -> None:
        """Write one event and flush it."""
        self._handle.write(json.dumps(event) + "\n")
        self._handle.flush()


def release_task_memory(workload_done: bool = False) -> None:
    """Free what a finished configuration built before the next one builds its own (with
    workload_done: what the caches of the workload just left held too)."""
    # A Prepared's closures, modules and tables can sit in reference cycles that only the
    # cyclic collector frees; a worker allocates few Python objects between configurations,
    # so without a collection here one impl's multi-GB copy outlived it into the next build.
    if workload_done:
        gc.unfreeze()  # entries of the caches just cleared may now be cyclic garbage
    gc.collect()
    if torch.cuda.is_initialized():
        # Hand the freed blocks back to the device: the next build's tensors have other shapes
        # (mlperf's one 97 GiB concatenated table after per_table's 26), and blocks cached
        # for the last ones would leave it no room.
        torch.cuda.empty_cache()
    # What survives is the worker's lasting state (imports, the workload's caches): frozen,
    # it is not scanned again, and the next collection costs what one configuration made
    # (a full one took 0.4-0.5 s with torch, fbgemm and inductor loaded).
    gc.freeze()


def reset_peak_rss() -> bool:
    """Linux: restart the resident-set high-water mark (VmHWM) so it covers one task."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_text() -> str:
    """This process's VmHWM since the last reset, for the worker log (or 'unknown')."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return f"{int(line.split()[1]) / 2**20:.2f} GiB"
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> int:
    """Run the tasks in a file; one `row` event per task, `start` before each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tasks", help="file with one Task JSON per line")
    parser.add_argument("--event-fd", type=int, required=True)
    parser.add_argument("--settings", required=True, help="WorkerSettings as JSON")
    parser.add_argument("--op-dir", action="append", default=[],
                        help="a directory of op modules beyond bench/ops (repeatable)")
    parser.add_argument("--dump-dir", help="where callgrind writes this worker's dumps "
                                           "(with the settings' count policy)")
    parser.add_argument("--parent-pid", type=int,
                        help="the sweep's pid: this worker ends itself when that process is gone")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        # A sweep killed outright (SIGKILL, OOM killer) runs no cleanup; without this its
        # worker would go on timing at full CPU beside every later measurement.
        lifeline.die_with_parent(args.parent_pid, signal.SIGKILL)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*quantiz.*")
    events = EventStream(args.event_fd)
    with open(args.tasks, encoding="utf-8") as handle:
        tasks = [Task.from_json(line) for line in handle if line.strip()]
    settings = WorkerSettings.from_json(args.settings)
    for directory in args.op_dir:
        registry.add_op_directory(directory)
    counter = callgrind.Counter(args.dump_dir) if settings.count_policy else None
    if tasks:
        pin_threads(tasks[0].threads, tasks[0].device)
    isa_effective = isa_probe.effective_isa() if tasks and tasks[0].device == "cpu" else ""
    events.send(event="ready", isa_effective=isa_effective)
    current_workload = None
    for index, task in enumerate(tasks):
        if task.workload != current_workload:
            clear_shared_inputs()  # bound memory: one workload's tables and inputs at a time
            release_task_memory(workload_done=True)
            current_workload = task.workload
        events.send(event="start", index=index)
        print(f"worker {os.getpid()}: task {index} started: {task.key()}", flush=True)
        reset_peak_rss()
        try:
            row = run_task(task, settings, isa_effective, counter)
        except Exception:  # a harness bug: report it as this task's error and go on
            row = _fail(base_row(task, settings, isa_effective),
                        "worker error: " + traceback.format_exc(limit=3))
        release_task_memory()
        print(f"worker {os.getpid()}: task {index} {row.status}; peak RSS "
              f"{_peak_rss_text()}", flush=True)
        events.send(event="row", index=index, row=row.__dict__)
    events.send(event="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
