"""The distributed section's data: per-phase step times of dist rows, and measured beside
PREDICTED step times by rank count (read from rows only)."""

from __future__ import annotations

import json

import pandas as pd
from matplotlib.figure import Figure

from bench.records import ResultRow

PHASES = ("lookup", "alltoall_forward", "mlp_forward", "mlp_backward", "allreduce",
          "alltoall_backward", "lookup_backward", "optimizer",
          # torchrec_dmp times its sharded forward and backward as one call each.
          "forward", "backward")
DIST_IMPLS = ("hybrid", "torchrec_dmp")


def phase_table(rows: list[ResultRow]) -> pd.DataFrame:
    """One line per measured dist configuration: ranks, step, phases (ms), a2a bandwidth."""
    lines = []
    for row in rows:
        if row.impl not in DIST_IMPLS or row.status != "ok":
            continue
        params, metrics = json.loads(row.params), json.loads(row.metrics)
        line = {"op": row.op, "impl": row.impl, "workload": row.workload,
                "precision": row.precision,
                "ranks": params["nproc"], "sharding": params["sharding"],
                "global_batch": row.batch_size, "step_ms": row.median_s * 1e3,
                "samples_per_s": row.samples_per_s, "rank_spread": metrics["rank_spread"],
                "oversubscribed": params.get("oversubscribed", False)}
        for phase in PHASES:
            if phase in metrics["phases_s"]:
                line[f"{phase}_ms"] = metrics["phases_s"][phase] * 1e3
        bandwidth = metrics.get("alltoall_forward_bw")
        line["alltoall_algbw_gbps"] = bandwidth["algbw_gbps"] if bandwidth else float("nan")
        lines.append(line)
    return pd.DataFrame(lines)


def collective_table(rows: list[ResultRow]) -> pd.DataFrame:
    """Collective microbenchmark rows: size, time, algbw and busbw (nccl-tests definitions)."""
    lines = []
    for row in rows:
        if row.op in ("alltoall", "allreduce") and row.status == "ok":
            metrics = json.loads(row.metrics)
            lines.append({"op": row.op, "ranks": json.loads(row.params)["nproc"],
                          "size_bytes": metrics["size_bytes"], "median_us": row.median_s * 1e6,
                          "algbw_gbps": metrics["algbw_gbps"],
                          "busbw_gbps": metrics["busbw_gbps"]})
    return pd.DataFrame(lines)


def scaling_figure(rows: list[ResultRow]) -> Figure:
    """Step time by ranks: measured points and PREDICTED lines (strong scaling), per workload."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    measured = phase_table(rows)
    if not measured.empty:
        for (workload, op, impl), group in measured.groupby(["workload", "op", "impl"]):
            group = group.sort_values("ranks")
            axes.plot(group["ranks"], group["step_ms"], "o" if impl == "hybrid" else "s",
                      label=f"{workload} {op} {impl} measured")
    predicted = pd.DataFrame([{**json.loads(row.params), "workload": row.workload,
                               "step_ms": row.median_s * 1e3} for row in rows
                              if row.op == "dist_predicted"])
    if not predicted.empty:
        strong = predicted[predicted["scaling"] == "strong"]
        for (workload, link), group in strong.groupby(["workload", "link"]):
            group = group.sort_values("nproc")
            axes.plot(group["nproc"], group["step_ms"], "--",
                      label=f"{workload} PREDICTED ({link})")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("ranks")
    axes.set_ylabel("step time (ms)")
    axes.set_title("Hybrid-parallel DLRM: measured (points) and PREDICTED (dashed)")
    axes.legend(fontsize=6)
    return figure
