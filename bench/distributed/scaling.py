"""A scaling model on paper: step time and phases at 2..1024 ranks from measured 1-rank phase
times and a link (alpha-beta: latency + bytes / bandwidth). Its outputs are PREDICTIONS."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from bench.distributed.plan import REPLICATED, ROW_WISE, TABLE_WISE, plan_sharding
from workloads.specs import WorkloadSpec

RANKS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
NAMED_LINKS_GBPS = (25.0, 100.0, 400.0)
ASSUMED_LATENCY_S = 10e-6  # per message step on a named link: an assumption, not a measurement


@dataclasses.dataclass(frozen=True)
class Link:
    """A network link: bytes per second and seconds per message step."""

    bytes_per_s: float
    latency_s: float
    source: str  # "measured here" or "given: N Gb/s"


def named_link(gbps: float) -> Link:
    """A target network's link from its line rate in Gb/s (latency assumed)."""
    return Link(gbps * 1e9 / 8, ASSUMED_LATENCY_S, f"given: {gbps:g} Gb/s, "
                f"{ASSUMED_LATENCY_S * 1e6:g} us assumed latency")


def fit_link(points: list[tuple[float, float, int]]) -> Link:
    """Least squares of t = (n-1) alpha + (n-1)/n S / beta over (S bytes, t s, n) alltoall rows."""
    design = np.array([[ranks - 1, (ranks - 1) / ranks * size] for size, _, ranks in points])
    times = np.array([seconds for _, seconds, _ in points])
    (alpha, inverse_beta), *_ = np.linalg.lstsq(design, times, rcond=None)
    return Link(1.0 / max(inverse_beta, 1e-15), max(alpha, 0.0), "measured here (alltoall fit)")


def _mlp_parameters(width_in: int, widths) -> int:
    total = 0
    for width_out in widths:
        total += width_in * width_out + width_out
        width_in = width_out
    return total


def gradient_bytes(workload: WorkloadSpec, plan) -> int:
    """Bytes allreduced per step: both MLPs and the replicated tables (the DCN cross layers,
    when the workload has them, are counted as the dot case: a lower bound)."""
    from bench.models.dlrm import top_input_width

    parameters = (_mlp_parameters(workload.num_dense, workload.bottom_mlp)
                  + _mlp_parameters(top_input_width(workload), workload.top_mlp))
    parameters += sum(workload.tables[p.table].rows * workload.dim
                      for p in plan.of_kind(REPLICATED))
    return 4 * parameters


def _busiest_lookup_share(workload: WorkloadSpec, plan) -> float:
    """Share of the global batch's lookup work on the busiest rank."""
    work = [table.pooling.mean for table in workload.tables]
    total = sum(work)
    load = [0.0] * plan.world_size
    for placement in plan.placements:
        share = work[placement.table] / total
        if placement.kind == TABLE_WISE:
            load[placement.owner] += share
        else:  # row-wise: an even split; replicated: each rank its local batch
            load = [value + share / plan.world_size for value in load]
    return max(load)


def predict(workload: WorkloadSpec, phases_1: dict, ranks: int, link: Link,
            scaling: str) -> dict:
    """Predicted phases and step (seconds) at `ranks`, from 1-rank phases of the same workload
    at its batch size; strong: that global batch; weak: that batch per rank."""
    plan = plan_sharding([table.rows for table in workload.tables], workload.dim, ranks, "auto")
    batch_1 = workload.batch_size
    global_batch = batch_1 if scaling == "strong" else batch_1 * ranks
    local_ratio = global_batch / ranks / batch_1
    lookup_ratio = global_batch / batch_1 * _busiest_lookup_share(workload, plan)
    slots = max(plan.sent_slots(rank) for rank in range(ranks))
    alltoall_bytes = global_batch * slots * workload.dim * 4
    alltoall = ((ranks - 1) * link.latency_s
                + (ranks - 1) / ranks * alltoall_bytes / link.bytes_per_s)
    allreduce_bytes = gradient_bytes(workload, plan)
    allreduce = (2 * (ranks - 1) * link.latency_s
                 + 2 * (ranks - 1) / ranks * allreduce_bytes / link.bytes_per_s)
    predicted = {
        "lookup": phases_1.get("lookup", 0.0) * lookup_ratio,
        "lookup_backward": phases_1.get("lookup_backward", 0.0) * lookup_ratio,
        "mlp_forward": phases_1.get("mlp_forward", 0.0) * local_ratio,
        "mlp_backward": phases_1.get("mlp_backward", 0.0) * local_ratio,
        "optimizer": phases_1.get("optimizer", 0.0),  # replicated dense update: constant
        "alltoall_forward": alltoall,
    }
    if "mlp_backward" in phases_1:
        predicted["alltoall_backward"] = alltoall
        predicted["allreduce"] = allreduce
    else:
        predicted = {name: value for name, value in predicted.items()
                     if name in ("lookup", "mlp_forward", "alltoall_forward")}
    return {"phases_s": predicted, "step_s": sum(predicted.values()),
            "global_batch": global_batch, "alltoall_bytes_per_rank": alltoall_bytes,
            "allreduce_bytes": allreduce_bytes}


def model_error(measured_rows, link: Link) -> list[dict]:
    """For each measured k-rank hybrid row with a 1-rank row of the same workload, op and
    precision: predicted vs measured step (strong scaling, the measured global batch)."""
    rows = [row for row in measured_rows if row.impl == "hybrid" and row.status == "ok"]
    single = {(row.op, row.workload, row.precision, row.batch_size): row for row in rows
              if json.loads(row.params)["nproc"] == 1}
    report = []
    for row in rows:
        ranks = json.loads(row.params)["nproc"]
        base = single.get((row.op, row.workload, row.precision, row.batch_size))
        if ranks == 1 or base is None:
            continue
        workload = WorkloadSpec.from_dict(json.loads(row.metrics)["workload"])
        phases_1 = json.loads(base.metrics)["phases_s"]
        predicted = predict(workload, phases_1, ranks, link, "strong")
        report.append({"op": row.op, "workload": row.workload, "ranks": ranks,
                       "measured_step_s": row.median_s, "predicted_step_s": predicted["step_s"],
                       "error": predicted["step_s"] / row.median_s - 1.0,
                       "oversubscribed": json.loads(row.params).get("oversubscribed", False),
                       "link": link.source})
    return report


def finite(value: float) -> bool:
    """Whether a figure can be reported."""
    return math.isfinite(value)


__all__ = ["Link", "named_link", "fit_link", "predict", "model_error", "RANKS",
           "NAMED_LINKS_GBPS", "ROW_WISE"]
