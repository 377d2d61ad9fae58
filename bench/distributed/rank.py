"""`python -m bench.distributed.rank JOB.json` under torchrun: one rank of a dist job."""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from bench import faults
from bench.distributed import collectives, hybrid, torchrec_dmp
from bench.distributed.plan import plan_sharding
from bench.records import (STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, ResultRow, ResultsWriter,
                           dumps_compact, record_summary, summarize, utc_timestamp, write_json)
from bench.registry import Unsupported
from bench.run import devices
from workloads.specs import WorkloadSpec

CODE_VERSION = hashlib.sha256((inspect.getsource(hybrid) + inspect.getsource(collectives))
                              .encode()).hexdigest()[:12]
# torchrec_dmp rows also depend on their own module (which builds on hybrid's inputs).
TORCHREC_CODE_VERSION = hashlib.sha256((inspect.getsource(hybrid) + inspect.getsource(
    collectives) + inspect.getsource(torchrec_dmp)).encode()).hexdigest()[:12]


class Status:
    """This rank's progress file (config, stage, error): the launcher names a failed or hung
    rank from these."""

    def __init__(self, directory: str, rank: int):
        self.path = Path(directory) / f"rank{rank}.json"
        self.sequence = 0

    def mark(self, config: int, stage: str, error: str = "") -> None:
        """Record progress (atomically: the launcher may read it at any moment)."""
        self.sequence += 1
        write_json(self.path, {"config": config, "stage": stage, "sequence": self.sequence,
                               "error": error, "time": time.time(), "pid": os.getpid()})


def _pin(local_rank: int, threads: int) -> None:
    """Pin this rank to its own cores (wrapping round when there are fewer cores than ranks)."""
    cores = sorted(os.sched_getaffinity(0))
    mine = {cores[(local_rank * threads + offset) % len(cores)] for offset in range(threads)}
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(threads)


def _gather(value):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _planted(job: dict, config: dict, rank: int, site: str) -> float:
    """The job's planted fault (bench/faults.py) at a site of this configuration and rank."""
    return faults.trigger(faults.PlantedFault.from_dict(job.get("planted_fault")), site,
                          task_key=config["task_key"], rank=rank)


def base_row(job: dict, config: dict) -> ResultRow:
    """The identifying columns of a configuration's row (rank 0 writes it)."""
    device = config["device"]
    return ResultRow(
        run_id=job["run_id"], task_key=config["task_key"], op=config["op"], impl=config["impl"],
        code_version=TORCHREC_CODE_VERSION if config["impl"] == "torchrec_dmp"
        else CODE_VERSION, workload=config["workload"]["name"],
        params=dumps_compact(config["params"]), device=device,
        device_name=devices.device_name(device), isa="native", isa_effective="native",
        threads=config["threads"], precision=config["precision"],
        batch_size=config["workload"]["batch_size"],
        fingerprint=devices.fingerprint(device, "native", config["threads"]),
        timestamp=utc_timestamp())


def _slowest(per_rank_steps: list[list[dict]]) -> tuple[list[float], dict, float]:
    """Per step the slowest rank's step time and phases; medians of phases; rank spread."""
    steps, phases_of_slowest, spreads = [], [], []
    for step in range(len(per_rank_steps[0])):
        totals = [sum(ranks[step].values()) for ranks in per_rank_steps]
        slowest = int(np.argmax(totals))
        steps.append(totals[slowest])
        phases_of_slowest.append(per_rank_steps[slowest][step])
        spreads.append((max(totals) - min(totals)) / max(totals))
    names = phases_of_slowest[0].keys()
    medians = {name: float(np.median([phases[name] for phases in phases_of_slowest]))
               for name in names}
    return steps, medians, float(np.median(spreads))


def _check_train(model, config: dict, batch, labels, precision: str) -> tuple:
    """A first step against the float64 single-process one; rank 0: (failure or '', rel error)."""
    from bench.compare_outputs import compare, whole_model_bound
    from bench.models.dlrm import build_dlrm
    from bench.models.dlrm_reference import reference_train_step

    workload = model.workload
    initial = build_dlrm(workload, config["seed"], embeddings="per_table", sparse=True) \
        if model.rank == 0 else None
    inputs = model.inputs(batch, labels)
    _, logits, _ = model.train_step(inputs)
    pooled = model.local_pooled(inputs)
    logits_all, pooled_all = _gather(logits.cpu()), _gather(pooled.cpu())
    if model.rank != 0:
        return "", math.nan
    expected = reference_train_step(initial, batch, torch.from_numpy(labels),
                                    hybrid.LEARNING_RATE)
    actual = (torch.cat(logits_all), model.dense_arch.bottom[0].weight.detach().cpu(),
              model.dense_arch.top[-1].weight.detach().cpu(), torch.cat(pooled_all))
    comparison = compare(actual, expected, whole_model_bound(expected, precision))
    if not comparison.passed:
        return (f"distributed step differs from the float64 single-process step: "
                f"{comparison.describe()}"), comparison.rel_error
    return "", comparison.rel_error


def _check_infer(model, config: dict, batch, precision: str) -> tuple:
    """The forward's logits against the float64 single-process model's; as _check_train."""
    from bench.compare_outputs import compare, whole_model_bound
    from bench.models.dlrm import batch_tensors, build_dlrm
    from bench.models.dlrm_reference import reference_logits

    logits = model.infer_step(model.inputs(batch, np.zeros(model.global_batch,
                                                           dtype=np.float32)))[0]
    gathered = _gather(logits.float().cpu())
    if model.rank != 0:
        return "", math.nan
    initial = build_dlrm(model.workload, config["seed"], embeddings="per_table", sparse=True)
    expected = reference_logits(initial, *batch_tensors(batch, torch.device("cpu")))
    comparison = compare(torch.cat(gathered), expected, whole_model_bound(expected, precision))
    if not comparison.passed:
        return (f"distributed forward differs from the float64 single-process forward: "
                f"{comparison.describe()}"), comparison.rel_error
    return "", comparison.rel_error


def _build(job: dict, config: dict, workload: WorkloadSpec, rank: int, device, autocast):
    """The configuration's model and its plan (as a row records it)."""
    world_size = dist.get_world_size()
    if config["impl"] == "torchrec_dmp":
        model = torchrec_dmp.TorchrecDLRM(workload, rank, world_size, config["seed"], device,
                                          autocast, _planted(job, config, rank,
                                                             "dist.embedding_lr"))
        if rank == 0:
            print(model.describe(), file=sys.stderr, flush=True)
        return model, model.sharding_plan()
    plan = plan_sharding([table.rows for table in workload.tables], workload.dim, world_size,
                         config["sharding"], replicate_below_bytes=config.get(
                             "replicate_below_bytes", 1 << 20))
    if rank == 0:
        print(plan.describe(), file=sys.stderr, flush=True)
    model = hybrid.HybridDLRM(workload, plan, rank, config["seed"], device, autocast)
    return model, plan.to_dict()


def run_model(job: dict, index: int, config: dict, rank: int, status: Status):
    """Check, then time, one dlrm_train / dlrm_infer configuration; the row on rank 0."""
    world_size = dist.get_world_size()
    workload = WorkloadSpec.from_dict(config["workload"])
    device = torch.device(config["device"])
    autocast = torch.bfloat16 if config["precision"] == "bf16" else None
    status.mark(index, "building")
    _planted(job, config, rank, "dist.building")
    status.mark(index, "building the model")  # a rank stuck before here lags the others
    try:
        model, plan_record = _build(job, config, workload, rank, device, autocast)
    except Unsupported as error:  # a peer package this machine lacks (same on every rank)
        if rank != 0:
            return None
        row = base_row(job, config)
        row.status, row.error = STATUS_SKIPPED, str(error)[:500]
        return row
    batches = [hybrid.global_batch(workload, config["seed"], batch_index)
               for batch_index in range(config["rotation_batches"])]
    inputs = [model.inputs(batch, labels) for batch, labels in batches]
    training = config["op"] == "dlrm_train"
    status.mark(index, "checking")
    _planted(job, config, rank, "dist.checking")
    error, rel_error = "", math.nan
    if training:
        error, rel_error = _check_train(model, config, *batches[0], config["precision"])
    else:
        error, rel_error = _check_infer(model, config, batches[0][0], config["precision"])
    # Each rank's shards and MLP replica after the checked step, for comparing them with one
    # process's step (the hybrid's tests do).
    if config.get("state_dump_dir") and hasattr(model, "shard_state"):
        torch.save(model.shard_state(), Path(config["state_dump_dir"]) / f"rank{rank}.pt")
    status.mark(index, "timing")
    per_step = []
    for step in range(config["warmup_steps"] + config["steps"]):
        dist.barrier()  # ranks start each step together: phases then show the step's skew
        item = inputs[step % len(inputs)]
        phases = model.train_step(item)[2] if training else model.infer_step(item)[1]
        if step >= config["warmup_steps"]:
            per_step.append(phases)
    # torchrec's all-to-alls run inside its sharded forward and backward: their bytes and
    # the compute around them are not measured apart (nor guessed), so its rows have neither.
    exchange = getattr(model, "exchange", None)
    gathered = _gather({"steps": per_step,
                        "send_bytes": exchange.send_bytes() if exchange else None,
                        "compute_s": float(np.median([sum(value for name, value in s.items()
                                                          if name not in hybrid.COLLECTIVE_PHASES)
                                                      for s in per_step])) if exchange else None})
    if rank != 0:
        return None
    row = base_row(job, config)
    steps, phases, spread = _slowest([item["steps"] for item in gathered])
    summary = summarize(steps)
    record_summary(row, summary)
    row.samples_per_s = workload.batch_size / summary.median_s
    row.rel_error = rel_error
    alltoall_bytes = max(item["send_bytes"] for item in gathered) if exchange else 0
    metrics = {"phases_s": phases, "rank_spread": spread,
               "allreduce_bytes": model.gradient_bytes() if training else 0,
               "sharding_plan": plan_record, "timing": "slowest rank per step",
               "workload": config["workload"]}
    if exchange:
        metrics["alltoall_bytes_per_rank"] = alltoall_bytes
        metrics["rank_compute_s"] = [item["compute_s"] for item in gathered]
    else:
        metrics["phases_note"] = ("torchrec's sharded forward (input and pooled all-to-alls, "
                                  "lookup, MLPs) and backward (with the fused embedding "
                                  "update) are single calls: not split into phases")
        metrics["torchrec_version"] = torchrec_dmp.torchrec_version()
    for phase, size in (("alltoall_forward", alltoall_bytes),
                        ("alltoall_backward", alltoall_bytes if training else 0),
                        ("allreduce", model.gradient_bytes() if training else 0)):
        if size and phases.get(phase, 0) > 0:
            op = "allreduce" if phase == "allreduce" else "alltoall"
            metrics[f"{phase}_bw"] = collectives.bandwidths(op, size, phases[phase], world_size)
    row.metrics = dumps_compact(metrics)
    if error:
        row.status, row.error = STATUS_ERROR, error[:500]
    return row


def run_collective(job: dict, index: int, config: dict, rank: int, status: Status):
    """Time one collective at one message size; the row on rank 0."""
    world_size = dist.get_world_size()
    device = torch.device(config["device"])
    status.mark(index, "checking")
    run, check, size = collectives.collective_closure(config["op"], config["size_bytes"], rank,
                                                      world_size, device)
    errors = _gather(check())
    status.mark(index, "timing")
    seconds = collectives.time_collective(run, config["steps"], device)
    per_rank = _gather(seconds)
    if rank != 0:
        return None
    slowest = [max(values) for values in zip(*per_rank)]
    summary = summarize(slowest)
    row = base_row(job, config)
    record_summary(row, summary)
    row.bytes_moved = float(size)
    bandwidth = collectives.bandwidths(config["op"], size, summary.median_s, world_size)
    row.gbps = bandwidth["busbw_gbps"]
    row.metrics = dumps_compact({**bandwidth, "size_bytes": size, "timing": "slowest rank"})
    failed = [f"rank {number}: {message}" for number, message in enumerate(errors) if message]
    if failed:
        row.status, row.error = STATUS_ERROR, "; ".join(failed)[:500]
    return row


def skipped(job: dict, config: dict) -> ResultRow:
    """A configuration this build does not run, with its reason."""
    row = base_row(job, config)
    row.status, row.error = STATUS_SKIPPED, config["skip_reason"]
    return row


@record
def main(argv: list[str]) -> int:
    """Run every configuration of the job file; rank 0 appends a row after each."""
    job = json.loads(Path(argv[0]).read_text())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    _pin(local_rank, job["threads"])
    backend = "nccl" if job["device"].startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=job["timeout_s"]))
    status = Status(job["status_dir"], rank)
    writer = ResultsWriter(Path(job["results"])) if rank == 0 else None
    for index, config in enumerate(job["configs"]):
        status.mark(index, "starting")
        try:
            if config.get("skip_reason"):
                row = skipped(job, config) if rank == 0 else None
            elif config["op"] in collectives.COLLECTIVE_OPS:
                row = run_collective(job, index, config, rank, status)
            else:
                row = run_model(job, index, config, rank, status)
        except Exception as error:
            status.mark(index, "failed", f"{type(error).__name__}: {error}")
            raise
        if writer is not None and row is not None:
            writer.write(row)
            print(f"[{index + 1}/{len(job['configs'])}] {row.op}/{row.impl} {row.workload} "
                  f"{row.params[:60]}: {row.status}", file=sys.stderr, flush=True)
        status.mark(index, "done")
    if writer is not None:
        writer.close()
    dist.destroy_process_group()
    return 0


STATUSES_WRITTEN = (STATUS_OK, STATUS_ERROR, STATUS_SKIPPED)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
