"""The highest QPS that meets a latency bound: bisection over QPS, each probe a LoadGen run
whose own validity verdict decides."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional


@dataclasses.dataclass
class Probe:
    """One offered QPS and LoadGen's verdict on it."""

    qps: float
    valid: bool
    percentile_s: float  # the judged percentile's latency (NaN when the run failed)
    error: str = ""


@dataclasses.dataclass
class SearchResult:
    """The search's answer: the best valid QPS (None when no probe met the bound)."""

    best_qps: Optional[float]
    probes: list[Probe]
    message: str


def search_max_qps(probe: Callable[[float], Probe], low_qps: float, high_qps: float,
                   steps: int) -> SearchResult:
    """Bisect (low, high) on a log scale steps times, keeping the highest QPS LoadGen judged
    VALID; only when no probe was VALID is low_qps itself probed (runs at low QPS are the
    long ones: a run lasts min_query_count / QPS). A probe with an error ends the search."""
    if not 0 < low_qps < high_qps:
        raise ValueError(f"search range must satisfy 0 < low < high, got {low_qps}, {high_qps}")
    probes: list[Probe] = []
    valid, invalid = None, high_qps
    for _ in range(steps):
        middle = math.sqrt((valid or low_qps) * invalid)
        result = probe(middle)
        probes.append(result)
        if result.error:
            return SearchResult(valid, probes, f"stopped: the run at {middle:.4g} QPS failed: "
                                               f"{result.error}")
        if result.valid:
            valid = middle
        else:
            invalid = middle
    if valid is None:
        result = probe(low_qps)
        probes.append(result)
        if result.error:
            return SearchResult(None, probes, f"the run at {low_qps:.4g} QPS failed: "
                                              f"{result.error}")
        if not result.valid:
            return SearchResult(None, probes, _not_met(probes, low_qps))
        valid = low_qps
    ceiling = "" if invalid < high_qps else ", the search ceiling: no probe above it failed"
    return SearchResult(valid, probes, f"highest VALID QPS {valid:.4g} (lowest INVALID "
                                       f"{invalid:.4g}{ceiling})")


def _not_met(probes: list[Probe], low_qps: float) -> str:
    best = min(probes, key=lambda item: (math.isnan(item.percentile_s), item.percentile_s))
    return (f"no offered QPS met the bound: even {low_qps:.4g} QPS was INVALID; the best "
            f"seen was a {best.percentile_s * 1e3:.4g} ms percentile latency at "
            f"{best.qps:.4g} QPS")
