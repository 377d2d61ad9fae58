"""The headline table: every impl of the whole-model and batched-lookup ops against its baseline
and the public DLRM reference."""

from __future__ import annotations

from typing import Mapping

import pandas as pd

from bench.records import dumps_compact
from reports.energy import with_energy
from reports.order import op_sort_key, precision_sort_key
from reports.runs import measured_op_rows, parse_json_object
from reports.values import positive_mask

HEADLINE_OPS = ("dlrm_train", "dlrm_infer", "sls_multi")
HEADLINE_REFERENCE_IMPL = "dlrm_reference"  # the public DLRM reference (run_bench.py reference)
# The params keys that are an op's variant, the same problem for every impl (sls_multi's
# pooling mode, the TT-Rec tables and rank); the other params differ by impl (layout,
# autocast, table bytes) and must not keep impls of one problem apart.
HEADLINE_VARIANT_KEYS = ("mode", "tt_tables", "tt_rank")
HEADLINE_SLOT = ["workload", "op", "variant", "batch_size", "device", "isa", "threads"]


# The device beside the impl, so a GPU row and a CPU row of one op read side by side; energy
# per sample and power beside samples/s.
HEADLINE_COLUMNS = ["workload", "op", "variant", "precision", "device", "impl", "median_s",
                    "noise", "samples_per_s", "joules_per_sample", "avg_power_w", "vs_baseline",
                    "vs_reference", "baseline", "isa", "threads", "batch_size"]


def headline_variant(params: str) -> str:
    """The variant part of a row's params (HEADLINE_VARIANT_KEYS) as compact JSON."""
    values = parse_json_object(params)
    return dumps_compact({key: values[key] for key in HEADLINE_VARIANT_KEYS if key in values})


def headline_table(frame: pd.DataFrame, op_order: Mapping[str, float]) -> pd.DataFrame:
    """Per workload, every impl of the headline ops at each precision, with its speed-up over
    the op's baseline impl at the same precision (vs_baseline) and over dlrm_reference, which
    runs fp32 only, whatever the row's precision (vs_reference); NaN where that row is absent."""
    rows = measured_op_rows(frame)
    rows = rows[rows["op"].isin(HEADLINE_OPS) & positive_mask(rows["median_s"])]
    if rows.empty:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    rows = with_energy(rows).assign(variant=rows["params"].map(headline_variant))
    # Several rows of one slot (an impl at two layouts, a resumed key): the fastest speaks.
    baseline = (rows[rows["is_baseline"].astype(bool)].sort_values("median_s")
                .drop_duplicates(HEADLINE_SLOT + ["precision"])
                [HEADLINE_SLOT + ["precision", "median_s", "impl"]]
                .rename(columns={"median_s": "baseline_median_s", "impl": "baseline"}))
    reference = (rows[rows["impl"] == HEADLINE_REFERENCE_IMPL].sort_values("median_s")
                 .drop_duplicates(HEADLINE_SLOT)[HEADLINE_SLOT + ["median_s"]]
                 .rename(columns={"median_s": "reference_median_s"}))
    table = (rows.merge(baseline, on=HEADLINE_SLOT + ["precision"], how="left")
             .merge(reference, on=HEADLINE_SLOT, how="left"))
    table["vs_baseline"] = table["baseline_median_s"] / table["median_s"]
    table["vs_reference"] = table["reference_median_s"] / table["median_s"]
    table["noise"] = table["iqr_s"] / table["median_s"]
    table["baseline"] = table["baseline"].fillna("")
    order = sorted(range(len(table)), key=lambda index: (
        str(table["workload"].iloc[index]), op_sort_key(table["op"].iloc[index], op_order),
        str(table["variant"].iloc[index]), precision_sort_key(str(table["precision"].iloc[index])),
        float(table["median_s"].iloc[index])))
    return table.iloc[order][HEADLINE_COLUMNS].reset_index(drop=True)
