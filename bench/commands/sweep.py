"""The `run_bench.py` command line: parse choices, plan tasks, run workers, write results."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.run import devices
from bench import registry
from bench.commands import SUBCOMMANDS
from bench.commands.common import (EXIT_ALL_ERRORED, EXIT_INTERRUPTED, EXIT_OK,
                                   EXIT_SOME_ERRORED, EXIT_USAGE, MAX_MIN_RUN_TIME_S,
                                   MAX_TASK_TIMEOUT_S, OneLineParser, UsageError, build_report,
                                   check_writable_directory, exit_code, names,
                                   new_run_directory, non_negative_int, positive_int,
                                   seconds_up_to, whole_numbers)
from bench.records import (RESULTS_FILENAME, STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, SchemaError,
                           read_recorded_argv, read_rows)
from bench.run.timing import TimingPolicy
from reports.phases import timing_share_line
from reports.summary import render_summary
from workloads.resolve import DEFAULT_WORKLOADS, WorkloadChoices, resolve_workloads

# The exit codes (bench/commands/common.py) as the --help epilog gives them; `check` reports
# a run's error rows as NEWLY_FAILING.
EXIT_CODES_HELP = (f"exit status: {EXIT_OK} every configuration measured or skipped; "
                   f"{EXIT_ALL_ERRORED} every configuration that ran errored (nothing measured); "
                   f"{EXIT_USAGE} bad input, refused before any work; {EXIT_SOME_ERRORED} some "
                   "configurations errored (an error row is a kernel that crashed or failed its "
                   "float64 check; the other rows, the summary and the report are still "
                   f"written); {EXIT_INTERRUPTED} interrupted by Ctrl-C or SIGTERM (the workers "
                   "are ended; finish with --resume)")
QUICK_PRECISIONS = "fp32,bf16,int8"
FULL_PRECISIONS = ",".join(registry.PRECISIONS)
# Upper bounds of the time flags: beyond them a value is a typo (1e9 s is 31 years of timing
# one configuration), not a plan, and is refused before any work.
QUICK_POLICY = TimingPolicy(min_run_time_s=0.2, min_samples=10, max_run_time_s=5.0)
FULL_POLICY = TimingPolicy(min_run_time_s=1.0, min_samples=20, max_run_time_s=30.0)


def build_parser() -> argparse.ArgumentParser:
    """The sweep's arguments."""
    parser = OneLineParser(
        prog="run_bench.py",
        description="Measure DLRM operators. Comma-separated values sweep. Subcommands "
                    "(each with -h): " + "; ".join(f"{name}: {what}" for name, (_, what)
                                                   in SUBCOMMANDS.items()) + ".",
        epilog=EXIT_CODES_HELP)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="the default: smoke + kaggle (capped), fp32/bf16/int8, every op, "
                           "short timing")
    mode.add_argument("--full", action="store_true",
                      help="every precision, longer timing, workloads as given")
    parser.add_argument("--list", action="store_true",
                        help="list ops, impls, workloads, precisions, devices and ISA levels")
    parser.add_argument("--ops", type=names, help="ops to run (default: all)")
    parser.add_argument("--impls", type=names, help="only these impl names")
    parser.add_argument("--workload", help=f"preset names, synthetic, or criteo:PATH "
                                           f"(default: {DEFAULT_WORKLOADS})")
    parser.add_argument("--precision", type=names, help="fp32,fp16,bf16,int8,int4")
    parser.add_argument("--device", type=names, default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--isa", type=names,
                        help="ISA levels for CPU runs (see --list; default native; the default "
                             "sweep also runs FC and SLS at avx2, avx512, amx)")
    parser.add_argument("--threads", type=whole_numbers, default="1",
                        help="thread counts, e.g. 1,2")
    parser.add_argument("--batch-size", help="override the workloads' batch size(s) (default: "
                                             "each preset's; on --device cuda, kaggle 65,536 "
                                             "and mlperf 55,296)")
    parser.add_argument("--max-rows", type=int, help="cap every table at this many rows")
    parser.add_argument("--dist", help="index distribution for every table: uniform, zipf:ALPHA, "
                                       "trace:PATH, hitrate:RATE@CAPACITY_ROWS or "
                                       "reuse:COLD_PROB,MEAN_DISTANCE")
    parser.add_argument("--rows", default="1000000",
                        help="synthetic: rows per table; a list sweeps the table footprint "
                             "(a working-set sweep), e.g. 1000,100000,10000000")
    parser.add_argument("--dim", type=int, default=64, help="synthetic: embedding dim")
    parser.add_argument("--pooling", default="32",
                        help="synthetic: lookups per bag: N or uniform|normal|lognormal:MEAN,SD")
    parser.add_argument("--num-tables", type=int, default=8, help="synthetic: number of tables")
    parser.add_argument("--sls-modes", type=names, help="sum,mean,weighted (default: all)")
    parser.add_argument("--fc-layers", type=names, help="linear,bottom_mlp,top_mlp (default: all)")
    parser.add_argument("--membw-sizes", type=whole_numbers,
                        help="bandwidth probe buffer sizes in bytes")
    parser.add_argument("--tt-tables", type=non_negative_int, default=0,
                        help="TT-Rec: compress the K largest tables in dlrm_infer/dlrm_train")
    parser.add_argument("--tt-rank", type=whole_numbers,
                        help="TT-Rec ranks to sweep (tt_sls and TT models), e.g. 8,16")
    parser.add_argument("--compile-mode", type=names,
                        help="torch.compile modes of the compiled impls, e.g. "
                             "default,max-autotune,reduce-overhead (default: default); each "
                             "mode is its own row, its compile time in metrics compile_s")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--min-run-time", type=seconds_up_to(MAX_MIN_RUN_TIME_S),
                        help="seconds of timing per configuration (at most "
                             f"{MAX_MIN_RUN_TIME_S:g}; keep it below --task-timeout)")
    parser.add_argument("--calls-per-rep", type=positive_int, default=1, metavar="N",
                        help="call each timed closure N times back to back per repetition "
                             "(default 1). For validating the regression checker: a run at N=5 "
                             "does exactly 25%% more work per row than one at N=4, with the same "
                             "task keys and code versions. Times are per repetition; "
                             "samples/s, GB/s and GFLOP/s count all N calls")
    parser.add_argument("--replicates", type=positive_int, default=1, metavar="K",
                        help="measure every configuration in K fresh worker processes, "
                             "interleaved (replicate 1 of every group, then replicate 2, ...); "
                             "rows carry metrics replicate k. `check` then tests a change across "
                             "processes, not only across one process's samples: a process's "
                             "shift is shared by all its samples. 5 found 98%% of a 25%% change "
                             "(3: 92%%; docs/regression-checks.md); default 1")
    parser.add_argument("--metric", choices=("time", "instructions"), default="time",
                        help="what each configuration records: time (wall clock, the default) "
                             "or instructions (per call, counted by Valgrind's callgrind in one "
                             "worker started under it; CPU only; needs valgrind; under Valgrind "
                             "the CPU shows no AVX-512/AMX, so libraries take their AVX2 paths "
                             "and isa_effective says so). Counts barely move with machine load, "
                             "so they can gate CI where times cannot")
    parser.add_argument("--cache-sim", action="store_true",
                        help="--metric instructions: also callgrind's SIMULATED D1 and "
                             "last-level data-cache misses per call (slower; these machines "
                             "have no hardware counters)")
    parser.add_argument("--task-timeout", type=seconds_up_to(MAX_TASK_TIMEOUT_S), default=900.0,
                        help="seconds before a hung configuration becomes an error row "
                             f"(at most {MAX_TASK_TIMEOUT_S:g})")
    parser.add_argument("--out", default="results", help="output directory (default: results/)")
    parser.add_argument("--run-id", help="name of the run directory (default: timestamp)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="finish an interrupted run: re-read its arguments, run the rest")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    return parser


def _choose(values: list[str], valid, what: str) -> list[str]:
    """Validate each value against the valid choices."""
    valid = list(valid)
    for value in values:
        if value not in valid:
            raise UsageError(f"unknown {what} {value!r}; choose from {', '.join(valid)}")
    return values


def workload_choices(args) -> WorkloadChoices:
    """The sweep's workload flags as WorkloadChoices."""
    return WorkloadChoices(workloads=args.workload or DEFAULT_WORKLOADS, max_rows=args.max_rows,
                           dist=args.dist, batch_sizes=args.batch_size, rows=str(args.rows),
                           dim=args.dim, pooling=args.pooling, num_tables=args.num_tables,
                           quick_defaults=args.quick_defaults, devices=tuple(args.device))


def list_choices() -> str:
    """Text for --list."""
    from workloads import presets

    lines = ["ops and impls (* = baseline; [the precisions each impl runs, skipped only where "
             "this machine or device lacks the kernel]):"]
    for name, op in registry.ops().items():
        impl_names = [f"{entry.name}{'*' if entry.baseline else ''} [{','.join(entry.precisions)}]"
                      for entry in registry.impls(name).values()]
        lines.append(f"  {name:12s} {op.description}")
        lines.append(f"  {'':12s}   impls: {'; '.join(impl_names)}")
    lines.append("workloads:")
    for name, factory in presets.PRESETS.items():
        spec = factory()
        lines.append(f"  {name:14s} {spec.description}  [{spec.source}]")
    lines.append("  synthetic      --rows --dim --pooling --num-tables")
    lines.append("index distributions (--dist): uniform, zipf:ALPHA, trace:PATH, "
                 "hitrate:RATE@CAPACITY_ROWS, reuse:COLD_PROB,MEAN_DISTANCE")
    lines.append("  criteo:PATH    a Criteo TSV file (label, 13 dense, 26 categorical)")
    lines.append(f"precisions: {', '.join(registry.PRECISIONS)} (a precision an impl does not "
                 "list is left out of the plan, or a skipped row when both are named)")
    lines.append(f"devices here: {', '.join(devices.available_devices())}")
    lines.append(f"ISA levels here: {', '.join(devices.available_isa_levels())} "
                 f"(all known: {', '.join(devices.ISA_LEVELS)})")
    return "\n".join(lines)


def _options(args) -> dict:
    options = {}
    from bench.ops.fc import FC_LAYERS
    from bench.ops.sls import SLS_MODES

    if args.sls_modes:
        options["sls_modes"] = _choose(args.sls_modes, SLS_MODES, "--sls-modes value")
    if args.fc_layers:
        options["fc_layers"] = _choose(args.fc_layers, FC_LAYERS, "--fc-layers value")
    if args.tt_tables:
        options["tt_tables"] = args.tt_tables
    if args.tt_rank:
        options["tt_ranks"] = args.tt_rank
    if args.membw_sizes:
        options["membw_sizes"] = args.membw_sizes
    if args.compile_mode:
        from bench.ops.dlrm_compiled import COMPILE_MODES

        options["compile_modes"] = _choose(args.compile_mode, COMPILE_MODES,
                                           "--compile-mode value")
    if args.calls_per_rep != 1:
        options["calls_per_rep"] = args.calls_per_rep
    if args.metric != "time":
        options["metric"] = args.metric  # builders refuse what cannot run under Valgrind
    return options


def _recorded_argv(directory: Path) -> list[str]:
    """The sweep arguments a run directory recorded (for --resume)."""
    try:
        return read_recorded_argv(directory)
    except SchemaError:
        raise UsageError(f"--resume {directory}: no readable args.json there; give a run "
                         "directory written by run_bench.py") from None


def _run_directory(args, argv: list[str]) -> tuple[Path, str, bool]:
    """The run directory, its id, and whether this resumes an existing run."""
    if args.resume:
        directory = Path(args.resume)
        check_writable_directory(directory, f"--resume {directory}")
        return directory, directory.name, True
    # Not created here: execute() creates it, and removes it again if the start fails.
    directory, run_id = new_run_directory(
        args.out, args.run_id, create=False,
        hint="finish it with --resume {directory} or choose another --run-id")
    return directory, run_id, False


def parse_sweep(argv: list[str]):
    """The sweep arguments; quick_defaults marks a run without --full."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quick_defaults = not args.full
    return args


# The default sweep also shows what each SIMD level buys, on the two ops where it matters most
# (FC: MKL/oneDNN width and AMX; SLS: FBGEMM width), without multiplying the whole sweep.
ISA_COMPARISON_LEVELS = ("avx2", "avx512", "amx")
ISA_COMPARISON_OPTIONS = {"fc_layers": ["linear"], "sls_modes": ["sum"]}


def _is_default_sweep(args) -> bool:
    """True when the user chose nothing that the ISA comparison would contradict."""
    return (args.quick_defaults and args.metric == "time" and not args.isa and not args.ops
            and not args.impls and not args.workload and args.device == ["cpu"]
            and args.threads == [1])


def _isa_comparison(workloads, seed: int, left_out) -> list:
    """FC and SLS on the largest default workload at each available capped ISA level."""
    from bench.run import sweep as sweeping

    levels = [level for level in ISA_COMPARISON_LEVELS
              if level in devices.available_isa_levels()]
    workload = max(workloads, key=lambda spec: spec.total_rows)
    return sweeping.plan(["fc", "sls"], [workload], ["fp32", "bf16"], ["cpu"], levels, [1], seed,
                         dict(ISA_COMPARISON_OPTIONS), named=sweeping.Named(), left_out=left_out)


def sweep(argv: list[str]) -> int:
    """The default command: run a sweep and write its results."""
    from bench.run import sweep as sweeping

    args = parse_sweep(argv)
    if args.list:
        print(list_choices())
        return 0
    if args.resume:
        resume_dir = args.resume
        argv = _recorded_argv(Path(resume_dir))
        args = parse_sweep(argv)
        args.resume = resume_dir
    ops = _choose(args.ops if args.ops else
                  [name for name, op in registry.ops().items() if op.default],
                  registry.ops(), "op")
    precisions = _choose(args.precision or (FULL_PRECISIONS if args.full
                                            else QUICK_PRECISIONS).split(","),
                         registry.PRECISIONS, "precision")
    device_list = [devices.normalize_device(name) for name in args.device]
    isa_levels = args.isa or ["native"]
    for level in isa_levels:
        devices.check_isa(level)
    thread_counts = args.threads
    available_cpus = len(os.sched_getaffinity(0))
    for count in thread_counts:
        if not 1 <= count <= available_cpus:
            raise UsageError(f"--threads {count}: this machine has {available_cpus} usable CPUs")
    impl_filter = set(args.impls) if args.impls else None
    workloads = resolve_workloads(workload_choices(args))
    budgets = {device: sweeping.MemoryBudget(device, tuple(sweeping.memories(
        devices.available_memory_bytes(), device, sweeping.device_memory_bytes(device))))
        for device in device_list}
    for budget in budgets.values():
        budget.check(workloads, ops, impl_filter)
    # What the user named decides which configurations that cannot run are skip rows and which
    # are left out of the plan (sweeping.Named).
    named = sweeping.Named(frozenset(args.ops or ()), frozenset(args.impls or ()),
                           frozenset(args.precision or ()))
    left_out = sweeping.LeftOut()
    planned = sweeping.plan(ops, workloads, precisions, device_list, isa_levels, thread_counts,
                            args.seed, _options(args), impl_filter, named, left_out, budgets)
    if not planned:
        why = "; ".join(f"{record['reason']} ({', '.join(record['impls'])})"
                        for record in left_out.records()[:3])
        raise UsageError("nothing to run: the chosen ops/impls/precisions match no configuration"
                         + (f" that can run here: {why}" if why else ""))
    if _is_default_sweep(args):
        planned += _isa_comparison(workloads, args.seed, left_out)
    for spec in workloads:
        if spec.capped_tables():
            print(f"note: workload {spec.name}: {spec.capped_tables()} of {len(spec.tables)} "
                  f"tables capped at {max(t.rows for t in spec.tables):,} rows (--max-rows)",
                  file=sys.stderr)
    policy = QUICK_POLICY if not args.full else FULL_POLICY
    if args.min_run_time:
        policy = TimingPolicy(min_run_time_s=args.min_run_time, min_samples=policy.min_samples,
                              max_run_time_s=max(policy.max_run_time_s, args.min_run_time * 5))
    count_policy, counting = _counting(args, device_list)
    directory, run_id, resuming = _run_directory(args, argv)
    from bench.run.execute import RunDirectoryError, execute

    try:
        code = execute(argv, planned, directory, run_id, resuming, policy, args.task_timeout,
                       count_policy, counting, replicates=args.replicates,
                       left_out=left_out)
    except RunDirectoryError as error:
        raise UsageError(str(error)) from None
    if code != 0:
        return code
    results_path = directory / RESULTS_FILENAME
    rows = read_rows(results_path)
    if args.replicates > 1:  # one summary line per configuration, its replicates pooled
        from reports.spread import pool_replicates

        rows = getattr(pool_replicates(rows), "rows", rows)
    print(render_summary(rows))
    counts = {status: sum(row.status == status for row in rows)
              for status in (STATUS_OK, STATUS_SKIPPED, STATUS_ERROR)}
    print(f"\n{counts[STATUS_OK]} measured, {counts[STATUS_SKIPPED]} skipped, "
          f"{counts[STATUS_ERROR]} errors -> {results_path}")
    share = timing_share_line(rows)
    if share:
        print(share)
    if not args.no_report:
        build_report(directory)
    code = exit_code(counts[STATUS_OK], counts[STATUS_ERROR])
    if code == EXIT_ALL_ERRORED:
        print(f"error: every configuration that ran failed; nothing was measured (see the "
              f"error column of {results_path})", file=sys.stderr)
    elif code == EXIT_SOME_ERRORED:
        print(f"warning: {counts[STATUS_ERROR]} configurations failed (exit "
              f"{EXIT_SOME_ERRORED}); see the error column of {results_path}", file=sys.stderr)
    return code


def _counting(args, device_list: list[str]):
    """--metric instructions: the CountPolicy and its fingerprint facts; (None, None) for time."""
    if args.metric != "instructions":
        if args.cache_sim:
            raise UsageError("--cache-sim needs --metric instructions (callgrind simulates the "
                             "caches while it counts)")
        return None, None
    from bench.run import callgrind

    not_cpu = [device for device in device_list if device != "cpu"]
    if not_cpu:
        raise UsageError(f"--metric instructions counts CPU code under Valgrind; drop --device "
                         f"{','.join(not_cpu)} (GPU kernels are timed with --metric time)")
    try:
        version = callgrind.require_valgrind()
    except callgrind.CallgrindError as error:
        raise UsageError(str(error)) from None
    policy = callgrind.CountPolicy(cache_sim=args.cache_sim)
    return policy, callgrind.counting_facts(policy, version)


def main(argv: list[str]) -> int:
    """The default command: run a sweep and write its results."""
    return sweep(argv)
