"""The report's first screen: the best whole-model throughput against the public reference,
where each op's best configuration sits on the roofline, and what bounds it."""

from __future__ import annotations

import math
from typing import Mapping

import pandas as pd

from bench.records import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED
from reports.headline import HEADLINE_REFERENCE_IMPL, headline_table
from reports.order import sort_report_rows
from reports.runs import Run
from reports.tables import best_rows
from reports.values import is_positive, positive_mask

WHOLE_MODEL_OPS = ("dlrm_train", "dlrm_infer")
MODEL_COLUMNS = ["workload", "op", "device", "impl", "precision", "samples_per_s",
                 "joules_per_sample", "vs_reference", "reference_samples_per_s", "batch_size",
                 "isa", "threads"]
# What bounds the op first; the configuration that got there after.
PLACEMENT_COLUMNS = ["op", "workload", "device", "bound", "efficiency", "roof", "intensity",
                     "ridge", "impl", "precision", "isa", "threads"]


def run_line(run: Run) -> str:
    """One sentence on what ran where: host, torch and how many rows were measured."""
    host = ", ".join(str(run.env[key]) for key in ("cpu_model",) if run.env.get(key))
    if run.env.get("torch_version"):
        host += (", " if host else "") + f"torch {run.env['torch_version']}"
    counts = run.frame["status"].value_counts()
    rows = (f"{int(counts.get(STATUS_OK, 0))} row(s) measured, "
            f"{int(counts.get(STATUS_SKIPPED, 0))} skipped, "
            f"{int(counts.get(STATUS_ERROR, 0))} failed")
    return f"Run {run.label}" + (f" on {host}" if host else "") + f": {rows}."


def best_model_table(frame: pd.DataFrame, op_order: Mapping[str, float]) -> pd.DataFrame:
    """Per workload, whole-model op and device, the fastest impl other than the reference
    (samples/s) and its speed-up over dlrm_reference in the same slot (blank where none ran
    there)."""
    table = headline_table(frame, op_order)
    table = table[table["op"].isin(WHOLE_MODEL_OPS)
                  & (table["impl"] != HEADLINE_REFERENCE_IMPL)
                  & positive_mask(table["samples_per_s"])]
    if table.empty:
        return pd.DataFrame(columns=MODEL_COLUMNS)
    # Groups in headline order (workload, then op); a tie goes to the row listed first. Each
    # device keeps its own best: a GPU's rows never hide the CPU's.
    best = table.loc[table.groupby(["workload", "op", "device"],
                                   sort=False)["samples_per_s"].idxmax()]
    # In one slot the batch is the same, so the reference's samples/s is ours / the speed-up.
    reference = best["samples_per_s"] / best["vs_reference"]
    return best.assign(reference_samples_per_s=reference)[MODEL_COLUMNS].reset_index(drop=True)


def placement_table(frame: pd.DataFrame, roofline: pd.DataFrame,
                    op_order: Mapping[str, float]) -> pd.DataFrame:
    """Per op, workload and device, its best configuration (as in the summary) on the roofline:
    the share of its roof it reaches, that roof, and memory- or compute-bound."""
    if roofline.empty:
        return pd.DataFrame(columns=PLACEMENT_COLUMNS)
    placed = roofline.set_index("row_id")
    records = []
    for best, _, _, _ in best_rows(frame):
        if best["row_id"] not in placed.index:
            continue  # no ceilings for its (device, isa) group
        point = placed.loc[best["row_id"]]
        records.append({"op": best["op"], "workload": best["workload"],
                        "device": best["device"], "impl": best["impl"],
                        "precision": best["precision"], "isa": best["isa"],
                        "threads": best["threads"], "efficiency": point["efficiency"],
                        "roof": point["roof"], "intensity": point["intensity"],
                        "ridge": point["ridge"], "bound": point["bound"]})
    return sort_report_rows(pd.DataFrame(records, columns=PLACEMENT_COLUMNS), op_order)


def placement_line(placement: pd.DataFrame) -> str:
    """One sentence: how many ops memory and compute bound, and the range of their efficiency."""
    bounds = placement["bound"].value_counts()
    names = {"memory": "memory-bound", "compute": "compute-bound",
             "unknown": "not classified (no intensity by formula)"}
    parts = [f"{int(bounds[name])} {text}" for name, text in names.items() if name in bounds]
    efficiency = [value for value in placement["efficiency"] if is_positive(value)]
    reach = (f"; their best configurations reach {min(efficiency) * 100:.1f}% to "
             f"{max(efficiency) * 100:.1f}% of the roof their working set meets"
             if efficiency else "")
    return (f"On the roofline, {len(placement)} op configuration(s): {', '.join(parts)}"
            f"{reach}.")


def model_line(models: pd.DataFrame) -> str:
    """One sentence per device on its fastest whole-model configuration and its ratio to the
    reference (the device named where the table holds several)."""
    sentences = []
    for device, rows in models.groupby("device", sort=False):
        top = rows.loc[rows["samples_per_s"].idxmax()]
        ratio = top["vs_reference"]
        against = (f", {ratio:.3g}x the public reference (dlrm_reference) in the same slot"
                   if math.isfinite(ratio) else ", no dlrm_reference row in the same slot")
        where = f" on {device}" if models["device"].nunique() > 1 else ""
        energy = (f" ({top['joules_per_sample']:.3g} J/sample)"
                  if is_positive(top["joules_per_sample"]) else "")
        sentences.append(f"Fastest whole model{where}: {top['op']} on {top['workload']}, "
                         f"{top['impl']} {top['precision']}, {top['samples_per_s']:,.0f} "
                         f"samples/s{energy}{against}.")
    return " ".join(sentences)
