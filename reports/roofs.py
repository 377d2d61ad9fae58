"""Machine ceilings of a run: memory and compute roofs per (device, isa) from its probe rows."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import pandas as pd

from bench.records import STATUS_OK
from reports import device_roofs
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
CPU_CACHE_NAME = "last-level cache"
# Keys of Ceilings.spreads: which probe row gave a roof.
STREAM_KEY = "stream"
CACHE_KEY = "cache"


def gather_key(row_bytes: int) -> str:
    """The spreads key of a random-gather roof of one row size."""
    return f"gather {row_bytes}"


def compute_key(precision: str) -> str:
    """The spreads key of a precision's compute roof."""
    return f"compute {precision}"


def probe_spread(row: pd.Series) -> float:
    """How much faster than its median the probe row ran at its fastest sample (median / min,
    >= 1): the probe's own spread, within which a kernel above the roof is not beating it."""
    median, fastest = row.get("median_s"), row.get("min_s")
    if is_positive(median) and is_positive(fastest):
        return max(1.0, float(median) / float(fastest))
    return math.nan


class MemoryRoof(NamedTuple):
    """The memory roof a working set meets: its name, GB/s and its probe's spread."""

    name: str
    gbps: float
    spread: float


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
    gather_rows_per_call: dict[int, float] = dataclasses.field(default_factory=dict)
    gather_buffer_bytes: float = math.nan
    cache_bytes: float = math.nan  # the last-level cache (env.json) that decides the roof
    compute_gflops: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    memory_isa: str = ""  # the ISA level(s) whose membw rows gave the memory roofs
    compute_isa: str = ""  # the ISA level(s) whose gemm_peak rows gave the compute roofs
    # The device's names for its roofs and its last cache level (a GPU: HBM stream, L2).
    stream_roof: str = DRAM_ROOF
    cache_roof: str = IN_CACHE_ROOF
    cache_name: str = CPU_CACHE_NAME
    cache_source: str = ""  # where cache_bytes came from
    compute_detail: dict[str, str] = dataclasses.field(default_factory=dict)  # best shape
    # Derived peaks a GPU records beside its measured ones (never a roof), and their words.
    nominal_gflops: dict[str, float] = dataclasses.field(default_factory=dict)
    nominal_detail: dict[str, str] = dataclasses.field(default_factory=dict)
    # The probe's own spread (probe_spread) of the row behind each roof, by STREAM_KEY,
    # CACHE_KEY, gather_key(size) and compute_key(precision).
    spreads: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def partly_cached_roof(self) -> str:
        """The roof name of a working set between the cache and the probe buffer."""
        if self.cache_roof == IN_CACHE_ROOF:
            return PARTLY_CACHED_ROOF
        return (f"{self.cache_roof} (partly cached: working set between the "
                f"{self.cache_roof} and the probe buffer)")

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
                 random_rows: bool) -> MemoryRoof:
        """The memory roof a working set meets: in-cache when it fits in the last-level cache;
        a random-row gather (lookups) or the DRAM stream when it is at least as large as that
        probe's own buffer; in between, partly cached, the in-cache roof bounds it (a mix of
        hits and misses is never faster than all hits)."""
        stream = MemoryRoof(self.stream_roof, self.memory_gbps,
                            self.spreads.get(STREAM_KEY, math.nan))
        if not (is_positive(self.cache_bytes) and is_positive(working_set_bytes)):
            return stream._replace(name=f"{self.stream_roof} (working set or cache size unknown)")
        in_cache = None
        if is_positive(self.cache_gbps):
            # Never below the DRAM roof: a noisy in-cache probe must not lower the roof.
            in_cache = (MemoryRoof(self.cache_roof, self.cache_gbps,
                                   self.spreads.get(CACHE_KEY, math.nan))
                        if not self.memory_gbps > self.cache_gbps
                        else stream._replace(name=self.cache_roof))
        if working_set_bytes <= self.cache_bytes:
            return in_cache or stream._replace(name=f"{self.stream_roof} (no in-cache probe)")
        if random_rows and self.gather_gbps:
            probe_buffer = self.gather_buffer_bytes
            size = nearest_row_size(row_bytes, list(self.gather_gbps))
            roof = MemoryRoof(f"{GATHER_ROOF} {size} B rows", self.gather_gbps[size],
                              self.spreads.get(gather_key(size), math.nan))
        elif random_rows:
            probe_buffer = self.memory_buffer_bytes
            roof = stream._replace(name=f"{self.stream_roof} (no random-gather probe)")
        else:
            probe_buffer, roof = self.memory_buffer_bytes, stream
        if is_positive(probe_buffer) and working_set_bytes < probe_buffer and in_cache:
            return in_cache._replace(name=self.partly_cached_roof)
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
        ceilings.notes.append(f"random-gather probes not used: the {ceilings.cache_name} size "
                              "is unknown, so their buffer may sit in it")
        return
    beyond = gather_rows[sizes > cache_bytes]
    if beyond.empty:
        ceilings.notes.append(f"random-gather buffer ({format_bytes(float(sizes.max()))}) fits "
                              f"in the {format_bytes(cache_bytes)} {ceilings.cache_name}: not a "
                              "roof")
        return
    row_sizes = beyond["params"].map(row_bytes_of)
    for size, rows in beyond.groupby(row_sizes, sort=True):
        best = rows.loc[rows["gbps"].idxmax()]
        ceilings.gather_gbps[int(size)] = float(best["gbps"])
        ceilings.spreads[gather_key(int(size))] = probe_spread(best)
        # Rows in flight decide whether a gather measures memory or the call (a GPU's launch).
        per_call = parse_json_object(best["params"]).get("rows_per_call")
        ceilings.gather_rows_per_call[int(size)] = (float(per_call) if is_positive(per_call)
                                                    else math.nan)
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
        best = membw_rows.loc[membw_rows["gbps"].idxmax()]
        ceilings.memory_gbps = float(best["gbps"])
        ceilings.spreads[STREAM_KEY] = probe_spread(best)
        ceilings.notes.append("membw buffer sizes unknown: memory roof is the best bandwidth")
        return
    largest = float(sizes.max())
    at_largest = membw_rows[sizes == largest]
    best = at_largest.loc[at_largest["gbps"].idxmax()]
    ceilings.memory_gbps = float(best["gbps"])
    ceilings.spreads[STREAM_KEY] = probe_spread(best)
    ceilings.memory_buffer_bytes = largest
    if is_positive(cache_bytes):
        in_cache = membw_rows[sizes <= cache_bytes]
        detail = f"best buffer within the {format_bytes(cache_bytes)} {ceilings.cache_name}"
        if largest <= cache_bytes:
            ceilings.notes.append(
                f"largest membw buffer ({format_bytes(largest)}) fits in the "
                f"{ceilings.cache_name} ({format_bytes(cache_bytes)}): the memory roof may be "
                "optimistic"
            )
        elif in_cache.empty:
            ceilings.notes.append(f"no membw stream buffer fits the {format_bytes(cache_bytes)} "
                                  f"{ceilings.cache_name}: no {ceilings.cache_roof} roof")
    else:
        in_cache = membw_rows[sizes < largest]
        detail = "best smaller buffer (cache sizes unknown)"
    best_row = in_cache.loc[in_cache["gbps"].idxmax()] if not in_cache.empty else None
    best_in_cache = float(best_row["gbps"]) if best_row is not None else math.nan
    if is_positive(best_in_cache):
        ceilings.cache_gbps = best_in_cache
        ceilings.spreads[CACHE_KEY] = probe_spread(best_row)
        ceilings.cache_detail = detail + f" ({format_bytes(buffer_bytes(best_row['params']))})"
        if is_positive(ceilings.memory_gbps) and best_in_cache < ceilings.memory_gbps:
            # Small buffers on a GPU time the launch, not the cache: no cache roof below memory.
            ceilings.notes.append(
                f"the best stream buffer within the {ceilings.cache_name} ran below the "
                f"{ceilings.stream_roof} ({best_in_cache:.4g} < {ceilings.memory_gbps:.4g} GB/s):"
                " no cache roof (a buffer that small times the call, not the cache), so rows "
                f"that fit are held to the {ceilings.stream_roof} figure")


def compute_roofs(gemm_rows: pd.DataFrame, ceilings: Ceilings) -> None:
    """Set the compute roof of each precision (the best of its size sweep: the plateau) from
    gemm_peak rows, the shape that gave it, and the nominal peak the rows recorded."""
    for precision, rows in gemm_rows.groupby("precision", sort=False):
        precision = str(precision)
        best = rows.loc[rows["gflops"].idxmax()]
        ceilings.compute_gflops[precision] = float(best["gflops"])
        ceilings.spreads[compute_key(precision)] = probe_spread(best)
        ceilings.compute_detail[precision] = (
            f"best of {len(rows)} gemm_peak shape(s), at {device_roofs.shape_of(best['params'])}")
        note = device_roofs.plateau_note(rows, precision)
        if note:
            ceilings.notes.append(note)
    for precision, rows in gemm_rows.groupby("precision", sort=False):
        nominal, derivation = device_roofs.nominal_peak(rows)
        if derivation:
            ceilings.nominal_gflops[str(precision)] = nominal
            ceilings.nominal_detail[str(precision)] = derivation


def device_cache(env: dict[str, Any], device: str, membw_rows: pd.DataFrame,
                 ceilings: Ceilings) -> float:
    """The cache size that decides the device's in-cache roof (a GPU's L2, else the host's
    LLC), with the device's roof names and the size's source set on its ceilings."""
    if not device_roofs.is_gpu(device):
        cache = last_level_cache_bytes(env, device)
        ceilings.cache_source = "env.json host caches" if is_positive(cache) else ""
        return cache
    ceilings.stream_roof, ceilings.cache_roof = (device_roofs.GPU_STREAM_ROOF,
                                                 device_roofs.GPU_CACHE_ROOF)
    ceilings.cache_name = device_roofs.GPU_CACHE_NAME
    cache, ceilings.cache_source = device_roofs.gpu_l2_bytes(env, device, membw_rows)
    return cache


def group_ceilings(frame: pd.DataFrame, env: dict[str, Any],
                   device_envs: dict[str, dict[str, Any]] | None = None,
                   ) -> dict[tuple[str, str], Ceilings]:
    """Ceilings of every (device, isa) group that has at least one measured roof; a group
    without probes of its own borrows those of its device's other ISA levels. A device's
    cache sizes come from device_envs[device] where given (its own run's env.json), else env."""
    ok_rows = frame[frame["status"] == STATUS_OK]
    result = {}
    for device, isa in sorted(set(zip(ok_rows["device"], ok_rows["isa"]))):
        ceilings = Ceilings(device=device, isa=isa)
        membw, ceilings.memory_isa = probe_rows(ok_rows, "membw", "gbps", device, isa)
        device_env = (device_envs or {}).get(device, env)
        all_membw = ok_rows[(ok_rows["op"] == "membw") & (ok_rows["device"] == device)]
        memory_roofs(membw, device_cache(device_env, device, all_membw, ceilings), ceilings)
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
        records.append({**base, "roof": ceilings.stream_roof, "value": ceilings.memory_gbps,
                        "unit": "GB/s", "detail": detail + _spread_text(ceilings, STREAM_KEY)})
    if is_positive(ceilings.cache_gbps):
        records.append({**base, "roof": ceilings.cache_roof, "value": ceilings.cache_gbps,
                        "unit": "GB/s", "detail": ceilings.cache_detail + (
                            f" (size from {ceilings.cache_source})"
                            if device_roofs.is_gpu(ceilings.device) else "")
                                  + _spread_text(ceilings, CACHE_KEY)})
    for size in sorted(ceilings.gather_gbps):
        records.append({**base, "roof": f"{GATHER_ROOF} {size} B rows",
                        "value": ceilings.gather_gbps[size], "unit": "GB/s",
                        "detail": f"random {size} B rows{_per_call(ceilings, size)} from a "
                                  f"{format_bytes(ceilings.gather_buffer_bytes)} buffer "
                                  "(rows + indices read)"
                                  + _spread_text(ceilings, gather_key(size))})
    return records


def _spread_text(ceilings: Ceilings, key: str) -> str:
    """The probe's own spread, as the roof's detail states it ('' when unknown)."""
    spread = ceilings.spreads.get(key, math.nan)
    return f"; probe's fastest sample {spread:.3f}x its median" if is_positive(spread) else ""


def _per_call(ceilings: Ceilings, size: int) -> str:
    per_call = ceilings.gather_rows_per_call.get(size, math.nan)
    return f", {per_call:,.0f} a call," if is_positive(per_call) else ""


def _compute_records(ceilings: Ceilings, base: dict) -> list[dict]:
    records = []
    for precision in sorted(ceilings.compute_gflops, key=precision_sort_key):
        shape = ceilings.compute_detail.get(precision)
        records.append({**base, "roof": f"compute {precision}",
                        "value": ceilings.compute_gflops[precision], "unit": "GFLOP/s",
                        "detail": (f"{shape}; " if shape else "") + f"ridge "
                                  f"{ceilings.ridge_point(precision):.3g} FLOP/B "
                                  f"({ceilings.stream_roof})"
                                  + _spread_text(ceilings, compute_key(precision))})
    return records + _nominal_records(ceilings, base)


def _nominal_records(ceilings: Ceilings, base: dict) -> list[dict]:
    """The nominal peaks beside the measured ones, labelled nominal; a note where none."""
    records = []
    for precision in sorted(ceilings.nominal_detail, key=precision_sort_key):
        nominal = ceilings.nominal_gflops[precision]
        derivation = ceilings.nominal_detail[precision]
        if not is_positive(nominal):
            records.append({**base, "roof": "note", "value": math.nan, "unit": "",
                            "detail": f"{device_roofs.NOMINAL_ROOF_PREFIX} {precision}: "
                                      f"{derivation}"})
            continue
        records.append({**base, "roof": f"{device_roofs.NOMINAL_ROOF_PREFIX} {precision}",
                        "value": nominal, "unit": "GFLOP/s",
                        "detail": device_roofs.nominal_detail(
                            precision, derivation,
                            ceilings.compute_gflops.get(precision, math.nan), nominal)})
    return records


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
