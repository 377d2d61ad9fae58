"""`run_bench.py dist`: hybrid-parallel DLRM and collectives over torchrun ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.commands.common import (MAX_TASK_TIMEOUT_S, OneLineParser, UsageError, choice_list,
                                   exit_code, names, new_run_directory, non_negative_int,
                                   positive_floats, positive_int, seconds_up_to, whole_numbers)
from bench.records import (RESULTS_FILENAME, STATUS_ERROR, STATUS_OK, dumps_compact, read_rows,
                           write_json)
from workloads.resolve import WorkloadChoices, resolve_workloads

OPS = ("dlrm_train", "dlrm_infer", "alltoall", "allreduce")
PRECISIONS = ("fp32", "bf16")
IMPLS = ("hybrid", "torchrec_dmp")
# torchrec_dmp: torchrec's planner, constrained to whole tables (its DMP on gloo/CPU).
TORCHREC_SHARDING = "table"


def build_parser() -> OneLineParser:
    """The dist command's arguments."""
    parser = OneLineParser(prog="run_bench.py dist",
                           description="Hybrid-parallel DLRM (model-parallel embeddings over "
                                       "all-to-all, DDP MLPs) and collective microbenchmarks, "
                                       "launched through torchrun.")
    parser.add_argument("--nproc", type=int, default=2, help="ranks on this node (default 2)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun --nnodes)")
    parser.add_argument("--rdzv-endpoint", default="",
                        help="HOST:PORT of the rendezvous (multi-node; torchrun's)")
    parser.add_argument("--ops", type=choice_list(*OPS), default="dlrm_train,dlrm_infer",
                        help=",".join(OPS))
    parser.add_argument("--impls", type=choice_list(*IMPLS), default="hybrid",
                        help="hybrid, torchrec_dmp (torchrec's DistributedModelParallel, "
                             "table-wise)")
    parser.add_argument("--workload", default="smoke", help="preset names (run_bench.py --list)")
    parser.add_argument("--max-rows", type=positive_int, help="cap every table at this many rows")
    parser.add_argument("--batch-size", help="global batch size(s), split evenly over ranks")
    parser.add_argument("--precision", type=choice_list(*PRECISIONS), default="fp32",
                        help="fp32, bf16 (MLPs autocast)")
    parser.add_argument("--sharding", default="auto", choices=("table", "row", "auto"))
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--threads", type=positive_int, default=1, help="threads per rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--sizes", type=whole_numbers,
                        help="collective message sizes in bytes per rank")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--task-timeout", type=seconds_up_to(MAX_TASK_TIMEOUT_S), default=300.0,
                        help="seconds without progress on any rank before the job is ended")
    parser.add_argument("--predict", type=names, metavar="RUN_DIR[,RUN_DIR...]",
                        help="scaling model: read the dist rows of the run directories (e.g. a "
                             "1-rank and a 2-rank run), print its error against "
                             "the measured 2/3-rank rows, append PREDICTED rows for 2..1024 ranks")
    parser.add_argument("--link-gbps", type=positive_floats, default="25,100,400",
                        help="target links for --predict (plus the link measured here, when "
                             "RUN_DIR has alltoall rows)")
    parser.add_argument("--out", default="results")
    parser.add_argument("--run-id")
    return parser


def _check(args) -> None:
    """What the parser's converters cannot refuse alone: counts, and the device's backend."""
    if args.nproc < 1 or args.nnodes < 1 or args.steps < 1 or args.warmup_steps < 0:
        raise UsageError("--nproc, --nnodes and --steps must be >= 1, --warmup-steps >= 0")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
            raise UsageError("--device cuda: no CUDA device or no NCCL here; use --device cpu")
    elif args.device != "cpu":
        raise UsageError(f"--device {args.device}: give cpu or cuda")
    else:
        import torch.distributed

        if not torch.distributed.is_gloo_available():
            raise UsageError("this torch has no gloo backend; install a torch build with it")


def configs(args, workloads, ranks: int) -> list[dict]:
    """One configuration per op, impl, workload and precision (collectives: per size)."""
    items = []
    base = {"device": args.device, "threads": args.threads, "seed": args.seed,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "rotation_batches": 2}
    for op in args.ops:
        if op in ("alltoall", "allreduce"):
            sizes = args.sizes or [1 << power for power in range(10, 27, 2)]
            for size in sizes:
                params = {"nproc": ranks, "size_bytes": size}
                items.append({**base, "op": op, "impl": "gloo" if args.device == "cpu"
                              else "nccl", "precision": "fp32", "size_bytes": size,
                              "steps": max(args.steps, 20), "workload": {"name": "collective",
                                                                         "batch_size": 0},
                              "params": params, "task_key": dumps_compact(["dist", op, params])})
            continue
        for impl in args.impls:
            for workload in workloads:
                if workload.batch_size % ranks:
                    raise UsageError(f"--batch-size {workload.batch_size} is not divisible by "
                                     f"{ranks} ranks; give a multiple of {ranks}")
                sharding = TORCHREC_SHARDING if impl == "torchrec_dmp" else args.sharding
                for precision in args.precision:
                    params = {"nproc": ranks, "sharding": sharding,
                              "global_batch": workload.batch_size,
                              "local_batch": workload.batch_size // ranks,
                              "oversubscribed": ranks * args.threads > os.cpu_count()}
                    item = {**base, "op": op, "impl": impl, "precision": precision,
                            "workload": workload.to_dict(), "sharding": sharding,
                            "params": params,
                            "task_key": dumps_compact(["dist", op, impl, workload.name,
                                                       workload.batch_size, precision, params])}
                    items.append(item)
    return items


def main(argv: list[str]) -> int:
    """Plan, launch through torchrun, and summarise the rows."""
    args = build_parser().parse_args(argv)
    if args.predict:
        return predict([Path(item) for item in args.predict], args.link_gbps)
    _check(args)
    workloads = resolve_workloads(WorkloadChoices(workloads=args.workload, max_rows=args.max_rows,
                                                  batch_sizes=args.batch_size))
    ranks = args.nproc * args.nnodes
    planned = configs(args, workloads, ranks)
    cores = len(os.sched_getaffinity(0))
    if args.nproc * args.threads > cores:
        print(f"warning: {args.nproc} ranks x {args.threads} threads on {cores} cores: the "
              "timing is oversubscribed (fine for correctness runs)", file=sys.stderr)
    directory, run_id = new_run_directory(args.out, args.run_id, label="dist")
    from bench.distributed.launch import run_job
    from bench.distributed.rank import base_row
    from bench.run import devices

    write_json(directory / "args.json", {"argv": ["dist", *argv], "run_id": run_id})
    write_json(directory / "env.json", {"run_id": run_id, **devices.host_facts()})
    job = {"run_id": run_id, "results": str(directory / RESULTS_FILENAME),
           "device": args.device, "threads": args.threads, "configs": planned}
    run_job(job, directory, args.nproc, args.nnodes, args.rdzv_endpoint, args.task_timeout,
            lambda config: base_row(job, config))
    rows = read_rows(directory / RESULTS_FILENAME)
    measured = sum(row.status == STATUS_OK for row in rows)
    errors = sum(row.status == STATUS_ERROR for row in rows)
    print(f"{measured} measured, {len(rows) - measured - errors} skipped, {errors} errors -> "
          f"{directory / RESULTS_FILENAME}")
    return exit_code(measured, errors)


def predict(directories: list[Path], link_gbps: list[float]) -> int:
    """The scaling model over a run directory's rows; predicted rows are labelled as such."""
    import json

    from bench.distributed import scaling
    from bench.records import ResultRow, ResultsWriter
    from workloads.specs import WorkloadSpec

    rows = []
    for directory in directories:
        if not (directory / RESULTS_FILENAME).is_file():
            raise UsageError(f"--predict {directory}: no results.csv there; give a dist run "
                             "directory")
        rows += [row for row in read_rows(directory / RESULTS_FILENAME)
                 if row.op != "dist_predicted"]
    results = directories[0] / RESULTS_FILENAME  # predictions go beside the first run's rows
    points = [(json.loads(row.metrics)["size_bytes"], row.median_s,
               json.loads(row.params)["nproc"]) for row in rows
              if row.op == "alltoall" and row.status == STATUS_OK]
    links = [scaling.named_link(value) for value in link_gbps]
    if points and any(ranks > 1 for _, _, ranks in points):
        links.insert(0, scaling.fit_link(points))
    else:
        print("note: no multi-rank alltoall rows: the model's error is judged on given links "
              "only (run --ops alltoall to measure this machine's link)", file=sys.stderr)
    for entry in scaling.model_error(rows, links[0]):
        print(f"{entry['op']} {entry['workload']} {entry['ranks']} ranks: measured "
              f"{entry['measured_step_s'] * 1e3:.2f} ms, PREDICTED "
              f"{entry['predicted_step_s'] * 1e3:.2f} ms, error {entry['error']:+.0%} "
              f"({entry['link']}"
              f"{', oversubscribed' if entry['oversubscribed'] else ''})")
    predicted = []
    for base in rows:
        if not (base.impl == "hybrid" and base.status == STATUS_OK
                and json.loads(base.params)["nproc"] == 1):
            continue
        workload = WorkloadSpec.from_dict(json.loads(base.metrics)["workload"])
        phases = json.loads(base.metrics)["phases_s"]
        for link in links:
            for mode in ("strong", "weak"):
                for ranks in scaling.RANKS:
                    result = scaling.predict(workload, phases, ranks, link, mode)
                    params = {"prediction": True, "nproc": ranks, "scaling": mode,
                              "link": link.source, "link_bytes_per_s": link.bytes_per_s,
                              "from_row": base.task_key}
                    predicted.append(ResultRow(
                        run_id=base.run_id, task_key=dumps_compact(["predicted", base.op,
                                                                    base.workload, params]),
                        op="dist_predicted", impl="scaling_model", workload=base.workload,
                        params=dumps_compact(params), device=base.device,
                        precision=base.precision, batch_size=result["global_batch"],
                        median_s=result["step_s"],
                        samples_per_s=result["global_batch"] / result["step_s"],
                        metrics=dumps_compact({**result, "predicted_op": base.op,
                                               "label": "PREDICTED by the scaling model, "
                                                        "not measured"})))
    with ResultsWriter(results) as writer:
        for row in predicted:
            writer.write(row)
    print(f"{len(predicted)} predicted rows (op dist_predicted) appended to {results}")
    return 0
