"""Between-process spread: a sweep's replicate rows, and each row's shift tested against it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import false_discovery_control, norm

from bench.records import STATUS_OK, ResultRow, samples_from_row
from reports.merge import merge_runs
from reports.moderated import moderated_t_p_values

# metrics keys of a row of `run_bench.py --replicates K`: which fresh worker process (1..K)
# measured it, and K.
REPLICATE_KEY = "replicate"
REPLICATES_KEY = "replicates"

# The spread assumed when nothing better is known: the standard deviation, between fresh
# worker processes on one host, of a configuration's log median. Chosen conservatively from
# what these 2-vCPU VMs showed: identical code moved +35% to +85% in 4 of 17 rows between two
# back-to-back sweeps (AMD EPYC VM, issue 24) and up to 2.4x between runs a minute apart
# (Intel Xeon VM, docs/regression-checks.md). Two single runs then differ by sd 0.25 * sqrt(2)
# = 0.35 in log, so 2.4x (log 0.88) is 2.5 sd: a single-run check proves only gross changes,
# and says INCONCLUSIVE, not REGRESSED, below them. Replicates (--replicates) or a measured
# figure (check --process-sd) replace it.
DEFAULT_PROCESS_SD = 0.25


@dataclass(frozen=True)
class Replicates:
    """One side's rows with its replicates pooled, and each task_key's per-replicate medians."""

    rows: list[ResultRow]
    log_medians: dict[str, list[float]]


def replicate_index(row: ResultRow) -> int | None:
    """The replicate a row belongs to (metrics 'replicate'), None for a row of a plain run."""
    try:
        metrics = json.loads(row.metrics or "{}")
    except ValueError:
        return None
    value = metrics.get(REPLICATE_KEY) if isinstance(metrics, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _row_median(row: ResultRow) -> float:
    """The row's recorded median, or its samples' median."""
    if math.isfinite(row.median_s):
        return row.median_s
    samples = samples_from_row(row)
    return float(np.median(samples)) if samples else math.nan


def _log(value: float) -> float:
    """log of a median; NaN for one that is not positive (no evidence either way)."""
    return math.log(value) if value > 0 else math.nan


def _without_replicate(row: ResultRow) -> ResultRow:
    """The pooled row without the replicate index its first replicate lent it."""
    metrics = json.loads(row.metrics or "{}")
    metrics.pop(REPLICATE_KEY, None)
    row.metrics = json.dumps(metrics, separators=(",", ":"))
    return row


def pool_replicates(rows: Sequence[ResultRow], side: str = "") -> Replicates | None:
    """rows with each task_key's replicates merged (reports.merge); None when no row has any.

    Replicate k of every key is one run to merge_runs: samples are pooled, an error in any
    replicate makes an error row. A (task_key, replicate) seen twice is an error."""
    if not any(replicate_index(row) is not None for row in rows):
        return None
    runs: dict[int, list[ResultRow]] = {}
    seen: set[tuple[str, int]] = set()
    for row in rows:
        index = replicate_index(row) or 1
        if (row.task_key, index) in seen:
            raise ValueError(f"duplicate task_key {row.task_key!r} replicate {index} in the "
                             f"{side} results (op {row.op}, impl {row.impl})".replace("  ", " "))
        seen.add((row.task_key, index))
        runs.setdefault(index, []).append(row)
    log_medians: dict[str, list[float]] = {}
    for index in sorted(runs):
        for row in runs[index]:
            median = _row_median(row)
            if row.status == STATUS_OK and median > 0:
                log_medians.setdefault(row.task_key, []).append(math.log(median))
    pooled = merge_runs([runs[index] for index in sorted(runs)], run_id=rows[0].run_id)
    return Replicates([_without_replicate(row) for row in pooled], log_medians)


def process_p_values(keys: Sequence[str], baseline: Mapping[str, Sequence[float]],
                     candidate: Mapping[str, Sequence[float]],
                     process_sd: float | None) -> tuple[list[float], list[str]]:
    """Per key: p-value that its shift exceeds the between-process spread, and how it was known.

    baseline/candidate: each key's per-replicate log medians (one value for a plain run). Keys
    with >= 2 replicates on a side give their own variance (pooled over both sides), shrunk
    towards the rows' common level by the moderated t (reports/moderated.py); keys without
    borrow that level. With no replicates anywhere, process_sd (a known sd of log medians
    between processes) gives a z-test; None: NaN (no between-process test)."""
    effects, variances, dofs, scales = [], [], [], []
    for key in keys:
        old, new = np.asarray(baseline[key], float), np.asarray(candidate[key], float)
        effects.append(float(new.mean() - old.mean()))
        scales.append(1 / len(old) + 1 / len(new))
        dof = (len(old) - 1) + (len(new) - 1)
        squares = float(((old - old.mean()) ** 2).sum() + ((new - new.mean()) ** 2).sum())
        dofs.append(float(dof))
        variances.append(squares / dof if dof else math.nan)
    if any(dofs):
        p_values = moderated_t_p_values(np.array(effects), np.array(variances),
                                        np.array(dofs), np.array(scales))
        sources = [f"{len(baseline[key])} vs {len(candidate[key])} replicates"
                   + ("" if dof else ", the other rows' spread") for key, dof in zip(keys, dofs)]
        return p_values, sources
    if process_sd is None:
        return [math.nan] * len(keys), [""] * len(keys)
    if process_sd <= 0:  # processes assumed identical: the samples alone decide
        return [0.0] * len(keys), [f"process sd {process_sd:g}"] * len(keys)
    p_values = [float(2 * norm.sf(abs(effect) / (process_sd * math.sqrt(scale))))
                for effect, scale in zip(effects, scales)]
    return p_values, [f"process sd {process_sd:g} in log"] * len(keys)


def across_processes(keys: Sequence[str], pooled: Sequence[Replicates | None],
                     by_key: Sequence[Mapping[str, ResultRow]], process_sd: float | None):
    """Per key (BH-adjusted p, source, ratio of geometric means) against the between-process
    spread, or None for every key when nothing is known of that spread."""
    sides = []
    for replicates, rows in zip(pooled, by_key):
        known = replicates.log_medians if replicates else {}
        sides.append({key: known.get(key) or [_log(_row_median(rows[key]))] for key in keys})
    p_values, sources = process_p_values(keys, sides[0], sides[1], process_sd)
    if not keys or all(math.isnan(value) for value in p_values):
        return [None] * len(keys)
    # NaN (a row no spread covers) counts as no evidence, before the adjustment.
    adjusted = false_discovery_control(np.nan_to_num(np.asarray(p_values), nan=1.0), method="bh")
    return [(float(p), source, math.exp(np.mean(sides[1][key]) - np.mean(sides[0][key])))
            for p, source, key in zip(adjusted, sources, keys)]
