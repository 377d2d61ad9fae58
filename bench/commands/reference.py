"""`run_bench.py reference`: the public DLRM reference (dlrm_s_pytorch.py) beside our impls."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import PROJECT_ROOT
from bench.commands.common import (MAX_MIN_RUN_TIME_S, MAX_TASK_TIMEOUT_S, OneLineParser,
                                   UsageError, build_report, choice_list, exit_code, names,
                                   new_run_directory, non_negative_int, positive_int,
                                   seconds_up_to)
from bench.commands.reference_run import (MODE_OPS, REFERENCE_IMPL, SCRIPT_NAME, check_workload,
                                          checkout_commit, reference_row)
from bench.commands.sweep import QUICK_POLICY
from bench.records import (ARGS_FILENAME, ENV_FILENAME, RESULTS_FILENAME, STATUS_ERROR, STATUS_OK,
                           ResultRow, ResultsWriter, read_json, read_rows, write_json)
from bench.run import devices
from bench.run.timing import TimingPolicy
from workloads.resolve import WorkloadChoices, resolve_workloads

DEFAULT_WORKLOADS = "kaggle"  # capped at 100,000 rows per table unless --max-rows: config A
DEFAULT_PRECISIONS = "fp32,bf16"
DEFAULT_ROUNDS = 2
DEFAULT_ITERATIONS = 20
DEFAULT_WARMUP = 5
DEFAULT_INFER_BATCHES = 8
DEFAULT_CHILD_TIMEOUT_S = 3600.0
ROUNDS_FOLDER = "rounds"


def build_parser() -> OneLineParser:
    """The reference command's arguments."""
    parser = OneLineParser(
        prog="run_bench.py reference",
        description="Time the public DLRM reference (facebookresearch/dlrm dlrm_s_pytorch.py) "
                    "on a workload's shapes, interleaved with our dlrm_train/dlrm_infer impls, "
                    "into one results.csv (impl dlrm_reference).")
    parser.add_argument("--dlrm-repo", required=True, metavar="PATH",
                        help="a checkout of facebookresearch/dlrm (holding dlrm_s_pytorch.py)")
    parser.add_argument("--workload", default=DEFAULT_WORKLOADS,
                        help=f"preset names (default {DEFAULT_WORKLOADS}, capped at 100,000 "
                             "rows per table unless --max-rows)")
    parser.add_argument("--max-rows", type=positive_int, help="cap every table at this many rows")
    parser.add_argument("--batch-size", type=positive_int,
                        help="override the workloads' batch size")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="threads, pinned (default 1)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda or cuda:N: both sides on that device (the "
                             "reference with its --use-gpu, seeing that GPU alone)")
    parser.add_argument("--mode", type=choice_list(*MODE_OPS), default="train",
                        help="train, infer or train,infer")
    parser.add_argument("--rounds", type=positive_int, default=DEFAULT_ROUNDS,
                        help="interleaved rounds: reference, ours, reference, ours, ...")
    parser.add_argument("--iterations", type=positive_int, default=DEFAULT_ITERATIONS,
                        help="reference training iterations timed per round")
    parser.add_argument("--warmup", type=non_negative_int, default=DEFAULT_WARMUP,
                        help="reference training iterations dropped first in each round")
    parser.add_argument("--infer-batches", type=positive_int, default=DEFAULT_INFER_BATCHES,
                        help="reference batches the inference timing cycles through")
    parser.add_argument("--impls", type=names,
                        help="our impls to run (default: every impl of the op)")
    parser.add_argument("--precision", type=names, default=DEFAULT_PRECISIONS,
                        help=f"our precisions (default {DEFAULT_PRECISIONS})")
    parser.add_argument("--min-run-time", type=seconds_up_to(MAX_MIN_RUN_TIME_S),
                        default=QUICK_POLICY.min_run_time_s,
                        help="seconds of timing per configuration of ours and per reference "
                             f"inference (at most {MAX_MIN_RUN_TIME_S:g})")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the reference (it imports scikit-learn and "
                             "tensorboard; default: this one)")
    parser.add_argument("--child-timeout", type=seconds_up_to(MAX_TASK_TIMEOUT_S),
                        default=DEFAULT_CHILD_TIMEOUT_S,
                        help="seconds before one reference run counts as hung")
    parser.add_argument("--out", default="results", help="output directory (default results/)")
    parser.add_argument("--run-id", help="name of the run directory (default: timestamp)")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    return parser


def _repository(text: str) -> Path:
    """The checkout of the reference, refused unless it holds its script."""
    repo = Path(text)
    if not repo.is_dir():
        raise UsageError(f"--dlrm-repo {text}: no such directory; give a checkout of "
                         "facebookresearch/dlrm")
    if not (repo / SCRIPT_NAME).is_file():
        raise UsageError(f"--dlrm-repo {text}: has no {SCRIPT_NAME}; give a checkout of "
                         "facebookresearch/dlrm")
    return repo.resolve()


def _check_threads(threads: int) -> None:
    """Refuse more threads than this process may run on (the parser checked the rest)."""
    available = len(os.sched_getaffinity(0))
    if threads > available:
        raise UsageError(f"--threads {threads}: this machine has {available} usable CPUs")


def timing_policy(min_run_time: float) -> TimingPolicy:
    """The policy our sweep builds for --min-run-time (bench.commands.sweep): one fingerprint."""
    return TimingPolicy(min_run_time_s=min_run_time, min_samples=QUICK_POLICY.min_samples,
                        max_run_time_s=max(QUICK_POLICY.max_run_time_s, min_run_time * 5))


def ours_argv(options, ops: list[str], rounds_dir: Path, run_id: str) -> list[str]:
    """The sweep arguments of one round of ours: the same workload, batch, threads, seed."""
    argv = ["--ops", ",".join(ops), "--workload", options.workload, "--threads",
            str(options.threads), "--precision", ",".join(options.precision), "--min-run-time",
            repr(options.min_run_time), "--seed", str(options.seed), "--out", str(rounds_dir),
            "--run-id", run_id, "--no-report"]
    if options.device != "cpu":
        argv += ["--device", options.device]
    if options.max_rows is not None:
        argv += ["--max-rows", str(options.max_rows)]
    if options.batch_size:
        argv += ["--batch-size", str(options.batch_size)]
    if options.impls:
        argv += ["--impls", ",".join(options.impls)]
    return argv


def run_ours(options, ops: list[str], rounds_dir: Path, run_id: str) -> Path:
    """One round of our impls through the normal sweep (a run_bench.py subprocess)."""
    command = [sys.executable, str(PROJECT_ROOT / "run_bench.py"),
               *ours_argv(options, ops, rounds_dir, run_id)]
    print(f"reference: {run_id}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    result = subprocess.run(command, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    directory = rounds_dir / run_id
    if result.returncode not in (0, 3) or not (directory / RESULTS_FILENAME).exists():
        raise UsageError(f"our sweep {run_id} failed (exit {result.returncode}); rerun it "
                         f"alone: python run_bench.py {' '.join(command[2:])}")
    return directory


def run_reference_round(workloads, modes, options, policy, repo: Path, commit: str,
                        directory: Path) -> list[ResultRow]:
    """One round of the reference: a row per workload and mode, into directory/results.csv."""
    rows = []
    with ResultsWriter(directory / RESULTS_FILENAME) as writer:
        for spec in workloads:
            for mode in modes:
                print(f"reference: {directory.name}: {REFERENCE_IMPL} {MODE_OPS[mode]} "
                      f"{spec.name}", file=sys.stderr, flush=True)
                row = reference_row(spec, mode, options, policy, directory.name, repo, commit)
                writer.write(row)
                rows.append(row)
    return rows


def merge_rounds(directory: Path, run_id: str, ours: list[Path], references: list[Path],
                 argv: list[str]) -> list[ResultRow]:
    """Pool each side's rounds per task key into directory/results.csv, env.json, args.json."""
    from reports.merge import MergeError, merge_runs

    rows = []
    for side in (references, ours):
        try:
            rows += merge_runs([read_rows(path / RESULTS_FILENAME) for path in side],
                               run_id=run_id)
        except MergeError as error:
            raise UsageError(f"cannot pool the rounds: {error}") from None
    with ResultsWriter(directory / RESULTS_FILENAME) as writer:
        for row in rows:
            writer.write(row)
    # Our first round's host record and op facts describe the whole run (one host, one tree).
    shutil.copyfile(ours[0] / ENV_FILENAME, directory / ENV_FILENAME)
    recorded = read_json(ours[0] / ARGS_FILENAME)
    write_json(directory / ARGS_FILENAME, {
        **recorded, "argv": argv, "run_id": run_id, "command": "reference",
        "rounds": [str(path.relative_to(directory.resolve())) for pair in zip(references, ours)
                   for path in pair]})
    return rows


def main(argv: list[str]) -> int:
    """Run the reference and ours interleaved; exit 0, 1 (all errored), 2 bad input, 3 some."""
    options = build_parser().parse_args(argv)
    repo = _repository(options.dlrm_repo)
    options.device = devices.normalize_device(options.device)  # DeviceError: exit 2
    _check_threads(options.threads)
    modes = options.mode
    workloads = resolve_workloads(WorkloadChoices(
        workloads=options.workload, max_rows=options.max_rows,
        batch_sizes=str(options.batch_size) if options.batch_size else None,
        quick_defaults=True))
    for spec in workloads:
        check_workload(spec)
    python = shutil.which(options.python) or options.python
    if not Path(python).is_file():
        raise UsageError(f"--python {options.python}: no such interpreter")
    options.python = python
    policy = timing_policy(options.min_run_time)
    directory, run_id = new_run_directory(options.out, options.run_id, label="reference",
                                          occupied=(RESULTS_FILENAME, ROUNDS_FOLDER))
    rounds_dir = (directory / ROUNDS_FOLDER).resolve()  # ours run from the project root
    rounds_dir.mkdir(parents=True, exist_ok=True)
    commit = checkout_commit(repo)
    ops = [MODE_OPS[mode] for mode in modes]
    ours, references = [], []
    for number in range(1, options.rounds + 1):
        # Interleaved, reference first: slow drift of the machine falls on both sides.
        reference_dir = rounds_dir / f"reference-{number}"
        reference_dir.mkdir(parents=True, exist_ok=True)
        run_reference_round(workloads, modes, options, policy, repo, commit, reference_dir)
        references.append(reference_dir)
        ours.append(run_ours(options, ops, rounds_dir, f"ours-{number}"))
    rows = merge_rounds(directory, run_id, ours, references, ["reference", *argv])
    for row in rows:
        if row.impl == REFERENCE_IMPL and row.status == STATUS_ERROR:
            print(f"error: {row.op}/{row.impl} {row.workload}: {row.error}", file=sys.stderr)
    measured = sum(row.status == STATUS_OK for row in rows)
    errors = sum(row.status == STATUS_ERROR for row in rows)
    print(f"{measured} measured, {errors} errors ({options.rounds} interleaved rounds) -> "
          f"{directory / RESULTS_FILENAME}")
    if not options.no_report:
        build_report(directory)
    return exit_code(measured, errors)

