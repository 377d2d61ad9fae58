"""`run_bench.py serve`: DLRM inference under MLPerf LoadGen (SingleStream, Server, Offline),
with query-size distributions, dynamic batching, co-located pinned workers and an SLA search."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

from bench import registry
from bench.commands.common import (EXIT_ALL_ERRORED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_ERRORED,
                                   OneLineParser, UsageError, build_report, choice_list, names,
                                   new_run_directory, non_negative_floats, positive_floats,
                                   positive_int, whole_numbers)
from bench.faults import PlantedFault
from bench.records import (STATUS_ERROR, STATUS_OK, ResultRow, ResultsWriter, dumps_compact,
                           utc_timestamp, write_atomic, write_json)
from bench.serve.batching import BatchPolicy
from bench.serve.queries import QUERY_SIZE_HELP, QuerySizeError, parse_query_sizes, query_table
from bench.serve.search import Probe, search_max_qps
from bench.serve.sut import SCENARIOS, LoadGenMissing, RunSettings, loadgen
from workloads.resolve import WorkloadChoices, resolve_workloads

DEFAULT_SLA_MS = 100.0  # the bound Server runs at a given --qps are judged by without --sla-ms
CAPACITY_QUERIES = 256  # queries of the Offline run that sets the search's QPS ceiling
# The search ceiling over the Offline capacity: a short Offline run can understate what the
# workers sustain, and the bisection should be able to find an edge just above it.
CEILING_FACTOR = 1.25


def build_parser() -> argparse.ArgumentParser:
    """The serve subcommand's arguments."""
    parser = OneLineParser(
        prog="run_bench.py serve",
        description="Serve dlrm_infer under MLPerf LoadGen. Comma-separated values sweep.",
        epilog="exit status: 0 every run finished; 1 every run errored; 2 bad input, refused "
               "before any work; 3 some runs errored (a worker crash or a failed float64 "
               "check is an error row; the other rows are kept)")
    parser.add_argument("--scenario", default="server", choices=SCENARIOS)
    parser.add_argument("--workload", default="kaggle", help="one preset (default kaggle)")
    parser.add_argument("--max-rows", type=positive_int, help="cap every table at this many rows")
    parser.add_argument("--impl", default="per_table", help="a dlrm_infer impl (see --list)")
    parser.add_argument("--precision", type=names, default="fp32",
                        help="precisions, e.g. fp32,bf16")
    parser.add_argument("--workers", type=whole_numbers, default="1",
                        help="co-located workers, e.g. 1,2")
    parser.add_argument("--threads", type=int, default=1, help="threads (cores) per worker")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda or cuda:N: on cuda each worker serves on its "
                             "own GPU (worker i on GPU N+i), batching there; LoadGen stays in "
                             "this process")
    parser.add_argument("--batching", type=choice_list("off", "on"), default="off",
                        help="off,on")
    parser.add_argument("--max-batch", type=whole_numbers, default="2048",
                        help="batching on: items per merged batch, and the size large queries "
                             "split to (a list sweeps)")
    parser.add_argument("--batch-timeout-ms", type=non_negative_floats, default="2",
                        help="batching on: longest wait of a query for company (a list sweeps)")
    parser.add_argument("--query-size", default="dlrmv2", help=QUERY_SIZE_HELP)
    parser.add_argument("--queries", type=int, default=1024,
                        help="distinct queries LoadGen draws from (its sample set)")
    parser.add_argument("--qps", type=positive_floats,
                        help="server: offered QPS values; offline: expected QPS")
    parser.add_argument("--sla-ms", type=positive_floats,
                        help="latency bounds; server without --qps searches the highest QPS "
                             "meeting each")
    parser.add_argument("--percentile", type=float, default=99.0,
                        help="the latency percentile the bound applies to (default 99)")
    parser.add_argument("--min-duration", type=float, default=1.0,
                        help="LoadGen min_duration in seconds (default 1)")
    parser.add_argument("--min-queries", type=int, default=500,
                        help="LoadGen min_query_count (default 500: p99 early stopping needs "
                             "at least about 460 queries)")
    parser.add_argument("--search-steps", type=int, default=3,
                        help="bisection steps per SLA (default 3); the floor is probed only "
                             "when none of them met the bound")
    parser.add_argument("--search-floor", type=float, default=0.125,
                        help="lowest QPS searched, as a share of the Offline capacity "
                             "(default 1/8)")
    parser.add_argument("--bare", action="store_true",
                        help="offline/singlestream, 1 worker: also time the bare dlrm_infer "
                             "batch in the worker and record the serving overhead")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds without an answer before the run is ended as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results", help="output directory (default results/)")
    parser.add_argument("--run-id", help="name of the run directory (default: timestamp)")
    # Tests only: a bench.faults.PlantedFault for worker 0, e.g. serve.batch:exit:5 (exit
    # before its sixth batch).
    parser.add_argument("--plant-fault", default="", help=argparse.SUPPRESS)
    return parser


def _policies(args) -> list[BatchPolicy]:
    """The batch policies --batching, --max-batch and --batch-timeout-ms sweep."""
    policies = [BatchPolicy(merge=False)] if "off" in args.batching else []
    if "on" in args.batching:
        policies += [BatchPolicy(True, size, timeout / 1e3)
                     for size in args.max_batch for timeout in args.batch_timeout_ms]
    return policies


def worker_devices(device: str, workers: int) -> list[str]:
    """The device of each of `workers` workers: all cpu, or one GPU each, from --device's
    GPU on; DeviceError or UsageError where the GPUs are not there."""
    from bench.run import devices

    first = devices.normalize_device(device)
    if first == "cpu":
        return ["cpu"] * workers
    start, count = int(first.partition(":")[2]), devices.cuda_device_count()
    if start + workers > count:
        # One worker per GPU: two workers on one GPU would time each other's kernels.
        raise UsageError(f"--workers {workers} on --device {device}: a GPU per worker needs "
                         f"GPUs {start}..{start + workers - 1}, {count} visible")
    return [f"cuda:{start + index}" for index in range(workers)]


def validate(args) -> dict:
    """Everything refused before work starts (exit 2); the resolved choices."""
    try:
        loadgen()
    except LoadGenMissing as error:
        raise UsageError(str(error)) from None
    workloads = resolve_workloads(WorkloadChoices(workloads=args.workload,
                                                  max_rows=args.max_rows))
    if len(workloads) != 1:
        raise UsageError(f"--workload {args.workload!r}: serve takes one workload")
    impls = registry.impls("dlrm_infer")
    if args.impl not in impls:
        raise UsageError(f"--impl {args.impl!r}: choose a dlrm_infer impl: {', '.join(impls)}")
    precisions = args.precision
    for precision in precisions:
        if precision not in impls[args.impl].precisions:
            raise UsageError(f"--precision {precision}: dlrm_infer {args.impl} runs "
                             f"{','.join(impls[args.impl].precisions)}")
    workers = args.workers
    device = worker_devices(args.device, max(workers))[0]
    cpus = len(os.sched_getaffinity(0))
    # GPU workers are not pinned (bench.run.worker.pin_threads): only CPU workers need cores.
    if args.threads < 1 or (device == "cpu" and max(workers) * args.threads > cpus):
        raise UsageError(f"--workers {max(workers)} x --threads {args.threads} needs "
                         f"{max(workers) * args.threads} CPUs, this process may use {cpus}")
    try:
        sizes = parse_query_sizes(args.query_size)
    except QuerySizeError as error:
        raise UsageError(str(error)) from None
    if not 0 < args.percentile < 100:
        raise UsageError(f"--percentile {args.percentile}: give a value in (0, 100), e.g. 99")
    if args.queries < 1 or args.min_queries < 1 or args.search_steps < 0:
        raise UsageError("--queries and --min-queries must be >= 1, --search-steps >= 0")
    if not (args.min_duration > 0 and args.stall_timeout > 0 and 0 < args.search_floor < 1):
        raise UsageError("--min-duration and --stall-timeout must be > 0, --search-floor in "
                         "(0, 1)")
    qps = args.qps or []
    slas = sorted(args.sla_ms or [])
    if args.scenario == "server" and not qps and not slas:
        raise UsageError("--scenario server needs --qps Q (runs at Q) or --sla-ms X (searches "
                         "the highest QPS meeting X)")
    if args.bare and args.scenario == "server":
        raise UsageError("--bare compares an Offline or SingleStream run with the bare batch: "
                         "add --scenario offline or singlestream")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    return {"workload": workloads[0], "precisions": precisions, "workers": workers,
            "device": device, "sizes": sizes, "policies": _policies(args), "qps": qps, "slas": slas}


@dataclasses.dataclass(frozen=True)
class PoolSetting:
    """A started pool of co-located workers and what they serve."""

    pool: object  # a bench.serve.workers.WorkerPool
    precision: str
    workers: int
    facts: dict  # per worker index: what it reported at start-up (code version, CPUs, ...)


@dataclasses.dataclass(frozen=True)
class LoadGenTest:
    """One LoadGen test: the scenario, the load it offers, how long it runs, its batch policy."""

    scenario: str
    qps: float
    sla_s: float
    min_queries: int
    min_duration_s: float
    policy_index: int  # into the session's batch policies
    extra: Optional[dict] = None  # "params" and "metrics" added to the row
    measure_bare: bool = False  # also time the bare dlrm_infer batch in the worker


class Session:
    """Rows of one serve command: each LoadGen run becomes one row, flushed as it ends."""

    def __init__(self, args, choices: dict, directory: Path, run_id: str, writer):
        self.args, self.choices, self.directory, self.run_id = args, choices, directory, run_id
        self.writer, self.rows, self.runs = writer, [], 0
        self.table = query_table(choices["sizes"], args.queries, args.seed)

    def row(self, precision: str, workers: int, policy: BatchPolicy, settings, facts: dict,
            outcome=None, error: str = "", extra: dict | None = None) -> ResultRow:
        """One row: LoadGen's figures of a run (or the error that ended it)."""
        from bench.run import devices

        args, device = self.args, self.choices["device"]
        # On cpu the params (and task keys) stay as they were before --device existed.
        placement = ({} if device == "cpu" else
                     {"worker_devices": worker_devices(args.device, workers)})
        params = {"scenario": args.scenario, "workers": workers, "threads_per_worker":
                  args.threads, **placement, **policy.to_dict(), "batching_label": policy.label,
                  "query_size": self.choices["sizes"].to_dict(), "queries": args.queries,
                  "pool_rows": self.table.pool_rows, "seed": args.seed,
                  **(settings.to_dict() if settings else {}), **(extra or {}).get("params", {})}
        key_text = dumps_compact([args.impl, self.choices["workload"].name, precision, params])
        worker_facts = facts.get(0, {})
        row = ResultRow(
            run_id=self.run_id, task_key=hashlib.sha256(key_text.encode()).hexdigest()[:16],
            op="serve", impl=args.impl, code_version=worker_facts.get("code_version", ""),
            workload=self.choices["workload"].name, params=dumps_compact(params), device=device,
            device_name=devices.device_name(device), isa="native", threads=args.threads,
            precision=precision, batch_size=policy.max_batch_items if policy.merge else 0,
            fingerprint=devices.fingerprint(device, "native", args.threads),
            rel_error=worker_facts.get("rel_error", math.nan),
            timestamp=utc_timestamp())
        metrics = dict((extra or {}).get("metrics", {}))
        error = error or (outcome.error if outcome is not None else "")
        if outcome is not None:
            metrics["loadgen_logs"] = str(outcome.log_dir.relative_to(self.directory))
        if error:
            row.status, row.error = STATUS_ERROR, error[:500]
        else:
            figures = outcome.figures
            row.status = STATUS_OK
            # LoadGen samples (queries of items) completed: an Offline run is one LoadGen
            # query of many samples, so its query_count (in metrics) is 1.
            row.n_samples = int(outcome.served_sizes.get("count", 0))
            row.median_s, row.mean_s, row.min_s = (figures["p50_s"], figures["mean_s"],
                                                   figures["min_s"])
            row.p90_s, row.p99_s = figures["p90_s"], figures["p99_s"]
            completed = figures.get("completed_qps", math.nan)
            mean_items = outcome.served_sizes.get("mean", math.nan)
            # Items (model samples) per second: LoadGen's completed queries/s x items served
            # per query on average.
            row.samples_per_s = completed * mean_items
            metrics.update(figures)
            metrics["met_sla"] = figures["valid"]
            share = {index: stats["queries"] / max(1, row.n_samples)  # of samples served
                     for index, stats in outcome.workers.items()}
            metrics["per_worker"] = {str(index): {**stats, "qps": completed * share[index]}
                                     for index, stats in outcome.workers.items()}
            metrics["served_query_items"] = outcome.served_sizes
        metrics["worker_cpus"] = {str(index): fact.get("cpus") for index, fact in facts.items()}
        row.metrics = dumps_compact(metrics)
        self.writer.write(row)
        self.rows.append(row)
        return row

    def loadgen_run(self, setting: PoolSetting, test: LoadGenTest):
        """One LoadGen test and its row (with the bare batch's time when test.measure_bare);
        (outcome, row)."""
        from bench.serve.sut import run_test

        self.runs += 1
        policy = self.choices["policies"][test.policy_index]
        settings = RunSettings(scenario=test.scenario, target_qps=test.qps,
                               target_latency_s=test.sla_s,
                               percentile=self.args.percentile / 100.0,
                               min_duration_s=test.min_duration_s,
                               min_query_count=test.min_queries, max_duration_s=0.0,
                               policy_index=test.policy_index, seed=self.args.seed)
        label = (f"{self.runs:03d}-{setting.precision}-w{setting.workers}-"
                 f"{policy.label.split('(')[0]}-{test.scenario}-{test.qps:.6g}")
        outcome = run_test(setting.pool, self.table, settings,
                           self.directory / "loadgen" / label, self.args.stall_timeout)
        extra = test.extra
        if test.measure_bare and not outcome.error:
            extra = {**(extra or {}), "metrics": _bare_metrics(setting.pool, outcome)}
        row = self.row(setting.precision, setting.workers, policy, settings, setting.facts,
                       outcome, extra=extra)
        _progress(row, policy, setting.workers)
        return outcome, row


def _progress(row: ResultRow, policy: BatchPolicy, workers: int) -> None:
    params = json.loads(row.params)
    if row.status != STATUS_OK:
        text = f"ERROR {row.error}"
    else:
        metrics = json.loads(row.metrics)
        text = (f"{metrics['result']}: {metrics.get('completed_qps', math.nan):.4g} QPS, p99 "
                f"{row.p99_s * 1e3:.4g} ms")
    print(f"[{row.precision} x{workers} batching {policy.label} {params['scenario']} "
          f"{params.get('target_qps', 0):.4g} QPS, SLA {params.get('sla_ms')} ms] {text}",
          file=sys.stderr, flush=True)


def serve_setting(session: Session, setting: PoolSetting, summary: list[str]) -> bool:
    """Every run of one pool (precision, workers) over the batch policies; False once a run
    has errored (the pool is broken)."""
    args, choices = session.args, session.choices
    precision, workers = setting.precision, setting.workers
    sla_default_s = (choices["slas"][0] if choices["slas"] else DEFAULT_SLA_MS) / 1e3
    for policy_index, policy in enumerate(choices["policies"]):
        def run(scenario, qps, sla_s, min_queries=args.min_queries,
                min_duration_s=args.min_duration, extra=None, policy_index=policy_index,
                measure_bare=False):
            return session.loadgen_run(setting, LoadGenTest(
                scenario, qps, sla_s, min_queries, min_duration_s, policy_index, extra,
                measure_bare))

        if args.scenario != "server":
            outcome, row = run(args.scenario, (choices["qps"] or [1.0])[0], sla_default_s,
                               measure_bare=args.bare and workers == 1)
            if row.status != STATUS_OK:
                return False
            continue
        for qps in choices["qps"]:
            outcome, row = run("server", qps, sla_default_s)
            if row.status != STATUS_OK:
                return False
        if choices["qps"] or not choices["slas"]:
            continue
        capacity, row = run("offline", 1.0, sla_default_s, CAPACITY_QUERIES, 0.001,
                            {"params": {"role": "capacity"}})
        if row.status != STATUS_OK:
            return False
        ceiling = capacity.figures["completed_qps"] * CEILING_FACTOR
        floor = capacity.figures["completed_qps"] * args.search_floor
        for sla_ms in choices["slas"]:
            def probe(qps, sla_ms=sla_ms):
                outcome, row = run("server", qps, sla_ms / 1e3,
                                   extra={"params": {"role": "search", "search_sla_ms": sla_ms}})
                if row.status != STATUS_OK:
                    return Probe(qps, False, math.nan, row.error)
                return Probe(qps, outcome.valid, outcome.figures["p99_s"]
                             if args.percentile == 99 else _judged(outcome, args.percentile))

            result = search_max_qps(probe, floor, ceiling, args.search_steps)
            line = (f"{precision}, {workers} worker(s), batching {policy.label}, "
                    f"p{args.percentile:g} <= {sla_ms:g} ms: "
                    + (f"max QPS {result.best_qps:.4g}" if result.best_qps else "NOT MET")
                    + f" ({result.message}; Offline capacity "
                    f"{capacity.figures['completed_qps']:.4g} QPS)")
            summary.append(line)
            print(line, file=sys.stderr, flush=True)
            if any(item.error for item in result.probes):
                return False
            if result.best_qps:
                floor = result.best_qps  # a looser bound is met at least as high
    return True


def _judged(outcome, percentile: float) -> float:
    """The latency of the judged percentile, from LoadGen's reported ones (nearest above)."""
    for name, value in (("p50_s", 50), ("p90_s", 90), ("p95_s", 95), ("p97_s", 97),
                        ("p99_s", 99), ("p999_s", 99.9)):
        if percentile <= value:
            return outcome.figures[name]
    return outcome.figures["max_s"]


def _bare_metrics(pool, outcome) -> dict:
    """The bare dlrm_infer batch time (the op's own closure, timed in the worker by the
    project's timing) and the overhead of the serving path over it, per item."""
    from bench.serve.sut import bare_forward

    bare = bare_forward(pool, 1.0)
    served_items_per_s = (outcome.figures.get("completed_qps", math.nan)
                          * outcome.served_sizes.get("mean", math.nan))
    if bare is None or not served_items_per_s > 0:
        return {"bare_dlrm_infer": "not measured (the worker did not answer)"}
    bare_s_per_item = bare["median_s"] / bare["samples"]
    overhead = 1.0 / served_items_per_s / bare_s_per_item - 1.0
    print(f"  bare dlrm_infer batch of {bare['samples']}: {bare['median_s'] * 1e3:.4g} ms; "
          f"served: {bare['samples'] / served_items_per_s * 1e3:.4g} ms per {bare['samples']} "
          f"items; serving overhead {overhead * 100:+.1f}%", file=sys.stderr)
    return {"bare_dlrm_infer": {**bare, "s_per_item": bare_s_per_item},
            "serving_overhead": overhead}


def worker_configs(args, choices: dict, table, precision: str, workers: int) -> list:
    """The WorkerConfig of each worker of one pool: its cores, or its GPU."""
    from bench.serve.workers import WorkerConfig

    return [WorkerConfig(index, index * args.threads, args.threads, choices["workload"],
                         args.impl, precision, args.seed, tuple(choices["policies"]), table,
                         PlantedFault.parse(args.plant_fault)
                         if args.plant_fault and index == 0 else None, device=device)
            for index, device in enumerate(worker_devices(args.device, workers))]


def main(argv: list[str]) -> int:
    """Entry point of `run_bench.py serve`."""
    args = build_parser().parse_args(argv)
    choices = validate(args)
    directory, run_id = new_run_directory(args.out, args.run_id, label="serve")
    from bench.run import devices
    from bench.serve.workers import WorkerPool

    write_json(directory / "args.json", {"argv": ["serve", *argv], "run_id": run_id,
                                         "op_facts": {}})
    write_json(directory / "env.json", {"run_id": run_id, **devices.host_facts()})
    summary: list[str] = []
    with ResultsWriter(directory / "results.csv") as writer:
        session = Session(args, choices, directory, run_id, writer)
        try:
            for precision in choices["precisions"]:
                for workers in choices["workers"]:
                    configs = worker_configs(args, choices, session.table, precision, workers)
                    pool = WorkerPool(configs)
                    print(f"starting {workers} worker(s) on {choices['device']}: {args.impl} "
                          f"{precision} {choices['workload'].name} (build + float64 check)",
                          file=sys.stderr, flush=True)
                    try:
                        pool.start()
                    except RuntimeError as error:
                        session.row(precision, workers, choices["policies"][0], None, {},
                                    error=str(error))
                        pool.stop()
                        continue
                    try:
                        serve_setting(session, PoolSetting(pool, precision, workers,
                                                           pool.facts), summary)
                    finally:
                        pool.stop()
        except KeyboardInterrupt:
            print(f"interrupted: finished rows are in {directory / 'results.csv'}",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
    _write_report(directory, summary)
    errors = sum(row.status == STATUS_ERROR for row in session.rows)
    print(f"{len(session.rows)} rows in {directory / 'results.csv'}", file=sys.stderr)
    if errors == len(session.rows):
        return EXIT_ALL_ERRORED
    return EXIT_SOME_ERRORED if errors else EXIT_OK


def _write_report(directory: Path, summary: list[str]) -> None:
    """The run's report (its latency-vs-QPS figure) and the search summary."""
    if summary:
        write_atomic(directory / "report" / "serving_summary.md",
                     "\n".join(f"- {line}" for line in summary) + "\n")
    build_report(directory)
