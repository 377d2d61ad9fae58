"""`run_bench.py locality`: predicted LLC hit rates of locality-controlled traces vs sls speed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench import PROJECT_ROOT
from bench.commands.common import (OneLineParser, UsageError, check_writable_directory,
                                   new_run_directory, non_negative_int, positive_float,
                                   positive_int)
from bench.records import STATUS_OK, SchemaError, read_recorded_argv, read_rows, write_atomic
from bench.run import devices
from workloads import reuse
from workloads.generators import make_table_batch
from workloads.presets import synthetic
from workloads.resolve import resolve_workloads, split
from workloads.specs import IndexDistribution, PoolingDistribution

DEFAULT_LEVELS = "0,0.25,0.5,0.75,0.9,0.99"
DEFAULT_LLC_BYTES = 64 << 20
DEFAULT_ROWS = 20_000_000
DEFAULT_DIM = 64
# 2048 bags x 256 lookups x 256-byte rows = 128 MiB per call, twice the default LLC: one call
# alone overflows the cache, and the timing loop cycles through distinct batches besides.
DEFAULT_POOLING = "256"
FP32_BYTES = 4
# run_bench.py's --dist takes one distribution, so each level is its own sweep (each pays the
# start-up: imports, host facts, a worker).
DIST_LIST_SEPARATOR = ";"
LOCALITY_COLUMNS = ["level", "distribution", "capacity_rows", "predicted_hit_rate_llc",
                    "steady_hit_rate_llc", "lookups", "distinct_rows", "gbps", "median_s",
                    "samples_per_s", "iqr_s", "status", "run_dir"]
TT_COLUMNS = ["workload", "impl", "precision", "rows", "distribution", "cache_rows",
              "observed_hit_rate", "predicted_lfu_hit_rate", "predicted_lru_hit_rate"]


def build_parser() -> OneLineParser:
    """Arguments of the locality subcommand."""
    parser = OneLineParser(
        prog="run_bench.py locality",
        description="For each locality level: generate the sls index trace, predict its LRU hit "
                    "rate at the LLC, measure sls on it, and write locality.csv/locality.png.")
    parser.add_argument("--levels", type=split, default=DEFAULT_LEVELS,
                        help=f"hitrate targets at the LLC capacity (default {DEFAULT_LEVELS}); "
                             "empty for none")
    parser.add_argument("--dist", action="append", default=[],
                        help="also measure this distribution (repeatable), e.g. reuse:0.1,1000 "
                             "or zipf:1.05")
    parser.add_argument("--llc-bytes", type=positive_int, default=DEFAULT_LLC_BYTES,
                        help=f"effective last-level cache in bytes (default {DEFAULT_LLC_BYTES})")
    parser.add_argument("--rows", type=positive_int, default=DEFAULT_ROWS,
                        help="rows of the sls table")
    parser.add_argument("--dim", type=positive_int, default=DEFAULT_DIM,
                        help="embedding dim (fp32)")
    parser.add_argument("--pooling", default=DEFAULT_POOLING,
                        help=f"lookups per bag (default {DEFAULT_POOLING})")
    parser.add_argument("--batch-size", type=positive_int,
                        help="bags per call (default: the workload's)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--min-run-time", type=positive_float, help="passed to run_bench.py")
    parser.add_argument("--tt-run", type=Path, metavar="RUN_DIR",
                        help="instead: compare the tt_sls cache hit rates of this run with the "
                             "static-LFU and LRU predictions; writes tt_cache.csv")
    parser.add_argument("--out", type=Path, default=Path("results/locality"),
                        help="output directory (default results/locality)")
    return parser


def level_distributions(args, capacity_rows: int) -> list[tuple[str, IndexDistribution]]:
    """(level name, distribution) for every --levels target and --dist entry."""
    levels = []
    for text in args.levels:
        try:
            target = float(text)
        except ValueError:
            raise UsageError(f"--levels {text!r}: give hit rates in [0, 1], e.g. 0.5") from None
        levels.append((text, IndexDistribution("hitrate", target_hit_rate=target,
                                               capacity_rows=capacity_rows)))
    for text in args.dist:
        distribution = IndexDistribution.parse(text)
        if distribution.kind == "trace":
            # The sweep's worker must find the file wherever it runs: an absolute path.
            distribution = dataclasses.replace(distribution,
                                               path=str(Path(distribution.path).resolve()))
        levels.append((text, distribution))
    if not levels:
        raise UsageError("nothing to measure: give --levels and/or --dist")
    return levels


def capacity_in_rows(args) -> int:
    """The LLC in fp32 rows, checked to leave part of the table outside it."""
    row_bytes = args.dim * FP32_BYTES
    capacity = args.llc_bytes // row_bytes
    if capacity < 1:
        raise UsageError(f"--llc-bytes {args.llc_bytes} holds no {row_bytes}-byte row")
    if capacity >= args.rows:
        raise UsageError(f"--llc-bytes {args.llc_bytes} holds all {args.rows} rows of "
                            f"{row_bytes} bytes: raise --rows or lower --llc-bytes")
    return capacity


def predict(workload, seed: int, capacity_rows: int) -> dict:
    """Predicted LRU hit rates of one batch of the sls op's index distribution."""
    # The sls op cycles through distinct batches of its largest table (rotation_count in
    # bench/ops/common.py), drawn as one stream; this is one batch-sized trace of the same
    # distribution, which stands for each of them. steady_hit_rate_llc is what replaying this
    # one batch would give, not the state of the rotating loop.
    table_index = workload.largest_table()
    indices = make_table_batch(workload, table_index, seed).indices
    return {
        "predicted_hit_rate_llc": float(reuse.hit_rate_curve(indices, [capacity_rows])[0]),
        "steady_hit_rate_llc": reuse.steady_state_hit_rate(indices, capacity_rows),
        "lookups": int(indices.size),
        "distinct_rows": int(np.unique(indices).size),
    }


def sweep_command(args, distributions: list[IndexDistribution], runs_dir: Path,
                  run_id: str) -> list:
    """The run_bench.py command line measuring sls (fp32, sum) on the given distributions."""
    labels = DIST_LIST_SEPARATOR.join(distribution.label() for distribution in distributions)
    command = [sys.executable, str(PROJECT_ROOT / "run_bench.py"), "--workload", "synthetic",
               "--rows", str(args.rows), "--dim", str(args.dim), "--pooling", args.pooling,
               "--num-tables", "1", "--dist", labels, "--ops", "sls", "--sls-modes", "sum",
               "--precision", "fp32", "--threads", str(args.threads), "--seed", str(args.seed),
               "--out", str(runs_dir), "--run-id", run_id, "--no-report"]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if args.min_run_time:
        command += ["--min-run-time", str(args.min_run_time)]
    return command


def measure(command: list, run_dir: Path, labels: list[str]) -> dict[str, dict]:
    """Run one sweep; per distribution label, its sls row's speed or why there is none."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # This checkout must win over an installed copy of another one.
    environment = devices.with_import_root(dict(os.environ), PROJECT_ROOT)
    log_path = run_dir.with_suffix(".log")
    with open(log_path, "wb") as log:
        code = subprocess.run(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    try:
        rows = [row for row in read_rows(run_dir / "results.csv") if row.op == "sls"]
    except SchemaError:
        rows = []
    results = {}
    for label in labels:
        mine = [row for row in rows
                if json.loads(row.params or "{}").get("distribution") == label]
        measured = [row for row in mine if row.status == STATUS_OK]
        if not measured:
            reason = mine[-1].error if mine else f"run_bench.py exit {code}, see {log_path}"
            results[label] = {"status": f"failed: {reason}", "run_dir": str(run_dir)}
            continue
        row = measured[-1]
        results[label] = {"gbps": row.gbps, "median_s": row.median_s,
                          "samples_per_s": row.samples_per_s, "iqr_s": row.iqr_s,
                          "status": STATUS_OK, "run_dir": str(run_dir)}
    return results


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically: readers never see half a file."""
    write_atomic(path, frame.to_csv(index=False))


def write_figure(table: pd.DataFrame, path: Path) -> bool:
    """Draw locality.png; False (and a message) when nothing was measured."""
    from reports import canvas, plots

    try:
        figure = plots.locality_figure(table)
    except plots.NoData as reason:
        print(f"locality: no figure: {reason}", file=sys.stderr)
        return False
    write_atomic(path, canvas.figure_to_png(figure))
    return True


def run_study(args) -> pd.DataFrame:
    """Predict and measure every level; returns the locality table."""
    capacity = capacity_in_rows(args)
    levels = level_distributions(args, capacity)
    pooling = PoolingDistribution.parse(args.pooling)
    records = []
    for level, distribution in levels:
        workload = synthetic(args.rows, args.dim, pooling, 1, distribution)
        workload = workload.with_batch_size(args.batch_size)
        record = {"level": level, "distribution": distribution.label(),
                  "capacity_rows": capacity, **predict(workload, args.seed, capacity)}
        print(f"locality: {distribution.label()}: predicted LLC hit rate "
              f"{record['predicted_hit_rate_llc']:.3f} (one batch replayed: "
              f"{record['steady_hit_rate_llc']:.3f})", file=sys.stderr, flush=True)
        records.append(record)
    # A fresh folder per study: run_bench.py appends to an existing run directory.
    runs_dir, _ = new_run_directory((args.out / "runs").resolve(), None)
    distributions = [distribution for _, distribution in levels]
    batches = [([distribution], f"level-{index:02d}")
               for index, distribution in enumerate(distributions)]
    measured = {}
    for batch, run_id in batches:
        print(f"locality: measuring {run_id} into {runs_dir / run_id}", file=sys.stderr,
              flush=True)
        labels = [distribution.label() for distribution in batch]
        measured.update(measure(sweep_command(args, batch, runs_dir, run_id),
                                runs_dir / run_id, labels))
    for record in records:
        record.update(measured[record["distribution"]])
    return pd.DataFrame(records).reindex(columns=LOCALITY_COLUMNS)


def _lru_hit_rate_after(warmup: np.ndarray, evaluation: np.ndarray, capacity_rows: int) -> float:
    """LRU hit rate on evaluation of a cache that first saw the warm-up accesses."""
    distances = reuse.stack_distances(np.concatenate([warmup, evaluation]))[warmup.size:]
    hits = (distances != reuse.COLD) & (distances < capacity_rows)
    return float(np.count_nonzero(hits) / evaluation.size)


def tt_cache_comparison(run_dir: Path) -> pd.DataFrame:
    """Observed tt_sls cache hit rates of a run beside static-LFU and LRU predictions."""
    from bench.commands.sweep import parse_sweep, workload_choices
    from bench.ops.ttrec import DEFAULT_CACHE_FRACTION, WARM_UP_BATCHES

    run_dir = Path(run_dir)
    try:
        argv = read_recorded_argv(run_dir)
    except SchemaError:
        raise UsageError(f"--tt-run {run_dir}: no readable args.json (a run_bench.py run "
                            "directory is needed to regenerate its traces)") from None
    args = parse_sweep(argv)
    workloads = resolve_workloads(workload_choices(args))
    records = []
    for row in read_rows(run_dir / "results.csv"):
        metrics = json.loads(row.metrics or "{}")
        if row.op != "tt_sls" or row.status != STATUS_OK or "hit_rate" not in metrics:
            continue
        if row.impl != "tt_cached":
            continue  # only the LFU-cached impl has a cache to predict
        params = json.loads(row.params or "{}")
        matches = [spec for spec in workloads
                   if spec.name == row.workload and spec.batch_size == row.batch_size
                   and spec.tables[spec.largest_table()].rows == params.get("rows")
                   and spec.tables[spec.largest_table()].distribution.label()
                   == params.get("distribution")]
        if not matches:
            continue
        spec = matches[0]
        table_index = spec.largest_table()
        rows = spec.tables[table_index].rows
        capacity = min(round(DEFAULT_CACHE_FRACTION * rows), rows)
        # The op warms its cache on batches 1..WARM_UP_BATCHES, then looks up its rotating
        # batches (one stream from batch 0); batch 0 at the workload's batch size is one
        # batch of that distribution, standing for them.
        warmup = np.concatenate([make_table_batch(spec, table_index, args.seed, batch).indices
                                 for batch in range(1, WARM_UP_BATCHES + 1)])
        evaluation = make_table_batch(spec, table_index, args.seed).indices
        records.append({
            "workload": row.workload, "impl": row.impl, "precision": row.precision,
            "rows": rows, "distribution": params.get("distribution", ""),
            "cache_rows": capacity, "observed_hit_rate": float(metrics["hit_rate"]),
            "predicted_lfu_hit_rate": reuse.predict_lfu_hit_rate(warmup, evaluation, capacity),
            "predicted_lru_hit_rate": _lru_hit_rate_after(warmup, evaluation, capacity),
        })
    return pd.DataFrame(records, columns=TT_COLUMNS)


def main(argv: list[str]) -> int:
    """Run the locality study (or the TT cache comparison) and write its outputs."""
    args = build_parser().parse_args(argv)
    if args.tt_run is not None:
        table = tt_cache_comparison(args.tt_run)
        check_writable_directory(args.out, f"--out {args.out}")
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(table, args.out / "tt_cache.csv")
        print(table.to_string(index=False) if not table.empty
              else "no tt_sls tt_cached rows with a hit rate in that run")
        print(f"wrote {args.out / 'tt_cache.csv'}")
        return 0
    if args.rows < 2:
        raise UsageError(f"--rows {args.rows}: give at least 2 rows")
    table = run_study(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(table, args.out / "locality.csv")
    drawn = write_figure(table, args.out / "locality.png")
    print(table.drop(columns=["run_dir"]).to_string(
        index=False, float_format=lambda value: f"{value:.4g}"))
    print(f"wrote {args.out / 'locality.csv'}" + (" and locality.png" if drawn else ""))
    failed = int((table["status"] != STATUS_OK).sum())
    return 1 if failed else 0
