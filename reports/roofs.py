"""Machine ceilings of a run: memory and compute roofs per (device, isa) from its probe rows."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pandas as pd

from bench.records import STATUS_OK
from reports.order import precision_sort_key
from reports.runs import parse_json_object
from reports.values import format_bytes, is_positive, joined_unique, positive_mask

CACHE_FACTS = ("l3_bytes", "l2_bytes", "l1d_bytes")
# A cache roof this close to the memory roof is measurement noise, not a separate ceiling.
CACHE_ROOF_MARGIN = 1.05
IN_CACHE_ROOF = "in-cache"
DRAM_ROOF = "DRAM stream"
GATHER_ROOF = "random gather"
PARTLY_CACHED_ROOF = "in-cache (partly cached: working set between the LLC and the probe buffer)"


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
