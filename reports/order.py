"""The order report rows follow: ops as their runs recorded it, precisions, ISA levels."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8", "int4")
# Lowest to highest; covers ATen capability names and oneDNN max-ISA names (normalised).
ISA_ORDER = (
    "scalar", "default", "sse41", "sse4_1", "sse42", "sse4_2", "avx", "avx2", "avx2_vnni",
    "avx2_vnni_2", "avx512", "avx512_core", "avx512_vnni", "avx512_core_vnni", "avx512_bf16",
    "avx512_core_bf16", "avx512_fp16", "avx512_core_fp16", "amx", "avx512_core_amx",
    "avx512_core_amx_fp16", "neon", "sve", "sve2", "all", "native",
)
NATIVE_ISA = "native"


def op_sort_key(op: str, op_order: Mapping[str, float]) -> tuple[float, str]:
    """Ops in their recorded report order (Run.op_order), unrecorded ones after them by name."""
    return (op_order.get(op, float("inf")), op)


def sorted_ops(ops: Any, op_order: Mapping[str, float]) -> list[str]:
    """Distinct ops in report order."""
    return sorted(set(ops), key=lambda op: op_sort_key(op, op_order))


def precision_sort_key(precision: str) -> tuple[int, str]:
    """Precisions from widest to narrowest."""
    known = precision in PRECISION_ORDER
    return (PRECISION_ORDER.index(precision) if known else len(PRECISION_ORDER), precision)


def normalise_isa(isa: str) -> str:
    """ISA name in one spelling: lower case, underscores."""
    return str(isa).strip().lower().replace("-", "_").replace(".", "_")


def isa_sort_key(isa: str) -> tuple[int, str]:
    """ISA levels lowest first; unknown names just below native, native always last."""
    name = normalise_isa(isa)
    if name == NATIVE_ISA:
        return (len(ISA_ORDER) + 1, name)
    if name in ISA_ORDER:
        return (ISA_ORDER.index(name), name)
    return (len(ISA_ORDER), name)


def sort_report_rows(table: pd.DataFrame, op_order: Mapping[str, float]) -> pd.DataFrame:
    """Rows ordered by op, then precision, keeping the rest stable."""
    if table.empty:
        return table.reset_index(drop=True)
    order = sorted(
        range(len(table)),
        key=lambda index: (
            op_sort_key(table["op"].iloc[index], op_order),
            precision_sort_key(str(table["precision"].iloc[index]))
            if "precision" in table else (0, ""),
        ),
    )
    return table.iloc[order].reset_index(drop=True)
