"""`run_bench.py analyze`: reuse-distance analysis of a workload's (or a file's) index trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench.commands.common import (OneLineParser, UsageError, check_writable_directory,
                                   non_negative_int, positive_int)
from bench.records import write_atomic
from workloads import reuse, traces
from workloads.resolve import WorkloadChoices, resolve_workloads
from workloads.generators import make_batch

DEFAULT_BATCHES = 16


def build_parser() -> OneLineParser:
    """Arguments of the analyze subcommand."""
    parser = OneLineParser(
        prog="run_bench.py analyze",
        description="LRU stack-distance histogram, miss-ratio curve, unique-row fraction and "
                    "fitted Zipf exponent of an embedding index trace.")
    parser.add_argument("--workload", default="kaggle",
                        help="preset, synthetic or criteo:PATH (as for the sweep)")
    parser.add_argument("--trace", help="analyse this trace file (.npy or .csv) instead")
    parser.add_argument("--table", type=non_negative_int,
                        help="only this table's accesses (default: every table, as one "
                             "address space in table-major order per batch)")
    parser.add_argument("--batches", type=positive_int, default=DEFAULT_BATCHES,
                        help=f"batches of the workload to trace (default {DEFAULT_BATCHES})")
    parser.add_argument("--batch-size", help="bags per batch (default: the workload's)")
    parser.add_argument("--max-rows", type=positive_int)
    parser.add_argument("--dist", help="index distribution for every table: uniform, zipf:ALPHA, "
                             "trace:PATH, hitrate:RATE@CAPACITY_ROWS or reuse:COLD_PROB,MEAN")
    parser.add_argument("--rows", type=positive_int, default=1_000_000)
    parser.add_argument("--dim", type=positive_int, default=64)
    parser.add_argument("--pooling", default="32")
    parser.add_argument("--num-tables", type=positive_int, default=8)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--row-bytes", type=positive_int, help="bytes per row (default: dim x 4)")
    parser.add_argument("--export-trace", metavar="PATH.npy",
                        help="also save the analysed trace (flat int64 row ids in access order)")
    parser.add_argument("--out", default="results/analysis", help="output directory")
    return parser


def workload_trace(workload, batches: int, seed: int, table: int | None) -> tuple[np.ndarray, list]:
    """The access trace of a workload's first batches and, per table, its own trace."""
    starts = np.concatenate(([0], np.cumsum([spec.rows for spec in workload.tables])[:-1]))
    combined, per_table = [], [[] for _ in workload.tables]
    for batch_index in range(batches):
        batch = make_batch(workload, seed, batch_index)
        for index, table_batch in enumerate(batch.tables):
            if table is not None and index != table:
                continue
            per_table[index].append(table_batch.indices)
            combined.append(table_batch.indices + starts[index])
    tables = [np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in per_table]
    return np.concatenate(combined).astype(np.int64), tables


def table_statistics(workload, tables: list[np.ndarray], row_bytes: int) -> pd.DataFrame:
    """Per-table accesses, unique-row fraction and fitted Zipf exponent."""
    records = []
    for index, trace in enumerate(tables):
        if trace.size == 0:
            continue
        records.append({
            "table": index, "rows": workload.tables[index].rows, "accesses": int(trace.size),
            "unique_rows": int(np.unique(trace).size),
            "unique_fraction": reuse.unique_fraction(trace),
            "zipf_alpha": (reuse.fit_zipf_alpha(trace, workload.tables[index].rows)
                           if np.unique(trace).size > 1 else float("nan")),
            "table_bytes": workload.tables[index].rows * row_bytes,
        })
    return pd.DataFrame.from_records(records)


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    write_atomic(path, frame.to_csv(index=False))


def main(argv: list[str]) -> int:
    """Analyse the trace and write mrc.csv, tables.csv and summary.json."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    check_writable_directory(out, f"--out {args.out}")
    if args.trace:
        trace = traces.load_trace(args.trace)
        row_bytes = args.row_bytes or args.dim * 4
        stats = pd.DataFrame()
    else:
        workload = resolve_workloads(WorkloadChoices(
            workloads=args.workload, max_rows=args.max_rows, dist=args.dist,
            batch_sizes=args.batch_size, rows=str(args.rows), dim=args.dim,
            pooling=args.pooling, num_tables=args.num_tables))[0]
        if args.table is not None and not args.table < len(workload.tables):
            raise UsageError(f"--table {args.table}: workload {workload.name} has tables "
                             f"0..{len(workload.tables) - 1}")
        row_bytes = args.row_bytes or workload.dim * 4
        trace, tables = workload_trace(workload, args.batches, args.seed, args.table)
        stats = table_statistics(workload, tables, row_bytes)
    out.mkdir(parents=True, exist_ok=True)
    curve = reuse.miss_ratio_curve(trace, row_bytes)
    _atomic_csv(curve[["cache_rows", "cache_bytes", "hit_rate"]], out / "mrc.csv")
    if not stats.empty:
        _atomic_csv(stats, out / "tables.csv")
    summary = reuse.summarize_trace(trace, row_bytes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.export_trace:
        traces.save_trace(args.export_trace, trace)
    print(json.dumps(summary, indent=2))
    if not stats.empty:
        print(stats.to_string(index=False, float_format=lambda value: f"{value:.4g}"))
    print(f"wrote {out / 'mrc.csv'}" + (f" and {args.export_trace}" if args.export_trace else ""))
    return 0
