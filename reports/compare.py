"""Per-configuration verdicts between a baseline and a candidate run: a real change, or noise."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import false_discovery_control, mannwhitneyu, ttest_1samp

from bench.records import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_SKIPPED,
    ResultRow,
    samples_from_row,
)
from reports.moderated import moderated_p_values
from reports.spread import across_processes, pool_replicates
from reports.values import geometric_mean

VERDICTS = (
    "IMPROVED",
    "REGRESSED",
    "UNCHANGED",
    "NEW",
    "MISSING",
    "NEWLY_FAILING",
    "FIXED",
    "NOT_COMPARABLE",
    "INCONCLUSIVE",
)

# Verdicts that make a CI check fail.
FAILING_VERDICTS = ("REGRESSED", "NEWLY_FAILING")

# Below this many repetitions on either side the rank test cannot say anything useful.
MIN_SAMPLES = 3

# run_bench.py check's defaults (and the report's comparisons): a change counts when it is
# beyond this factor and its p-value, Benjamini-Hochberg adjusted over the rows tested
# together, is below alpha.
DEFAULT_FACTOR = 0.10
DEFAULT_ALPHA = 0.01

METRIC_TIME = "time"
METRIC_INSTRUCTIONS = "instructions"
METRICS = (METRIC_TIME, METRIC_INSTRUCTIONS)
# A provisional verdict: a row that was tested, decided once every row's p-value is known.
_TESTED = "TESTED"
# How an A/B run's rows are tested on their per-round log ratios: each row alone (a paired
# t-test, df = rounds - 1), or with its variance shrunk towards the rows' shared noise level
# (an empirical-Bayes moderated t, reports/moderated.py), which lends 3 rounds more df.
ROUND_TEST_PAIRED = "paired_t"
ROUND_TEST_MODERATED = "moderated_t"
ROUND_TESTS = (ROUND_TEST_PAIRED, ROUND_TEST_MODERATED)


@dataclass(frozen=True)
class Verdict:
    """The outcome for one task_key: what changed and why we think so."""

    task_key: str
    op: str
    impl: str
    workload: str
    precision: str
    verdict: str
    ratio: float = math.nan  # candidate / baseline: medians, or instructions per call
    # The p-value the verdict used, Benjamini-Hochberg adjusted over the rows compared: a
    # two-sided Mann-Whitney U on two runs' samples, or (A/B rounds) a paired t-test on the
    # rounds' log ratios; NaN for instruction counts (decided by the factor alone).
    p_value: float = math.nan
    reason: str = ""


@dataclass(frozen=True)
class Side:
    """One side of a comparison: its rows and what is known of how they were made."""

    rows: Sequence[ResultRow]
    # {fingerprint: facts} (env.json's fingerprint_facts), so that a fingerprint mismatch
    # names the facts that differ.
    facts: dict[str, dict] | None = None
    # An A/B run's rounds, each a run's rows; round k of one side pairs with round k of the other.
    rounds: Sequence[Sequence[ResultRow]] | None = None
    # How the side was timed or counted: rows of different policies are NOT_COMPARABLE.
    policy: dict | None = None


def as_side(side: Side | Sequence[ResultRow]) -> Side:
    """A Side, from a Side or from bare rows (nothing else known of them)."""
    return side if isinstance(side, Side) else Side(rows=side)


def _index_by_task_key(rows: Iterable[ResultRow], side: str) -> dict[str, ResultRow]:
    """Rows keyed by task_key; a key seen twice is an error, never a silent pick."""
    indexed: dict[str, ResultRow] = {}
    for row in rows:
        if row.task_key in indexed:
            raise ValueError(
                f"duplicate task_key {row.task_key!r} in the {side} results "
                f"(op {row.op}, impl {row.impl}); each configuration must appear once"
            )
        indexed[row.task_key] = row
    return indexed


def _format_fact(name: str, value: object) -> str:
    """A fact's value as people read it: byte sizes in KiB/MiB/GiB, 'not recorded' for None."""
    if value is None:
        return "not recorded"
    if name.endswith("_bytes") and isinstance(value, (int, float)):
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size:
                return f"{value / size:g} {unit}"
        return f"{value:g} B"
    return str(value)


def _flatten_facts(facts: dict, prefix: str = "") -> dict[str, object]:
    """Nested facts (the timing policy) as dotted names."""
    flat: dict[str, object] = {}
    for name, value in facts.items():
        if isinstance(value, dict):
            flat.update(_flatten_facts(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def differing_facts(baseline_facts: dict, candidate_facts: dict) -> list[str]:
    """'l3: 105 MiB vs 480 MiB' for every fingerprint fact on which the two sides differ."""
    baseline_flat, candidate_flat = _flatten_facts(baseline_facts), _flatten_facts(candidate_facts)
    differences = []
    for name in sorted(baseline_flat.keys() | candidate_flat.keys()):
        old, new = baseline_flat.get(name), candidate_flat.get(name)
        if old != new:
            label = name[: -len("_bytes")] if name.endswith("_bytes") else name
            differences.append(f"{label}: {_format_fact(name, old)} vs {_format_fact(name, new)}")
    return differences


def describe_fingerprints(baseline_fingerprint: str, candidate_fingerprint: str,
                          baseline_facts: dict[str, dict] | None = None,
                          candidate_facts: dict[str, dict] | None = None) -> str:
    """Why two fingerprints cannot be compared: their differing facts, or which side lacks them."""
    head = f"fingerprint {baseline_fingerprint} vs {candidate_fingerprint}"
    old = (baseline_facts or {}).get(baseline_fingerprint)
    new = (candidate_facts or {}).get(candidate_fingerprint)
    missing = [side for side, facts in (("baseline", old), ("candidate", new)) if facts is None]
    if missing:
        verb = "records" if len(missing) == 1 else "record"
        return (f"{head}; the {' and '.join(missing)} {verb} no fingerprint facts, so what "
                "differs cannot be listed")
    differences = differing_facts(old, new)
    if not differences:  # e.g. facts of an older fingerprint formula
        return f"{head}; their recorded facts agree, so the fingerprint formula differs"
    return f"{head}: " + "; ".join(differences)


def fingerprint_mismatches(baseline: Iterable[ResultRow],
                           candidate: Iterable[ResultRow]) -> list[tuple[str, str]]:
    """Distinct (baseline, candidate) fingerprint pairs of task_keys both sides hold that differ."""
    baseline_fingerprints = {row.task_key: row.fingerprint for row in baseline}
    pairs = {(baseline_fingerprints[row.task_key], row.fingerprint) for row in candidate
             if row.task_key in baseline_fingerprints
             and baseline_fingerprints[row.task_key] != row.fingerprint}
    return sorted(pairs)


def _make(row: ResultRow, verdict: str, ratio=math.nan, p_value=math.nan, reason="") -> Verdict:
    """Verdict carrying the identifying columns of row."""
    return Verdict(
        task_key=row.task_key,
        op=row.op,
        impl=row.impl,
        workload=row.workload,
        precision=row.precision,
        verdict=verdict,
        ratio=float(ratio),
        p_value=float(p_value),
        reason=reason,
    )


def _describe_status(row: ResultRow) -> str:
    """Status with its message, e.g. 'error: out of memory'."""
    return f"{row.status}: {row.error}" if row.error else row.status


def _median(row: ResultRow, samples: list[float]) -> float:
    """The row's recorded median, or the samples' median when the row lacks one."""
    if math.isfinite(row.median_s):
        return row.median_s
    return float(np.median(samples)) if samples else math.nan


def _status_verdict(baseline: ResultRow, candidate: ResultRow) -> Verdict | None:
    """Verdict decided by status alone; None when both sides were measured."""
    if baseline.status == STATUS_OK and candidate.status == STATUS_OK:
        return None
    if candidate.status == STATUS_ERROR and baseline.status != STATUS_ERROR:
        # A baseline that ran (or was skipped) now raising is a new failure either way.
        return _make(candidate, "NEWLY_FAILING", reason=_describe_status(candidate))
    if baseline.status == STATUS_ERROR and candidate.status == STATUS_OK:
        return _make(candidate, "FIXED", reason=f"baseline was {_describe_status(baseline)}")
    if baseline.status == candidate.status:
        # Nothing was timed on either side, so there is no performance to call unchanged.
        message = candidate.error or baseline.error
        reason = f"{candidate.status} in both runs" + (f": {message}" if message else "")
        return _make(candidate, "NOT_COMPARABLE", reason=reason)
    if candidate.status == STATUS_SKIPPED:
        return _make(
            candidate, "NOT_COMPARABLE", reason=f"candidate {_describe_status(candidate)}"
        )
    return _make(candidate, "NOT_COMPARABLE", reason=f"baseline {_describe_status(baseline)}")


def _compare_pair(baseline: ResultRow, candidate: ResultRow, sides: tuple[Side, Side],
                  factor: float, check_code_version: bool, across_hosts: bool, metric: str,
                  rounds) -> Verdict:
    """Verdict for one task_key on both sides (TESTED, decided later, when a test ran)."""
    # Another machine or software stack says nothing about this code, failures included;
    # a report that compares machines (across_hosts) wants the comparison all the same.
    if baseline.fingerprint != candidate.fingerprint and not across_hosts:
        return _make(
            candidate,
            "NOT_COMPARABLE",
            reason="different host or timing policy: " + describe_fingerprints(
                baseline.fingerprint, candidate.fingerprint, sides[0].facts, sides[1].facts),
        )
    # Status changes are reported even when the impl changed: a new crash matters most then.
    status_verdict = _status_verdict(baseline, candidate)
    if status_verdict is not None:
        return status_verdict
    code_changed = baseline.code_version != candidate.code_version
    # An A/B run times both versions now, so a changed impl is what is being measured.
    suffix = " (impl code changed)" if code_changed else ""
    if baseline.fingerprint != candidate.fingerprint:
        suffix += " (different hosts)"
    if metric == METRIC_INSTRUCTIONS:
        return _compare_counts(baseline, candidate, factor, code_changed and check_code_version,
                               suffix)
    if code_changed and check_code_version:
        return _make(candidate, "NOT_COMPARABLE", reason="impl code changed; re-baseline")
    baseline_samples = samples_from_row(baseline)
    candidate_samples = samples_from_row(candidate)
    if len(baseline_samples) < MIN_SAMPLES or len(candidate_samples) < MIN_SAMPLES:
        return _make(
            candidate,
            "NOT_COMPARABLE",
            reason=(
                f"too few samples for a significance test (baseline {len(baseline_samples)}, "
                f"candidate {len(candidate_samples)}; need {MIN_SAMPLES})"
            ),
        )
    baseline_median = _median(baseline, baseline_samples)
    candidate_median = _median(candidate, candidate_samples)
    if not (baseline_median > 0 and math.isfinite(candidate_median)):
        return _make(
            candidate,
            "NOT_COMPARABLE",
            reason=f"no usable medians (baseline {baseline_median}, candidate {candidate_median})",
        )
    if rounds is not None:
        return _paired_rounds(candidate, rounds, suffix)
    ratio = candidate_median / baseline_median
    p_value = float(
        mannwhitneyu(baseline_samples, candidate_samples, alternative="two-sided").pvalue
    )
    if math.isnan(p_value):
        p_value = 1.0  # identical constant samples: no evidence of any difference
    return _make(candidate, _TESTED, ratio, p_value, suffix)


def _round_ratios(task_key: str, rounds) -> list[float]:
    """Candidate/baseline median of one task_key in each round where both sides measured it."""
    ratios = []
    for baseline_round, candidate_round in zip(*rounds):
        old, new = baseline_round.get(task_key), candidate_round.get(task_key)
        if old is not None and new is not None and old > 0 and math.isfinite(new) and new > 0:
            ratios.append(new / old)
    return ratios


def _paired_rounds(candidate: ResultRow, rounds, suffix: str) -> Verdict:
    """A/B: a paired t-test on the rounds' log ratios (the round is the replicate)."""
    # The samples of one run share that run's machine state, so treating them as independent
    # (a rank test on pooled samples) over-rejects; each interleaved round gives one paired
    # ratio instead, and the spread of those ratios is the between-run noise itself.
    ratios = _round_ratios(candidate.task_key, rounds)
    if len(ratios) < 2:
        return _make(candidate, "NOT_COMPARABLE",
                     reason=f"{len(ratios)} round(s) measured on both sides; the paired test "
                            "needs at least 2 (use --rounds 3 or more)" + suffix)
    logs = np.log(ratios)
    geometric_ratio = float(np.exp(logs.mean()))
    if np.ptp(logs) == 0:  # identical ratios in every round: the t statistic is undefined
        p_value = 1.0 if logs[0] == 0 else 0.0
    else:
        p_value = float(ttest_1samp(logs, 0.0).pvalue)
    per_round = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    return _make(candidate, _TESTED, geometric_ratio, p_value,
                 f" (ratios per round: {per_round})" + suffix)


def _compare_counts(baseline: ResultRow, candidate: ResultRow, factor: float,
                    code_changed: bool, suffix: str) -> Verdict:
    """Instruction counts: nearly deterministic, so the factor (set from A/A runs) decides."""
    missing = [side for side, row in (("baseline", baseline), ("candidate", candidate))
               if not (math.isfinite(row.instructions) and row.instructions > 0)]
    if missing:
        return _make(candidate, "NOT_COMPARABLE",
                     reason=f"no instruction count in the {' and '.join(missing)} row; record "
                            "runs with --metric instructions")
    ratio = candidate.instructions / baseline.instructions
    change = f"instructions per call {baseline.instructions:,.0f} -> {candidate.instructions:,.0f}"
    if code_changed:
        # A stored count of other code says nothing about a regression: say how much it moved.
        return _make(candidate, "NOT_COMPARABLE",
                     reason=f"impl code changed ({change}, x{ratio:.3f}); re-baseline")
    if ratio > 1 + factor:
        verdict, reason = "REGRESSED", f"{change}: more than {factor * 100:g}% more"
    elif ratio < 1 / (1 + factor):
        verdict, reason = "IMPROVED", f"{change}: more than {factor * 100:g}% fewer"
    else:
        verdict, reason = "UNCHANGED", f"within the {factor * 100:g}% factor"
    return _make(candidate, verdict, ratio, reason=reason + suffix)


def _decide(verdict: Verdict, p_adjusted: float, factor: float, alpha: float,
            process: tuple[float, str] | None = None) -> Verdict:
    """The verdict of a tested row from its adjusted p-value and its ratio.

    process: (BH-adjusted p, source) of the shift against the between-process spread. A row
    whose samples moved beyond the factor but whose shift that spread explains is
    INCONCLUSIVE; the p-value kept is then the larger of the two."""
    ratio, significant = verdict.ratio, p_adjusted < alpha
    test = (f"BH-adjusted p < {alpha:g}" if significant
            else f"not significant (BH-adjusted p >= {alpha:g})")
    if process is not None and not math.isnan(process[0]):
        process_p, source = process
        beyond = ratio > 1 + factor or ratio < 1 / (1 + factor)
        if significant and beyond and process_p >= alpha:
            return replace(verdict, verdict="INCONCLUSIVE", p_value=float(process_p), reason=(
                f"moved by more than {factor * 100:g}% within the run's samples ({test}) but "
                f"not beyond the spread between processes (BH-adjusted p {process_p:.2g} >= "
                f"{alpha:g}; {source}); more replicates on both sides (run_bench.py "
                "--replicates) can settle it"
                + verdict.reason))
        p_adjusted = max(p_adjusted, process_p)
        significant = p_adjusted < alpha
        test = (f"BH-adjusted p < {alpha:g} within runs and between processes ({source})"
                if significant else test)
    if significant and ratio > 1 + factor:
        name, reason = "REGRESSED", f"slower by more than {factor * 100:g}% and {test}"
    elif significant and ratio < 1 / (1 + factor):
        name, reason = "IMPROVED", f"faster by more than {factor * 100:g}% and {test}"
    elif significant:
        name, reason = "UNCHANGED", f"significant but within the {factor * 100:g}% factor"
    else:
        name, reason = "UNCHANGED", test
    return replace(verdict, verdict=name, p_value=float(p_adjusted),
                   reason=reason + verdict.reason)


def adjust_p_values(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (scipy), so that testing many rows at once does not
    multiply false alarms: with no real change anywhere, P(any row flagged) <= alpha."""
    if not p_values:
        return []
    return [float(value) for value in false_discovery_control(np.asarray(p_values), method="bh")]


def _sort_key(verdict: Verdict) -> tuple[str, ...]:
    """Group by op and workload so the impls of one configuration sit together."""
    return (verdict.op, verdict.workload, verdict.precision, verdict.impl, verdict.task_key)


def compare_rows(
    baseline: Side | Sequence[ResultRow],
    candidate: Side | Sequence[ResultRow],
    factor: float = DEFAULT_FACTOR,
    alpha: float = DEFAULT_ALPHA,
    check_code_version: bool = True,
    across_hosts: bool = False,
    metric: str = METRIC_TIME,
    round_test: str = ROUND_TEST_PAIRED,
    process_sd: float | None = None,
) -> list[Verdict]:
    """One verdict per task_key on either side, sorted; check_code_version=False for A/B runs.

    Each side is a Side, or just its rows. metric "instructions" compares instructions per
    call by the factor alone. With the rounds of an A/B run (on both sides), time rows are
    tested by a paired t-test on the per-round log ratios instead of a rank test on pooled
    samples. Either way the p-values are Benjamini-Hochberg adjusted over the rows. Rows of
    different policies are NOT_COMPARABLE, since a policy changes what a row's figure means.

    Without rounds, a time row's shift must also beat the spread between worker processes
    (reports/spread.py): across the replicates of a --replicates run, or, where a side has
    one, against process_sd (None and no replicates: the samples alone decide)."""
    baseline, candidate = as_side(baseline), as_side(candidate)
    # By default rows whose impl source changed are NOT_COMPARABLE (a stored baseline is stale);
    # an A/B run times both versions now, so there the changed code is what is measured.
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if round_test not in ROUND_TESTS:
        raise ValueError(f"round_test must be one of {', '.join(ROUND_TESTS)}, got "
                         f"{round_test!r}")
    if (baseline.rounds is None) != (candidate.rounds is None):
        raise ValueError("give the rounds of both sides or of neither")
    rounds = None
    if baseline.rounds is not None:
        rounds = ([{row.task_key: row.median_s for row in run if row.status == STATUS_OK}
                   for run in baseline.rounds],
                  [{row.task_key: row.median_s for row in run if row.status == STATUS_OK}
                   for run in candidate.rounds])
    policy_difference = _policy_difference(baseline.policy, candidate.policy)
    # A --replicates run holds each task_key once per fresh worker process: pool them.
    pooled = (pool_replicates(baseline.rows, "baseline"),
              pool_replicates(candidate.rows, "candidate"))
    baseline_by_key = _index_by_task_key(
        pooled[0].rows if pooled[0] else baseline.rows, "baseline")
    candidate_by_key = _index_by_task_key(
        pooled[1].rows if pooled[1] else candidate.rows, "candidate")
    verdicts = []
    for task_key, candidate_row in candidate_by_key.items():
        baseline_row = baseline_by_key.get(task_key)
        if baseline_row is None:
            reason = "" if candidate_row.status == STATUS_OK else _describe_status(candidate_row)
            verdicts.append(_make(candidate_row, "NEW", reason=reason))
        elif policy_difference:
            verdicts.append(_make(candidate_row, "NOT_COMPARABLE",
                                  reason=f"different timing policies: {policy_difference}"))
        else:
            verdicts.append(
                _compare_pair(baseline_row, candidate_row, (baseline, candidate), factor,
                              check_code_version, across_hosts, metric, rounds)
            )
    for task_key, baseline_row in baseline_by_key.items():
        if task_key not in candidate_by_key:
            verdicts.append(_make(baseline_row, "MISSING", reason="not in the candidate run"))
    tested = [index for index, verdict in enumerate(verdicts) if verdict.verdict == _TESTED]
    p_values = [verdicts[index].p_value for index in tested]
    if rounds is not None and round_test == ROUND_TEST_MODERATED and tested:
        p_values = moderated_p_values([np.log(_round_ratios(verdicts[index].task_key, rounds))
                                       for index in tested])
    adjusted = adjust_p_values(p_values)
    processes = [None] * len(tested)
    if rounds is None and metric == METRIC_TIME and tested:
        processes = across_processes([verdicts[index].task_key for index in tested], pooled,
                                     (baseline_by_key, candidate_by_key), process_sd)
    for index, p_adjusted, process in zip(tested, adjusted, processes):
        if process is not None and math.isfinite(process[2]):  # replicates' geometric means
            verdicts[index] = replace(verdicts[index], ratio=process[2])
        if process is not None:
            process = process[:2]
        verdicts[index] = _decide(verdicts[index], p_adjusted, factor, alpha, process)
    return sorted(verdicts, key=_sort_key)


def _policy_difference(baseline_policy: dict | None, candidate_policy: dict | None) -> str:
    """'min_run_time_s: 0.3 vs 1' for policies that differ; '' when equal or not both known."""
    if baseline_policy is None or candidate_policy is None:
        return ""
    return "; ".join(differing_facts(baseline_policy, candidate_policy))


def geometric_mean_ratio(verdicts: Iterable[Verdict]) -> float:
    """Geometric mean of the finite, positive ratios; NaN when there are none."""
    return geometric_mean(verdict.ratio for verdict in verdicts)


def count_verdicts(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """How many rows got each verdict, in VERDICTS order, zero counts left out."""
    counts = {name: 0 for name in VERDICTS}
    for verdict in verdicts:
        counts[verdict.verdict] += 1
    return {name: count for name, count in counts.items() if count}
