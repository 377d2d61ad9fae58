"""Report tables: runs as frames, machine ceilings, roofline efficiency and summaries."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.records import (ARGS_FILENAME, COLUMNS, ENV_FILENAME, RESULTS_FILENAME, STATUS_OK,
                           ResultRow, dumps_compact, read_rows)
from reports.compare import DEFAULT_ALPHA, DEFAULT_FACTOR, compare_rows

CEILING_OPS = ("membw", "gemm_peak")
# Report order of the ops, as the runs recorded it (args.json "op_facts": each Op's
# report_order; reports load no torch, so they cannot ask the registry). load_run adds to it;
# an op that no loaded run recorded sorts after the recorded ones, by name.
RECORDED_OP_ORDER: dict[str, int] = {}
PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8", "int4")
# Lowest to highest; covers ATen capability names and oneDNN max-ISA names (normalised).
ISA_ORDER = (
    "scalar", "default", "sse41", "sse4_1", "sse42", "sse4_2", "avx", "avx2", "avx2_vnni",
    "avx2_vnni_2", "avx512", "avx512_core", "avx512_vnni", "avx512_core_vnni", "avx512_bf16",
    "avx512_core_bf16", "avx512_fp16", "avx512_core_fp16", "amx", "avx512_core_amx",
    "avx512_core_amx_fp16", "neon", "sve", "sve2", "all", "native",
)
NATIVE_ISA = "native"
PROBLEM_KEYS = ["workload", "params", "batch_size"]
REFERENCE_KEYS = ["op", "workload", "params", "batch_size", "device", "isa", "threads"]
ENV_FACTS = ("cpu_model", "l1d_bytes", "l2_bytes", "l3_bytes", "torch_version", "fingerprint")
CACHE_FACTS = ("l3_bytes", "l2_bytes", "l1d_bytes")
# First metric that every row of a group has decides the group's throughput unit.
THROUGHPUT_METRICS = (
    ("samples_per_s", "samples/s"),
    ("gbps", "GB/s"),
    ("gflops", "GFLOP/s"),
    ("calls_per_s", "calls/s"),
)
PERCENT_COLUMNS = ("efficiency", "noise", "drop")
# A cache roof this close to the memory roof is measurement noise, not a separate ceiling.
CACHE_ROOF_MARGIN = 1.05
IN_CACHE_ROOF = "in-cache"
DRAM_ROOF = "DRAM stream"
GATHER_ROOF = "random gather"
PARTLY_CACHED_ROOF = "in-cache (partly cached: working set between the LLC and the probe buffer)"
# Bytes of one stored value by precision; int8/int4 rows also carry a scale and a bias
# (bench.ops.common, repeated here because reports never import torch).
VALUE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
ROW_OVERHEAD_BYTES = {"int8": 8, "int4": 4}
_FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(ResultRow)}


@dataclasses.dataclass
class Run:
    """One run directory: its results as a frame plus its host facts and arguments."""

    directory: Path
    label: str
    frame: pd.DataFrame
    env: dict[str, Any]
    args: dict[str, Any]
    rows: list[ResultRow] = dataclasses.field(default_factory=list)  # what frame was made of


@dataclasses.dataclass
class Ceilings:
    """Measured machine limits for one (device, isa) group."""

    device: str
    isa: str
    memory_gbps: float = math.nan  # DRAM streaming: the largest membw stream buffer
    memory_buffer_bytes: float = math.nan
    cache_gbps: float = math.nan  # best stream buffer within the last-level cache
    cache_detail: str = ""
    # Random-row gathers from a buffer beyond the last-level cache, GB/s by row size in bytes.
    gather_gbps: dict[int, float] = dataclasses.field(default_factory=dict)
    gather_buffer_bytes: float = math.nan
    cache_bytes: float = math.nan  # the last-level cache (env.json) that decides the roof
    compute_gflops: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    memory_isa: str = ""  # the ISA level(s) whose membw rows gave the memory roofs
    compute_isa: str = ""  # the ISA level(s) whose gemm_peak rows gave the compute roofs

    @property
    def has_any(self) -> bool:
        """Whether at least one roof was measured."""
        return is_positive(self.memory_gbps) or bool(self.compute_gflops)

    def peak_gflops(self, precision: str) -> tuple[float, str]:
        """Compute roof for a precision: its own peak, else the highest one (never overstates)."""
        if precision in self.compute_gflops:
            return self.compute_gflops[precision], precision
        if not self.compute_gflops:
            return math.nan, ""
        best = max(self.compute_gflops, key=self.compute_gflops.__getitem__)
        return self.compute_gflops[best], best

    def attainable_gflops(self, intensity: float, precision: str,
                          bandwidth_gbps: float | None = None) -> float:
        """The roofline at an intensity: min(compute peak, bandwidth * intensity); the
        bandwidth is the DRAM stream roof unless the row's own roof is given."""
        peak, _ = self.peak_gflops(precision)
        bandwidth = self.memory_gbps if bandwidth_gbps is None else bandwidth_gbps
        limits = [peak, bandwidth * intensity]
        finite_limits = [limit for limit in limits if is_positive(limit)]
        return min(finite_limits) if finite_limits else math.nan

    def ridge_point(self, precision: str, bandwidth_gbps: float | None = None) -> float:
        """Intensity (FLOP/byte) where a memory roof (DRAM unless given) meets the compute roof."""
        peak, _ = self.peak_gflops(precision)
        bandwidth = self.memory_gbps if bandwidth_gbps is None else bandwidth_gbps
        if not (is_positive(peak) and is_positive(bandwidth)):
            return math.nan
        return peak / bandwidth

    def roof_for(self, working_set_bytes: float, row_bytes: float,
                 random_rows: bool) -> tuple[str, float]:
        """(name, GB/s) of the memory roof a working set meets: in-cache when it fits in the
        last-level cache; a random-row gather (lookups) or the DRAM stream when it is at least
        as large as that probe's own buffer; in between, partly cached, the in-cache roof bounds
        it (a mix of hits and misses is never faster than all hits)."""
        if not (is_positive(self.cache_bytes) and is_positive(working_set_bytes)):
            return "DRAM stream (working set or cache size unknown)", self.memory_gbps
        in_cache = (max(self.cache_gbps, self.memory_gbps if is_positive(self.memory_gbps)
                        else 0.0) if is_positive(self.cache_gbps) else math.nan)
        if working_set_bytes <= self.cache_bytes:
            if is_positive(in_cache):
                # Never below the DRAM roof: a noisy in-cache probe must not lower the roof.
                return IN_CACHE_ROOF, in_cache
            return "DRAM stream (no in-cache probe)", self.memory_gbps
        if random_rows and self.gather_gbps:
            probe_buffer, size = self.gather_buffer_bytes, nearest_row_size(
                row_bytes, list(self.gather_gbps))
            roof = (f"{GATHER_ROOF} {size} B rows", self.gather_gbps[size])
        elif random_rows:
            probe_buffer, roof = self.memory_buffer_bytes, (
                "DRAM stream (no random-gather probe)", self.memory_gbps)
        else:
            probe_buffer, roof = self.memory_buffer_bytes, (DRAM_ROOF, self.memory_gbps)
        if is_positive(probe_buffer) and working_set_bytes < probe_buffer and is_positive(
                in_cache):
            return PARTLY_CACHED_ROOF, in_cache
        return roof


def is_positive(value: Any) -> bool:
    """A finite number above zero."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


def positive_mask(values: pd.Series) -> pd.Series:
    """Boolean mask of the finite values above zero (safe on empty and object columns)."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    return numbers.gt(0) & np.isfinite(numbers)


def finite_mask(values: pd.Series) -> pd.Series:
    """Boolean mask of the finite values."""
    return np.isfinite(pd.to_numeric(values, errors="coerce").astype(float))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict; missing or malformed files give an empty dict."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def parse_json_object(text: str) -> dict[str, Any]:
    """A JSON object cell as a dict; anything else gives an empty dict."""
    try:
        value = json.loads(text or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def canonical_json(text: str) -> str:
    """Stable text of a JSON cell so that key order never breaks matching."""
    try:
        return dumps_compact(json.loads(text or "{}"))
    except (TypeError, ValueError):
        return str(text)


def rows_to_frame(rows: list[ResultRow]) -> pd.DataFrame:
    """Result rows as a typed frame with a row_id, canonical params and calls per second."""
    frame = pd.DataFrame([dataclasses.asdict(row) for row in rows], columns=list(COLUMNS))
    for name, kind in _FIELD_TYPES.items():
        if kind == "float":
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(float)
        elif kind == "int":
            frame[name] = pd.to_numeric(frame[name], errors="coerce").fillna(0).astype(int)
        elif kind == "bool":
            frame[name] = frame[name].astype(bool)
        else:
            frame[name] = frame[name].fillna("").astype(str)
    frame["params"] = frame["params"].map(canonical_json)
    median = frame["median_s"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["calls_per_s"] = np.where(median > 0, 1.0 / median, np.nan)
    frame.insert(0, "row_id", np.arange(len(frame)))
    return frame


def load_run(directory: Path, label: str | None = None) -> Run:
    """Read results.csv, env.json and args.json of a run directory."""
    directory = Path(directory)
    rows = read_rows(directory / RESULTS_FILENAME)
    args = read_json_object(directory / ARGS_FILENAME)
    record_op_order(args)
    return Run(
        directory=directory,
        label=label or directory.name,
        frame=rows_to_frame(rows),
        env=read_json_object(directory / ENV_FILENAME),
        args=args,
        rows=rows,
    )


def measured_op_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of real operators (not the machine-ceiling probes)."""
    mask = (frame["status"] == STATUS_OK) & ~frame["op"].isin(CEILING_OPS)
    return frame[mask]


def op_sort_key(op: str) -> tuple[float, str]:
    """Ops in their recorded report order, unrecorded ones after them by name."""
    return (RECORDED_OP_ORDER.get(op, float("inf")), op)


def record_op_order(args: dict[str, Any]) -> None:
    """Learn the report order of the ops a run's args.json recorded (first run seen wins)."""
    facts = args.get("op_facts")
    if not isinstance(facts, dict):
        return
    for name, op_facts in facts.items():
        order = op_facts.get("report_order") if isinstance(op_facts, dict) else None
        if isinstance(order, (int, float)):
            RECORDED_OP_ORDER.setdefault(name, order)


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


def sorted_ops(ops: Any) -> list[str]:
    """Distinct ops in report order."""
    return sorted(set(ops), key=op_sort_key)


def buffer_bytes(params: str) -> float:
    """The buffer size a membw probe used, from its params JSON."""
    value = parse_json_object(params).get("bytes")
    return float(value) if is_positive(value) else math.nan


def last_level_cache_bytes(env: dict[str, Any], device: str) -> float:
    """Largest host cache size from env.json; only meaningful for CPU devices."""
    if not str(device).lower().startswith("cpu"):
        return math.nan
    sizes = [float(env[key]) for key in CACHE_FACTS if is_positive(env.get(key))]
    return max(sizes) if sizes else math.nan


def probe_rows(ok_rows: pd.DataFrame, op: str, metric: str, device: str,
               isa: str) -> tuple[pd.DataFrame, str]:
    """Ceiling probe rows of a group, else those of the same device at other ISA levels; and
    the ISA level(s) they were measured at."""
    candidates = ok_rows[(ok_rows["op"] == op) & (ok_rows["device"] == device)]
    candidates = candidates[positive_mask(candidates[metric])]
    own = candidates[candidates["isa"] == isa]
    if not own.empty or candidates.empty:
        return own, isa if not own.empty else ""
    return candidates, joined_unique(candidates["isa"])


def row_bytes_of(params: str) -> float:
    """The row size of a random-gather membw probe, from its params JSON (NaN for streams)."""
    value = parse_json_object(params).get("row_bytes")
    return float(value) if is_positive(value) else math.nan


def nearest_row_size(row_bytes: float, sizes: list[int]) -> int:
    """The probe row size closest to a row (log scale); unknown rows take the smallest."""
    if not is_positive(row_bytes):
        return min(sizes)
    return min(sizes, key=lambda size: (abs(math.log(size / row_bytes)), size))


def gather_roofs(gather_rows: pd.DataFrame, cache_bytes: float, ceilings: Ceilings) -> None:
    """Set the random-row gather roofs from membw gather rows whose buffer exceeds the LLC."""
    if gather_rows.empty:
        return
    sizes = gather_rows["params"].map(buffer_bytes)
    if not is_positive(cache_bytes):
        ceilings.notes.append("random-gather probes not used: the last-level cache size is "
                              "unknown, so their buffer may sit in it")
        return
    beyond = gather_rows[sizes > cache_bytes]
    if beyond.empty:
        ceilings.notes.append(f"random-gather buffer ({format_bytes(float(sizes.max()))}) fits "
                              f"in the {format_bytes(cache_bytes)} last-level cache: not a roof")
        return
    row_sizes = beyond["params"].map(row_bytes_of)
    for size, rows in beyond.groupby(row_sizes, sort=True):
        ceilings.gather_gbps[int(size)] = float(rows["gbps"].max())
    ceilings.gather_buffer_bytes = float(beyond["params"].map(buffer_bytes).max())


def memory_roofs(membw_rows: pd.DataFrame, cache_bytes: float, ceilings: Ceilings) -> None:
    """Set the DRAM stream roof (largest buffer), the in-cache roof and the gather roofs."""
    if membw_rows.empty:
        return
    ceilings.cache_bytes = cache_bytes
    gathers = positive_mask(membw_rows["params"].map(row_bytes_of))
    gather_roofs(membw_rows[gathers], cache_bytes, ceilings)
    membw_rows = membw_rows[~gathers]
    if membw_rows.empty:
        return
    sizes = membw_rows["params"].map(buffer_bytes)
    if not positive_mask(sizes).any():
        ceilings.memory_gbps = float(membw_rows["gbps"].max())
        ceilings.notes.append("membw buffer sizes unknown: memory roof is the best bandwidth")
        return
    largest = float(sizes.max())
    ceilings.memory_gbps = float(membw_rows.loc[sizes == largest, "gbps"].max())
    ceilings.memory_buffer_bytes = largest
    if is_positive(cache_bytes):
        in_cache = membw_rows[sizes <= cache_bytes]
        detail = f"best buffer within the {format_bytes(cache_bytes)} last-level cache"
        if largest <= cache_bytes:
            ceilings.notes.append(
                f"largest membw buffer ({format_bytes(largest)}) fits in the last-level "
                f"cache ({format_bytes(cache_bytes)}): the memory roof may be optimistic"
            )
    else:
        in_cache = membw_rows[sizes < largest]
        detail = "best smaller buffer (cache sizes unknown)"
    best_in_cache = float(in_cache["gbps"].max()) if not in_cache.empty else math.nan
    if is_positive(best_in_cache):
        ceilings.cache_gbps = best_in_cache
        ceilings.cache_detail = detail


def compute_roofs(gemm_rows: pd.DataFrame, ceilings: Ceilings) -> None:
    """Set the compute roof of each precision from gemm_peak rows."""
    for precision, rows in gemm_rows.groupby("precision", sort=False):
        ceilings.compute_gflops[str(precision)] = float(rows["gflops"].max())


def group_ceilings(frame: pd.DataFrame, env: dict[str, Any]) -> dict[tuple[str, str], Ceilings]:
    """Ceilings of every (device, isa) group that has at least one measured roof; a group
    without probes of its own borrows those of its device's other ISA levels."""
    ok_rows = frame[frame["status"] == STATUS_OK]
    result = {}
    for device, isa in sorted(set(zip(ok_rows["device"], ok_rows["isa"]))):
        ceilings = Ceilings(device=device, isa=isa)
        membw, ceilings.memory_isa = probe_rows(ok_rows, "membw", "gbps", device, isa)
        memory_roofs(membw, last_level_cache_bytes(env, device), ceilings)
        gemm, ceilings.compute_isa = probe_rows(ok_rows, "gemm_peak", "gflops", device, isa)
        compute_roofs(gemm, ceilings)
        if ceilings.has_any:
            result[(device, isa)] = ceilings
    return result


CEILING_COLUMNS = ["device", "isa", "roof", "value", "unit", "detail"]


def _memory_records(ceilings: Ceilings, base: dict) -> list[dict]:
    records = []
    if is_positive(ceilings.memory_gbps):
        detail = ("largest buffer" if not is_positive(ceilings.memory_buffer_bytes)
                  else f"stream, buffer {format_bytes(ceilings.memory_buffer_bytes)}")
        records.append({**base, "roof": DRAM_ROOF, "value": ceilings.memory_gbps,
                        "unit": "GB/s", "detail": detail})
    if is_positive(ceilings.cache_gbps):
        records.append({**base, "roof": IN_CACHE_ROOF, "value": ceilings.cache_gbps,
                        "unit": "GB/s", "detail": ceilings.cache_detail})
    for size in sorted(ceilings.gather_gbps):
        records.append({**base, "roof": f"{GATHER_ROOF} {size} B rows",
                        "value": ceilings.gather_gbps[size], "unit": "GB/s",
                        "detail": f"random {size} B rows from a "
                                  f"{format_bytes(ceilings.gather_buffer_bytes)} buffer "
                                  "(rows + indices read)"})
    return records


def _compute_records(ceilings: Ceilings, base: dict) -> list[dict]:
    return [{**base, "roof": f"compute {precision}",
             "value": ceilings.compute_gflops[precision], "unit": "GFLOP/s",
             "detail": f"ridge {ceilings.ridge_point(precision):.3g} FLOP/B (DRAM stream)"}
            for precision in sorted(ceilings.compute_gflops, key=precision_sort_key)]


def ceilings_table(ceilings_by_group: dict[tuple[str, str], Ceilings]) -> pd.DataFrame:
    """The measured roofs: one set per device and ISA level that ran the probes, and a note
    naming the ISA levels that use another level's roofs (never the numbers repeated)."""
    records = []
    borrowed: dict[tuple[str, str], list[str]] = {}
    for ceilings in ceilings_by_group.values():
        base = {"device": ceilings.device, "isa": ceilings.isa}
        if ceilings.memory_isa == ceilings.isa:
            records += _memory_records(ceilings, base)
        elif ceilings.memory_isa:
            borrowed.setdefault((ceilings.device, f"membw of isa {ceilings.memory_isa}"),
                                []).append(ceilings.isa)
        if ceilings.compute_isa == ceilings.isa:
            records += _compute_records(ceilings, base)
        elif ceilings.compute_isa:
            borrowed.setdefault((ceilings.device, f"gemm_peak of isa {ceilings.compute_isa}"),
                                []).append(ceilings.isa)
        if ceilings.memory_isa == ceilings.isa or ceilings.compute_isa == ceilings.isa:
            records += [{**base, "roof": "note", "value": math.nan, "unit": "", "detail": note}
                        for note in ceilings.notes]
    for (device, source), levels in borrowed.items():
        records.append({"device": device, "isa": ", ".join(levels), "roof": "note",
                        "value": math.nan, "unit": "",
                        "detail": f"no probes at these ISA levels: their rows use the {source} "
                                  "(not repeated here)"})
    return pd.DataFrame(records, columns=CEILING_COLUMNS)


def sample_label(calls_per_sample: Any) -> str:
    """What one timing sample is: a single call, or the mean of a block of N calls."""
    try:
        calls = int(calls_per_sample)
    except (TypeError, ValueError):
        calls = 0
    if calls == 1:
        return "single calls"
    if calls > 1:
        return f"{calls}-call block means"
    return "samples of unrecorded block size"


def format_bytes(count: float) -> str:
    """Byte count in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.4g} {unit}"
        count /= 1024
    return f"{count:.4g} GiB"


def arithmetic_intensity(flops: float, bytes_moved: float) -> float:
    """FLOP per byte, or NaN when either count is missing or zero."""
    if is_positive(flops) and is_positive(bytes_moved):
        return flops / bytes_moved
    return math.nan


def achieved_rates(row: pd.Series) -> tuple[float, float]:
    """GFLOP/s and GB/s of a row, from its columns or else from the formulas and median."""
    gflops, gbps = row["gflops"], row["gbps"]
    if not is_positive(gflops) and is_positive(row["flops"]) and is_positive(row["median_s"]):
        gflops = row["flops"] / row["median_s"] / 1e9
    if not is_positive(gbps) and is_positive(row["bytes_moved"]) and is_positive(row["median_s"]):
        gbps = row["bytes_moved"] / row["median_s"] / 1e9
    return float(gflops), float(gbps)


def classify(intensity: float, ridge: float, bytes_moved: float) -> str:
    """Memory- or compute-bound by intensity against the ridge point."""
    if math.isfinite(intensity) and math.isfinite(ridge):
        return "memory" if intensity < ridge else "compute"
    if not math.isfinite(intensity) and is_positive(bytes_moved):
        return "memory"  # moves data but does no arithmetic by formula
    return "unknown"


def _positive(mapping: dict[str, Any], key: str) -> float:
    value = mapping.get(key)
    return float(value) if is_positive(value) else math.nan


def stored_row_bytes(params: dict[str, Any], precision: str) -> float:
    """Bytes of one stored table row at the row's precision, quantization parameters included."""
    dim = _positive(params, "dim")
    if not (is_positive(dim) and precision in VALUE_BYTES):
        return math.nan
    return dim * VALUE_BYTES[precision] + ROW_OVERHEAD_BYTES.get(precision, 0)


def working_set(row: pd.Series) -> tuple[float, float, bool]:
    """(bytes the timed loop keeps touching, bytes of one looked-up row, random rows?) of a row.

    Lookup ops (params carry rotation_batches) cycle through distinct batches of random rows, so
    their working set is the table; other ops touch the same bytes on every call, so theirs is
    what one call moves, unless the builder recorded working_set_bytes (params or metrics)."""
    params, metrics = parse_json_object(row["params"]), parse_json_object(row.get("metrics", ""))
    random_rows = "rotation_batches" in params
    row_size = stored_row_bytes(params, str(row["precision"]))
    rows = _positive(params, "rows") if "rows" in params else _positive(params, "total_rows")
    table = _positive(params, "table_bytes")
    if is_positive(table) and is_positive(rows):
        row_size = table / rows
    recorded = _positive(params, "working_set_bytes")
    if not is_positive(recorded):
        recorded = _positive(metrics, "working_set_bytes")
    if is_positive(recorded):
        return recorded, row_size, random_rows
    if is_positive(_positive(metrics, "tt_bytes")):  # TT cores plus the hot-row cache
        cache = _positive(metrics, "cache_bytes")
        return (_positive(metrics, "tt_bytes") + (cache if is_positive(cache) else 0.0),
                row_size, random_rows)
    bytes_moved = float(row["bytes_moved"]) if is_positive(row["bytes_moved"]) else math.nan
    for candidate in (_positive(metrics, "dense_bytes"), table,
                      rows * row_size if is_positive(rows) else math.nan,
                      _positive(metrics, "model_bytes")):
        if is_positive(candidate):
            batches = _positive(params, "rotation_batches")
            if random_rows and is_positive(batches) and is_positive(bytes_moved):
                # The loop touches no more of the table than its batches read (an upper bound).
                candidate = min(candidate, bytes_moved * batches)
            return candidate, row_size, random_rows
    return bytes_moved, row_size, random_rows


ABOVE_ROOF_NOTE = "above its roof: this kernel beats the run's probe"


def roofline_record(row: pd.Series, ceilings: Ceilings) -> dict[str, Any]:
    """One op row placed under the memory roof its working set meets."""
    intensity = arithmetic_intensity(row["flops"], row["bytes_moved"])
    gflops, gbps = achieved_rates(row)
    _, roof_precision = ceilings.peak_gflops(row["precision"])
    footprint, row_size, random_rows = working_set(row)
    roof, roof_gbps = ceilings.roof_for(footprint, row_size, random_rows)
    attainable = (ceilings.attainable_gflops(intensity, row["precision"], roof_gbps)
                  if math.isfinite(intensity) else math.nan)
    if is_positive(attainable):
        efficiency = gflops / attainable
    elif not math.isfinite(intensity) and is_positive(roof_gbps):
        efficiency = gbps / roof_gbps
    else:
        efficiency = math.nan
    ridge = ceilings.ridge_point(row["precision"], roof_gbps)
    return {
        "row_id": row["row_id"], "device": row["device"], "isa": row["isa"], "op": row["op"],
        "impl": row["impl"], "workload": row["workload"], "precision": row["precision"],
        "threads": row["threads"], "batch_size": row["batch_size"], "intensity": intensity,
        "achieved_gflops": gflops, "achieved_gbps": gbps, "attainable_gflops": attainable,
        "roof_precision": roof_precision, "working_set_bytes": footprint,
        "working_set": format_bytes(footprint) if is_positive(footprint) else "",
        "roof": roof, "roof_gbps": roof_gbps, "efficiency": efficiency, "ridge": ridge,
        "limit": ("compute" if is_positive(attainable) and attainable < roof_gbps * intensity
                  else "memory" if is_positive(efficiency) else ""),
        "bound": classify(intensity, ridge, row["bytes_moved"]),
        "note": ABOVE_ROOF_NOTE if is_positive(efficiency) and efficiency > 1.0 else "",
    }


ROOFLINE_COLUMNS = ["row_id", "device", "isa", "op", "impl", "workload", "precision", "threads",
                    "batch_size", "intensity", "achieved_gflops", "achieved_gbps",
                    "attainable_gflops", "roof_precision", "working_set_bytes", "working_set",
                    "roof", "roof_gbps", "efficiency", "ridge", "limit", "bound", "note"]


def roofline_table(frame: pd.DataFrame,
                   ceilings_by_group: dict[tuple[str, str], Ceilings]) -> pd.DataFrame:
    """Every measured op row whose group has ceilings, with efficiency and bound."""
    records = []
    for _, row in measured_op_rows(frame).iterrows():
        ceilings = ceilings_by_group.get((row["device"], row["isa"]))
        if ceilings is not None:
            records.append(roofline_record(row, ceilings))
    return pd.DataFrame(records, columns=ROOFLINE_COLUMNS)


def joined_unique(values: Any) -> str:
    """Distinct values as one comma-separated string."""
    return ", ".join(sorted({str(value) for value in values}))


def classification_table(roofline: pd.DataFrame) -> pd.DataFrame:
    """Memory- or compute-bound per (device, isa, op, precision)."""
    columns = ["device", "isa", "op", "precision", "roof", "intensity_min", "intensity_max",
               "ridge", "bound", "rows"]
    records = []
    keys = ["device", "isa", "op", "precision", "roof"]
    for key, rows in roofline.groupby(keys, sort=False):
        bounds = set(rows["bound"])
        records.append({
            **dict(zip(keys, key)),
            "intensity_min": rows["intensity"].min(), "intensity_max": rows["intensity"].max(),
            "ridge": rows["ridge"].iloc[0],
            "bound": bounds.pop() if len(bounds) == 1 else "mixed",
            "rows": len(rows),
        })
    table = pd.DataFrame(records, columns=columns)
    return sort_report_rows(table)


def sort_report_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by op, then precision, keeping the rest stable."""
    if table.empty:
        return table.reset_index(drop=True)
    order = sorted(
        range(len(table)),
        key=lambda index: (
            op_sort_key(table["op"].iloc[index]),
            precision_sort_key(str(table["precision"].iloc[index]))
            if "precision" in table else (0, ""),
        ),
    )
    return table.iloc[order].reset_index(drop=True)


def throughput_metric(rows: pd.DataFrame) -> tuple[str, str]:
    """The first throughput column every row has, and its unit."""
    for column, unit in THROUGHPUT_METRICS:
        if not rows.empty and positive_mask(rows[column]).all():
            return column, unit
    return "calls_per_s", "calls/s"


SUMMARY_COLUMNS = ["op", "workload", "device", "impl", "precision", "isa", "threads",
                   "batch_size", "throughput", "unit", "median_s", "efficiency", "roof",
                   "noise", "configs"]


def summary_table(frame: pd.DataFrame, roofline: pd.DataFrame) -> pd.DataFrame:
    """Best configuration per (op, workload, device): throughput, efficiency and noise."""
    rows = measured_op_rows(frame)
    efficiency = roofline.set_index("row_id")["efficiency"] if not roofline.empty else {}
    roofs = roofline.set_index("row_id")["roof"] if not roofline.empty else {}
    records = []
    for (op, workload, device), group in rows.groupby(["op", "workload", "device"]):
        column, unit = throughput_metric(group)
        ranked = group.assign(_rate=group[column].fillna(-math.inf))
        best = ranked.sort_values(["_rate", "median_s"], ascending=[False, True]).iloc[0]
        noise = best["iqr_s"] / best["median_s"] if is_positive(best["median_s"]) else math.nan
        records.append({
            "op": op, "workload": workload, "device": device, "impl": best["impl"],
            "precision": best["precision"], "isa": best["isa"], "threads": best["threads"],
            "batch_size": best["batch_size"], "throughput": best[column], "unit": unit,
            "median_s": best["median_s"],
            "efficiency": float(efficiency.get(best["row_id"], math.nan)),
            "roof": roofs.get(best["row_id"], ""),
            "noise": noise, "configs": len(group),
        })
    return sort_report_rows(pd.DataFrame(records, columns=SUMMARY_COLUMNS))


def problem_rows_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Skipped and failed configurations grouped by reason."""
    columns = ["status", "op", "impl", "precision", "reason", "rows", "isa", "threads",
               "workloads"]
    failed = frame[frame["status"] != STATUS_OK]
    records = []
    keys = ["status", "op", "impl", "precision", "error"]
    for key, rows in failed.groupby(keys, sort=True):
        record = dict(zip(keys, key))
        record["reason"] = record.pop("error") or "(no reason given)"
        record.update(rows=len(rows), isa=joined_unique(rows["isa"]),
                      threads=joined_unique(rows["threads"]),
                      workloads=joined_unique(rows["workload"]))
        records.append(record)
    return pd.DataFrame(records, columns=columns)


TRADEOFF_COLUMNS = ["op", "impl", "workload", "device", "isa", "threads", "precision",
                    "speedup_vs_fp32", "rel_error", "auc_delta", "ctr_abs_diff"]


def precision_tradeoffs(frame: pd.DataFrame) -> pd.DataFrame:
    """Each non-fp32 row against the fastest fp32 row of the same problem and machine slot."""
    rows = measured_op_rows(frame)
    fp32 = rows[(rows["precision"] == "fp32") & positive_mask(rows["median_s"])]
    if fp32.empty:
        return pd.DataFrame(columns=TRADEOFF_COLUMNS)
    reference = (fp32.sort_values("median_s").drop_duplicates(REFERENCE_KEYS)
                 [REFERENCE_KEYS + ["median_s", "auc"]]
                 .rename(columns={"median_s": "fp32_median_s", "auc": "fp32_auc"}))
    lower = rows[rows["precision"] != "fp32"].merge(reference, on=REFERENCE_KEYS, how="inner")
    lower["speedup_vs_fp32"] = lower["fp32_median_s"] / lower["median_s"]
    lower["auc_delta"] = lower["auc"] - lower["fp32_auc"]
    return sort_report_rows(lower[TRADEOFF_COLUMNS])


COMPARISON_COLUMNS = ["op", "impl", "workload", "precision", "params", "device", "isa",
                      "threads", "batch_size", "median_s_a", "median_s_b", "ratio", "verdict",
                      "p_value", "code_changed", "reason"]


# Verdicts that compared two medians; the rest (NOT_COMPARABLE, status changes) did not.
COMPARED_VERDICTS = ("IMPROVED", "REGRESSED", "UNCHANGED")


def _latest_by_task_key(rows: list[ResultRow]) -> list[ResultRow]:
    """One row per task key, the last one, as a resumed run may have measured a key twice."""
    return list({row.task_key: row for row in rows}.values())


def compare_runs(first: Run, second: Run) -> tuple[pd.DataFrame, int, int]:
    """The checker's verdicts (reports.compare.compare_rows, across hosts and code versions)
    for the task keys both runs have, with ratio = second median / first median, plus the
    counts of task keys only one run has."""
    first_rows, second_rows = _latest_by_task_key(first.rows), _latest_by_task_key(second.rows)
    verdicts = compare_rows(first_rows, second_rows, DEFAULT_FACTOR, DEFAULT_ALPHA,
                            check_code_version=False, across_hosts=True)
    by_key = {"a": {row.task_key: row for row in first_rows},
              "b": {row.task_key: row for row in second_rows}}
    records = []
    for verdict in verdicts:
        row_a, row_b = by_key["a"].get(verdict.task_key), by_key["b"].get(verdict.task_key)
        if row_a is None or row_b is None:
            continue  # NEW or MISSING: counted below, not matched
        records.append({
            "op": verdict.op, "impl": verdict.impl, "workload": verdict.workload,
            "precision": verdict.precision, "params": row_b.params, "device": row_b.device,
            "isa": row_b.isa, "threads": row_b.threads, "batch_size": row_b.batch_size,
            "median_s_a": row_a.median_s, "median_s_b": row_b.median_s, "ratio": verdict.ratio,
            "verdict": verdict.verdict, "p_value": verdict.p_value,
            "code_changed": row_a.code_version != row_b.code_version, "reason": verdict.reason,
        })
    only_first = sum(verdict.verdict == "MISSING" for verdict in verdicts)
    only_second = sum(verdict.verdict == "NEW" for verdict in verdicts)
    matched = pd.DataFrame(records, columns=COMPARISON_COLUMNS)
    return sort_report_rows(matched), only_first, only_second


def geometric_mean(values: pd.Series) -> float:
    """Geometric mean of positive values."""
    positive = values[positive_mask(values)]
    return float(np.exp(np.log(positive.astype(float)).mean())) if len(positive) else math.nan


def comparison_summary(matched: pd.DataFrame) -> pd.DataFrame:
    """Per op: matched rows, geometric-mean ratio, extremes and the checker's verdict counts."""
    columns = ["op", "matched", "geomean_ratio", "min_ratio", "max_ratio", "improved",
               "regressed", "unchanged", "not_comparable", "code_changed"]
    records = []
    for op, rows in matched.groupby("op", sort=False):
        verdicts = rows["verdict"]
        records.append({
            "op": op, "matched": len(rows), "geomean_ratio": geometric_mean(rows["ratio"]),
            "min_ratio": rows["ratio"].min(), "max_ratio": rows["ratio"].max(),
            "improved": int((verdicts == "IMPROVED").sum()),
            "regressed": int((verdicts == "REGRESSED").sum()),
            "unchanged": int((verdicts == "UNCHANGED").sum()),
            "not_comparable": int((~verdicts.isin(COMPARED_VERDICTS)).sum()),
            "code_changed": int(rows["code_changed"].sum()),
        })
    return sort_report_rows(pd.DataFrame(records, columns=columns))


def clock_and_isa_facts(run: Run) -> list[tuple[str, str]]:
    """The spin-loop clock the run saw, what the libraries reported and which are unverified."""
    facts = []
    clock = run.env.get("effective_clock")
    if isinstance(clock, dict) and clock.get("effective_clock_hz"):
        facts.append(("effective clock (spin loop, one core)",
                      f"{clock['effective_clock_hz'] / 1e9:.2f} GHz"))
    elif isinstance(clock, dict):
        facts.append(("effective clock", f"not measured: {clock.get('reason', 'no reason')}"))
    for effective in sorted({value for value in run.frame["isa_effective"] if value}):
        unverified = [part.split("=", 1)[0] for part in effective.split(";")
                      if part.endswith("(unverified)")]
        note = (f" ({', '.join(unverified)}: unverified, the knob's value, not the library's "
                "report)" if unverified else "")
        facts.append(("isa_effective", effective + note))
    return facts


def run_facts_table(run: Run) -> pd.DataFrame:
    """Host facts, arguments and row counts of a run as fact/value lines."""
    facts = [("directory", str(run.directory)), ("label", run.label)]
    run_ids = joined_unique(value for value in run.frame["run_id"] if value)
    if run_ids:
        facts.append(("run_id", run_ids))
    facts += [(key, run.env[key]) for key in ENV_FACTS if key in run.env]
    facts += clock_and_isa_facts(run)
    counts = run.frame["status"].value_counts()
    facts += [(f"rows {status}", int(count)) for status, count in counts.items()]
    facts += [(f"args.{key}", value) for key, value in sorted(run.args.items())]
    return pd.DataFrame(
        [(name, value if isinstance(value, (str, int, float)) else json.dumps(value))
         for name, value in facts],
        columns=["fact", "value"],
    )


def format_cell(value: Any, column: str) -> str:
    """Text of one table cell: percentages, grouped large numbers, 4 significant digits."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            return ""
        if column in PERCENT_COLUMNS:
            return f"{number * 100:.1f}%"
        if abs(number) >= 1e4:
            return f"{number:,.0f}"
        return f"{number:.4g}"
    return str(value)


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every cell formatted as text."""
    formatted = {
        column: [format_cell(value, column) for value in table[column]]
        for column in table.columns
    }
    return pd.DataFrame(formatted, columns=list(table.columns))


def markdown_cell(text: str) -> str:
    """Cell text safe inside a markdown table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of the formatted cells."""
    shown = display_frame(table)
    header = "| " + " | ".join(markdown_cell(column) for column in shown.columns) + " |"
    divider = "| " + " | ".join("---" for _ in shown.columns) + " |"
    body = [
        "| " + " | ".join(markdown_cell(cell) for cell in record) + " |"
        for record in shown.itertuples(index=False)
    ]
    return "\n".join([header, divider, *body])


# ---------------------------------------------------------------- the headline table

HEADLINE_OPS = ("dlrm_train", "dlrm_infer", "sls_multi")
HEADLINE_REFERENCE_IMPL = "dlrm_reference"  # the public DLRM reference (run_bench.py reference)
# The params keys that are an op's variant, the same problem for every impl (sls_multi's
# pooling mode, the TT-Rec tables and rank); the other params differ by impl (layout,
# autocast, table bytes) and must not keep impls of one problem apart.
HEADLINE_VARIANT_KEYS = ("mode", "tt_tables", "tt_rank")
HEADLINE_SLOT = ["workload", "op", "variant", "batch_size", "device", "isa", "threads"]
HEADLINE_COLUMNS = ["workload", "op", "variant", "precision", "impl", "median_s", "noise",
                    "samples_per_s", "vs_baseline", "vs_reference", "baseline", "device", "isa",
                    "threads", "batch_size"]


def headline_variant(params: str) -> str:
    """The variant part of a row's params (HEADLINE_VARIANT_KEYS) as compact JSON."""
    values = parse_json_object(params)
    return dumps_compact({key: values[key] for key in HEADLINE_VARIANT_KEYS if key in values})


def headline_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per workload, every impl of the headline ops at each precision, with its speed-up over
    the op's baseline impl at the same precision (vs_baseline) and over dlrm_reference, which
    runs fp32 only, whatever the row's precision (vs_reference); NaN where that row is absent."""
    rows = measured_op_rows(frame)
    rows = rows[rows["op"].isin(HEADLINE_OPS) & positive_mask(rows["median_s"])]
    if rows.empty:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    rows = rows.assign(variant=rows["params"].map(headline_variant))
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
        str(table["workload"].iloc[index]), op_sort_key(table["op"].iloc[index]),
        str(table["variant"].iloc[index]), precision_sort_key(str(table["precision"].iloc[index])),
        float(table["median_s"].iloc[index])))
    return table.iloc[order][HEADLINE_COLUMNS].reset_index(drop=True)
