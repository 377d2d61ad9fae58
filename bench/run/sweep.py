"""Expand sweep choices into tasks and run them in isolated worker processes, row by row."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from bench import registry
from bench.records import STATUS_ERROR, ResultRow, ResultsWriter, read_rows
from bench.run import callgrind, devices
from bench.run.settings import WorkerSettings
from bench.run.tasks import Task, worker_order
from workloads.specs import SpecError, WorkloadSpec

# Ops that measure the machine rather than a workload run once per worker group, labelled
# with this workload name.
MACHINE_WORKLOAD = "machine"
READY_TIMEOUT_S = 180.0  # torch import + ISA probe in a fresh process
# Under callgrind, Python and torch start ~50x slower (about a minute on a quiet machine).
CALLGRIND_READY_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True)
class PlannedTask:
    """A task and, when it cannot run here, why (it then becomes a skipped row)."""

    task: Task
    skip_reason: str = ""


@dataclasses.dataclass(frozen=True)
class Named:
    """What the user asked for by name (--ops, --impls, --precision); defaults name nothing.

    A configuration the registry says cannot run (registry.refusal) is planned as a skip row
    only when the user asked for it by name:
    - a refusal of the impl itself (device, a module not installed, options, host facts):
      when the impl is named in --impls;
    - a precision the impl has no kernel for: when the impl is named in --impls AND the
      precision in --precision;
    - one of the op's own variants the impl cannot run (a GEMM square sized for another
      device, a dense or TT-Rec variant): never, since no flag names a variant;
    - and an op named in --ops that would plan nothing at all for a workload and machine slot
      gets one skip row per impl (its first refused configuration), so the user sees why.
    Everything else refused is what a default or the cross product could not pair: it is left
    out of the plan and counted by reason in LeftOut."""

    ops: frozenset = frozenset()
    impls: frozenset = frozenset()
    precisions: frozenset = frozenset()

    def asked(self, refusal: registry.Refusal, impl: str, precision: str) -> bool:
        """Whether the user named this refused configuration (see the class docstring)."""
        if refusal.about == registry.ABOUT_IMPL:
            return impl in self.impls
        if refusal.about == registry.ABOUT_PRECISION:
            return impl in self.impls and precision in self.precisions
        return False


@dataclasses.dataclass
class LeftOut:
    """Configurations the planner left out, counted by reason, with the impls each concerns."""

    counts: dict = dataclasses.field(default_factory=dict)  # short reason -> configurations
    impls: dict = dataclasses.field(default_factory=dict)  # short reason -> ["op/impl", ...]

    def add(self, refusal: registry.Refusal, subject: str) -> None:
        """Count one left-out configuration."""
        self.counts[refusal.short] = self.counts.get(refusal.short, 0) + 1
        subjects = self.impls.setdefault(refusal.short, [])
        if subject not in subjects:
            subjects.append(subject)

    def total(self) -> int:
        """Configurations left out in all."""
        return sum(self.counts.values())

    def records(self) -> list[dict]:
        """One record per reason, most configurations first (recorded in args.json)."""
        return [{"reason": reason, "configurations": count, "impls": sorted(self.impls[reason])}
                for reason, count in sorted(self.counts.items(), key=lambda item: (-item[1],
                                                                                    item[0]))]


def plan(ops: Iterable[str], workloads: Iterable[WorkloadSpec], precisions: Iterable[str],
         device_list: Iterable[str], isa_levels: Iterable[str], thread_counts: Iterable[int],
         seed: int, options: Optional[dict] = None,
         impl_filter: Optional[set[str]] = None, named: Optional[Named] = None,
         left_out: Optional[LeftOut] = None,
         budgets: Optional[dict[str, "MemoryBudget"]] = None) -> list[PlannedTask]:
    """The cross product of the choices, ordered so one worker serves each group and runs
    each workload's configurations back to back (tasks.worker_order).

    named: what the user asked for by name (see Named); None plans every configuration that
    cannot run as a skip row. What is left out is counted into left_out when given. budgets
    (device -> MemoryBudget, if given) refuse an impl whose configuration would not fit."""
    options = options or {}
    workloads, precisions = list(workloads), list(precisions)
    all_ops = registry.ops()
    planned: list[PlannedTask] = []
    for device in device_list:
        # ISA caps are CPU knobs: a GPU runs once, at "native".
        levels = list(isa_levels) if device == "cpu" else ["native"]
        for isa in levels:
            for threads in thread_counts:
                for op_name in ops:
                    op = all_ops[op_name]
                    targets = ([_machine_workload(workloads[0])] if op.probe
                               else workloads)
                    # A probe runs once, with the variants every workload asks of it (the
                    # compute roof includes each model's own GEMM shapes).
                    variants = _probe_variants(op, workloads, options) if op.probe else None
                    for workload in targets:
                        candidates = _op_tasks(op, workload, precisions, device, isa, threads,
                                               seed, options, impl_filter, variants,
                                               (budgets or {}).get(device))
                        planned.extend(_prune(op.name, candidates, named, left_out))
    return worker_order(planned, lambda item: item.task)


def _machine_workload(workload: WorkloadSpec) -> WorkloadSpec:
    return dataclasses.replace(workload, name=MACHINE_WORKLOAD, batch_size=1)


def _probe_variants(op, workloads, options) -> list[dict]:
    """The union of a probe's variants over the sweep's workloads, in first-seen order."""
    seen, variants = set(), []
    for workload in workloads:
        for variant in op.variants(workload, options):
            key = json.dumps(variant, sort_keys=True)
            if key not in seen:
                seen.add(key)
                variants.append(variant)
    return variants


def _op_tasks(op, workload, precisions, device, isa, threads, seed, options, impl_filter,
              variants=None, budget: Optional["MemoryBudget"] = None
              ) -> list[tuple[PlannedTask, Optional[registry.Refusal]]]:
    """Every configuration of one op, each with the registry's refusal or the memory
    budget's (None: may run); variants (if given) replace the op's own for this workload."""
    candidates = []
    memory_refusals: dict[tuple[str, str], Optional[registry.Refusal]] = {}
    op_precisions = ["fp32"] if op.precision_agnostic else precisions
    for op_variant in (op.variants(workload, options) if variants is None else variants):
        for implementation in registry.impls(op.name).values():
            if impl_filter and implementation.name not in impl_filter:
                continue
            own = implementation.variants(options) if implementation.variants else [{}]
            for variant, precision in itertools.product(
                    [{**op_variant, **extra} for extra in own], op_precisions):
                task = Task(op=op.name, impl=implementation.name, workload=workload,
                            variant=variant, precision=precision, device=device, isa=isa,
                            threads=threads, seed=seed, options=options)
                refusal = registry.refusal(implementation, variant, precision, device, options)
                if refusal is None and budget is not None:
                    key = (implementation.name, precision)
                    if key not in memory_refusals:
                        memory_refusals[key] = budget.refusal(workload, implementation,
                                                              precision)
                    refusal = memory_refusals[key]
                candidates.append((PlannedTask(task, refusal.reason if refusal else ""),
                                   refusal))
    return candidates


def _prune(op: str, candidates, named: Optional[Named],
           left_out: Optional[LeftOut]) -> list[PlannedTask]:
    """The candidates the user gets as rows (see Named); the rest counted into left_out."""
    if named is None:
        return [item for item, _ in candidates]
    kept = [item for item, refusal in candidates
            if refusal is None or named.asked(refusal, item.task.impl, item.task.precision)]
    if not kept and op in named.ops:
        first: dict[str, PlannedTask] = {}
        for item, _ in candidates:
            first.setdefault(item.task.impl, item)
        kept = list(first.values())
    if left_out is not None:
        rows = {id(item) for item in kept}
        for item, refusal in candidates:
            if id(item) not in rows:
                left_out.add(refusal, f"{item.task.op}/{item.task.impl}")
    return kept


def _table_bytes(workload: WorkloadSpec, op: registry.Op, cap: Optional[int] = None) -> float:
    """fp32 bytes of the tables an op holds, with every table capped at cap rows."""
    rows = [min(table.rows, cap) if cap else table.rows for table in workload.tables]
    if op.single_table:
        rows = [max(rows)]
    return float(sum(rows)) * workload.dim * 4


# What a worker holds besides the tables: torch 2.13 CPU and fbgemm_gpu imported (0.46 GiB
# resident, measured on the 2-vCPU dev VM) and its rotating inputs (at most
# bench.ops.common.MAX_ROTATION_INDEX_BYTES, 256 MiB).
WORKER_BASE_BYTES = float((512 + 256) << 20)
MEMORY_BUDGET_FRACTION = 0.9  # of what is available: the rest for fragmentation and the OS


def memory_factor(op: registry.Op, implementation: Optional[registry.Impl], part: str,
                  precision: Optional[str] = None) -> float:
    """Bytes a configuration holds per byte of the workload's fp32 tables: part "all" (a CPU
    run: the op's memory_factor), "device" or "host" (a GPU run's: the impl's
    gpu_memory_factors, else the op's, else all of memory_factor on the device; at a
    precision, or the leanest of them: registry.factors_at)."""
    if part == "all":
        return op.memory_factor
    factors = ((implementation.gpu_memory_factors if implementation is not None else None)
               or op.gpu_memory_factors or (op.memory_factor, 0.0))
    device, host = registry.factors_at(factors, precision)
    return {"device": device, "host": host}[part]


def configuration_bytes(workload: WorkloadSpec, op: registry.Op,
                        implementation: Optional[registry.Impl], cap: Optional[int] = None,
                        part: str = "all", precision: Optional[str] = None) -> float:
    """Peak memory of a worker running one impl of op on this workload's tables (see
    memory_factor for part and precision); the host parts add the worker's own
    WORKER_BASE_BYTES; 0 without tables."""
    tables = memory_factor(op, implementation, part, precision) * _table_bytes(workload, op,
                                                                               cap)
    base = WORKER_BASE_BYTES if part != "device" else 0.0
    return tables + base if tables else 0.0


def estimate_bytes(workload: WorkloadSpec, ops: Iterable[str], cap: Optional[int] = None,
                   part: str = "all", impl_filter: Optional[set[str]] = None) -> float:
    """Peak memory of the worker running the worst op's leanest impl (of impl_filter, if
    given) on this workload (see configuration_bytes); what an impl needs beyond it is left
    out at plan time (MemoryBudget)."""
    all_ops = registry.ops()
    # One configuration at a time: the worker frees a finished one's copies before the next
    # build (worker.release_task_memory), so the worst single op is the peak, not their sum.
    needed = [0.0]
    for name in ops:
        impls = [entry for entry in registry.impls(name).values()
                 if not impl_filter or entry.name in impl_filter] or [None]
        needed.append(min(configuration_bytes(workload, all_ops[name], entry, cap, part)
                          for entry in impls))
    return max(needed)


def memories(available_bytes: int, device: str = "cpu",
             device_bytes: Optional[int] = None) -> list[tuple[str, int, str]]:
    """(memory, bytes available, estimate part) of each memory a run on device fills: the
    host's, and on a GPU device (device_bytes given) also the device's."""
    if device_bytes is None:
        return [("host", available_bytes, "all")]
    return [("host", available_bytes, "host"), (device, device_bytes, "device")]


def check_memory(workloads: Iterable[WorkloadSpec], ops: Iterable[str],
                 available_bytes: int, device: str = "cpu",
                 device_bytes: Optional[int] = None,
                 impl_filter: Optional[set[str]] = None) -> None:
    """MemoryBudget.check for a run on device with these memories (see memories)."""
    MemoryBudget(device, tuple(memories(available_bytes, device, device_bytes))).check(
        workloads, ops, impl_filter)


def _largest_cap(needed: Callable[[int], float], workload: WorkloadSpec, budget: float) -> int:
    """The largest per-table row cap whose needed bytes fit the budget (binary search: memory
    grows with the cap); 1 if none does."""
    low, high = 1, max(table.rows for table in workload.tables)
    while low < high:
        middle = (low + high + 1) // 2
        if needed(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """The memories one device's run fills (memories()): check refuses, before anything is
    allocated, a workload that no impl of some op fits; refusal refuses at plan time one impl
    that does not fit, naming what it needs."""

    device: str
    sizes: tuple  # (memory, bytes available, estimate part) as memories() gives them

    def check(self, workloads: Iterable[WorkloadSpec], ops: Iterable[str],
              impl_filter: Optional[set[str]] = None) -> None:
        """Raise SpecError (with the --max-rows that fits) for a workload whose tables will
        not fit under some op's every impl (of impl_filter, if given)."""
        ops = list(ops)
        for workload in workloads:
            for memory, size, part in self.sizes:
                budget = MEMORY_BUDGET_FRACTION * size
                needed = estimate_bytes(workload, ops, part=part, impl_filter=impl_filter)
                if needed <= budget:
                    continue
                if estimate_bytes(workload, ops, 1, part, impl_filter) > budget:
                    raise SpecError(f"workload {workload.name}: a worker needs about "
                                    f"{WORKER_BASE_BYTES / 2**30:.2f} GiB before any table, "
                                    f"but {size / 2**30:.2f} GiB is available")
                cap = _largest_cap(lambda rows, workload=workload, part=part: estimate_bytes(
                    workload, ops, rows, part, impl_filter), workload, budget)
                where = "is available" if memory == "host" else f"is free on {memory}"
                raise SpecError(
                    f"workload {workload.name} needs about {needed / 2**30:.1f} GiB "
                    f"({workload.total_rows:,} rows x dim {workload.dim}, with working copies) "
                    f"but {size / 2**30:.1f} GiB {where}; add --max-rows {cap:,} "
                    "(or fewer ops)")

    def refusal(self, workload: WorkloadSpec, implementation: registry.Impl,
                precision: Optional[str] = None) -> Optional[registry.Refusal]:
        """Why this impl's configurations (at a precision) on workload do not fit; None if
        they do."""
        op = registry.ops()[implementation.op]
        for memory, size, part in self.sizes:
            budget = MEMORY_BUDGET_FRACTION * size
            needed = configuration_bytes(workload, op, implementation, part=part,
                                         precision=precision)
            if needed <= budget:
                continue
            cap = _largest_cap(lambda rows, part=part: configuration_bytes(
                workload, op, implementation, rows, part, precision), workload, budget)
            where = "available" if memory == "host" else f"free on {memory}"
            at = f" at {precision}" if precision else ""
            short = (f"needs about {needed / 2**30:.1f} GiB of {memory} memory for "
                     f"{workload.name}{at}, {size / 2**30:.1f} GiB {where} (--max-rows {cap:,} "
                     "fits)")
            return registry.Refusal(registry.ABOUT_IMPL,
                                    f"{implementation.op}/{implementation.name} {short}", short)
        return None


def device_memory_bytes(device: str) -> Optional[int]:
    """Free bytes on a GPU device (cuda:N); None for the CPU (whose memory is the host's)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def completed_keys(results_path: Path) -> set[str]:
    """Task keys already in a results file (for --resume)."""
    if not results_path.exists():
        return set()
    return {row.task_key for row in read_rows(results_path)}


class WorkerCrash(Exception):
    """The worker process died or stopped answering."""


class WorkerGroup:
    """One worker process running a list of tasks at one (device, ISA level, thread count)."""

    def __init__(self, tasks: list[Task], settings: WorkerSettings):
        self.tasks = tasks
        self.settings = settings
        self.process: Optional[subprocess.Popen] = None

    def _environment(self) -> dict[str, str]:
        device, isa, threads = self.tasks[0].group()
        environment = devices.worker_environment(isa, threads)
        if self.settings.count_policy is not None:
            environment.update(callgrind.WORKER_ENVIRONMENT)
        return environment

    def run(self, on_row: Callable[[int, ResultRow], None],
            on_start: Callable[[int], None]) -> None:
        """Run every task; rows go to on_row as they finish. Raises WorkerCrash(index)."""
        settings = self.settings
        read_end, write_end = os.pipe()
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as task_file:
            task_file.write("\n".join(task.to_json() for task in self.tasks))
        command = [sys.executable, "-m", "bench.run.worker", task_file.name,
                   "--event-fd", str(write_end), "--settings", settings.to_json(),
                   "--parent-pid", str(os.getpid())]
        # Ops found outside bench/ops (registry.add_op_directory) must be found there too.
        for directory in registry.op_directories():
            command += ["--op-dir", directory]
        dump_directory = None
        if settings.count_policy is not None:
            dump_directory = Path(tempfile.mkdtemp(
                prefix="callgrind-", dir=settings.log_path.parent if settings.log_path else None))
            command = (callgrind.worker_prefix(dump_directory, settings.count_policy.cache_sim)
                       + command + ["--dump-dir", str(dump_directory)])
        with open(settings.log_path or os.devnull, "ab") as log:
            self.process = subprocess.Popen(command, env=self._environment(), stdout=log,
                                            stderr=log, pass_fds=(write_end,),
                                            start_new_session=True)
        os.close(write_end)
        try:
            self._read_events(read_end, on_row, on_start)
        finally:
            os.close(read_end)
            os.unlink(task_file.name)
            self.stop()
            if dump_directory is not None:
                shutil.rmtree(dump_directory, ignore_errors=True)

    def _read_events(self, read_end: int, on_row, on_start) -> None:
        selector = selectors.DefaultSelector()
        selector.register(read_end, selectors.EVENT_READ)
        buffer = b""
        current = -1
        deadline = time.monotonic() + self._limit(current)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerCrash(current, f"timed out after {self._limit(current):.0f} s")
            if not selector.select(timeout=min(remaining, 1.0)):
                continue
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                raise WorkerCrash(current, self._death_reason())
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                event = json.loads(line)
                if event["event"] == "start":
                    current = event["index"]
                    on_start(current)
                    deadline = time.monotonic() + self.settings.task_timeout_s
                elif event["event"] == "row":
                    on_row(event["index"], ResultRow(**event["row"]))
                elif event["event"] == "done":
                    return

    def _limit(self, current: int) -> float:
        if current >= 0:
            return self.settings.task_timeout_s
        return (READY_TIMEOUT_S if self.settings.count_policy is None
                else CALLGRIND_READY_TIMEOUT_S)

    def _death_reason(self) -> str:
        code = self.process.wait() if self.process else None
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
            return f"worker died with {name}{hint}"
        log_path = self.settings.log_path
        return f"worker exited with code {code}" + (f"; see {log_path}" if log_path else "")

    def stop(self) -> None:
        """Kill the worker's process group if it is still running."""
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()


def _run_once(batch: list[Task], settings: WorkerSettings, on_row: Callable[[ResultRow], None],
              describe: Optional[Callable[[Task], None]]) -> list[Task]:
    """Run batch in one worker; returns the tasks left unrun if the worker crashed."""
    from bench.run.worker import base_row

    finished: set[int] = set()

    def record(index: int, row: ResultRow) -> None:
        finished.add(index)
        on_row(row)

    def started(index: int) -> None:
        if describe:
            describe(batch[index])

    try:
        WorkerGroup(batch, settings).run(record, started)
        return []
    except WorkerCrash as crash:
        index, reason = crash.args
        # A crash before the first task, or between a finished task and the next start,
        # blames the first task not yet finished.
        failed = index if index >= 0 and index not in finished else next(
            position for position in range(len(batch)) if position not in finished)
        row = base_row(batch[failed], settings)
        row.status, row.error = STATUS_ERROR, reason
        record(failed, row)
        return [task for position, task in enumerate(batch) if position not in finished]


def run_tasks(tasks: list[Task], settings: WorkerSettings, writer: ResultsWriter,
              progress: Optional[Callable[[ResultRow], None]] = None,
              describe: Optional[Callable[[Task], None]] = None) -> list[ResultRow]:
    """Run tasks grouped by worker; a crash turns its task into an error row and restarts.

    With settings.count_policy, each worker runs under callgrind and counts instructions
    instead of timing."""
    rows: list[ResultRow] = []

    def on_row(row: ResultRow) -> None:
        writer.write(row)  # flushed at once: a later crash cannot lose it
        rows.append(row)
        if progress:
            progress(row)

    groups: dict[tuple, list[Task]] = {}
    for task in worker_order(tasks):
        groups.setdefault(task.group(), []).append(task)
    for remaining in groups.values():
        while remaining:
            remaining = _run_once(remaining, settings, on_row, describe)
    return rows
