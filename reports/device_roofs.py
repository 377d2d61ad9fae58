"""What a GPU's roofline rests on: its L2 size, its roof names, its nominal peaks and shapes."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from reports.runs import parse_json_object
from reports.values import format_bytes, is_positive

# A GPU's main memory is HBM and its last cache level the L2; a CPU keeps roofs.py's names.
GPU_STREAM_ROOF = "HBM stream"
GPU_CACHE_ROOF = "L2"
GPU_CACHE_NAME = "GPU L2"
NOMINAL_ROOF_PREFIX = "nominal"
# A compute peak still rising this much between the two largest squares has not plateaued.
PLATEAU_MARGIN = 1.05


def is_gpu(device: Any) -> bool:
    """Whether a row's device is a CUDA GPU (cuda or cuda:N)."""
    return str(device).lower().startswith("cuda")


def gpu_index(device: Any) -> int:
    """The N of cuda:N (0 for a bare cuda)."""
    _, _, index = str(device).partition(":")
    return int(index) if index.isdigit() else 0


def env_l2_bytes(env: dict[str, Any], device: str) -> float:
    """The L2 size env.json's gpu facts record for this GPU (l2_cache_bytes), else NaN."""
    gpu = env.get("gpu")
    gpus = gpu.get("gpus") if isinstance(gpu, dict) else None
    for entry in gpus if isinstance(gpus, list) else []:
        if isinstance(entry, dict) and entry.get("index") == gpu_index(device):
            value = entry.get("l2_cache_bytes")
            return float(value) if is_positive(value) else math.nan
    return math.nan


def gpu_l2_bytes(env: dict[str, Any], device: str,
                 membw_rows: pd.DataFrame) -> tuple[float, str]:
    """The GPU's L2 size and where it came from: env.json's gpu facts where they record it,
    else the membw gather probes' params (cache_bytes, which the probe read from torch.cuda on
    that GPU); never the host's caches. (NaN, reason) when neither has it."""
    recorded = env_l2_bytes(env, device)
    if is_positive(recorded):
        return recorded, "env.json gpu facts"
    sizes, sources = [], set()
    for text in membw_rows["params"] if not membw_rows.empty else []:
        params = parse_json_object(text)
        if "row_bytes" in params and is_positive(params.get("cache_bytes")):
            sizes.append(float(params["cache_bytes"]))
            sources.add(str(params.get("cache_source") or "the probe"))
    if not sizes:
        return math.nan, ("neither env.json nor a membw gather probe row records this GPU's L2 "
                          "size")
    return max(sizes), f"{', '.join(sorted(sources))}, as the membw gather probes recorded it"


def shape_of(params: str) -> str:
    """A gemm_peak row's shape in words: a square, a model layer (m x k x n), or its params."""
    values = parse_json_object(params)
    if "size" in values:
        return f"square {values['size']}"
    if all(key in values for key in ("m", "k", "n")):
        return f"{values['m']}x{values['k']}x{values['n']} model layer"
    return params


def plateau_note(rows: pd.DataFrame, precision: str) -> str:
    """A note when the best square is the largest one and still well above the next size:
    the sweep stopped before the plateau, so the peak may understate the device."""
    sizes = rows["params"].map(lambda text: parse_json_object(text).get("size"))
    squares = rows[sizes.map(is_positive)].assign(size=sizes.astype(float))
    if squares["size"].nunique() < 2:
        return ""
    best = squares.groupby("size")["gflops"].max().sort_index()
    largest, before = best.iloc[-1], best.iloc[-2]
    if largest < rows["gflops"].max() or largest <= PLATEAU_MARGIN * before:
        return ""
    return (f"{precision} compute peak still rising at the largest square ({best.index[-1]:.0f}:"
            f" {before:,.0f} -> {largest:,.0f} GFLOP/s): the plateau may lie beyond the sweep")


def _number(value: Any) -> str:
    return f"{float(value):g}" if is_positive(value) else "?"


def nominal_peak(rows: pd.DataFrame) -> tuple[float, str]:
    """The nominal peak gemm_peak rows recorded in metrics (SMs x max clock x per-SM rate) and
    its derivation; (NaN, why none) where the rows recorded none or said why not."""
    for text in rows["metrics"]:
        nominal = parse_json_object(text).get("nominal_peak")
        if not isinstance(nominal, dict):
            continue
        facts = (f"{_number(nominal.get('sm_count'))} SMs x "
                 f"{_number(nominal.get('max_sm_clock_mhz'))} MHz max SM clock x the per-SM "
                 f"rate of compute capability {nominal.get('compute_capability') or '?'}")
        if is_positive(nominal.get("gflops")):
            return float(nominal["gflops"]), facts
        return math.nan, f"no nominal peak: {nominal.get('why_none') or 'none derived'} ({facts})"
    return math.nan, ""


def nominal_detail(precision: str, derivation: str, measured: float, nominal: float) -> str:
    """The ceilings table's words for a nominal peak: what it is and how far the sweep got."""
    reached = (f"; the measured {precision} peak is {measured / nominal * 100:.1f}% of it"
               if is_positive(measured) else "; no measured peak at this precision")
    return f"NOMINAL, not measured: {derivation}{reached}"


def gpu_roofline_note(devices: list[str], caches: dict[str, tuple[float, str]]) -> str:
    """How a GPU's roofline differs from the CPU's: its L2, HBM, gathers and nominal peaks."""
    sizes = "; ".join(
        f"{device}: {format_bytes(size)} ({source})" if is_positive(size)
        else f"{device}: unknown ({source})" for device, (size, source) in caches.items())
    return (f"GPU roofline ({', '.join(devices)}), drawn from that device's own rows only: "
            f"'{GPU_STREAM_ROOF}' is its largest membw stream buffer, '{GPU_CACHE_ROOF}' the "
            "best stream buffer that fits its L2, and a working set is judged against the L2, "
            f"not the host's caches (L2 size {sizes}). The random-gather roofs are its membw "
            "gather probes (rows a call in the ceilings table: a GPU needs millions in flight "
            "to measure memory, not the launch), from a buffer beyond the L2; the compute "
            "peak per precision is the best of its gemm_peak size sweep (squares and the "
            f"model's layer shapes). '{NOMINAL_ROOF_PREFIX}' peaks (SM count x NVML max SM "
            "clock x per-SM rate) are derived, never measured: shown beside the measured "
            "peaks and never used as a roof.")
