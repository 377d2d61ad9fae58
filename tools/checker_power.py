#!/usr/bin/env python
"""Measure a regression check: false alarms on identical code, detection of 25% more work."""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

from bench.commands import ab  # noqa: E402
from bench.run import ci_sweep  # noqa: E402
from reports.check import CheckInputError, check_verdicts, load_results  # noqa: E402
from reports.compare import (DEFAULT_ALPHA, DEFAULT_FACTOR, ROUND_TESTS,  # noqa: E402
                             compare_rows, count_verdicts, geometric_mean_ratio)
from reports.spread import replicate_index  # noqa: E402

# What is measured: the wall-clock check of two single runs (`check --ci`), the interleaved
# A/B check (`check --ab`, each pair is one A/B run of --rounds rounds), or the instruction
# gate (`check --metric instructions`, two instruction-count sweeps), or the plain check of
# two sweeps run with --replicates K, evaluated on their first k replicates for each k
# (k = 1: the default sweep, one worker process a configuration).
MODES = ("ci", "ab", "instructions", "replicates")
# --mode replicates: issue 24's sweep, unless --sweep-args replaces it.
REPLICATES_SWEEP = ("--ops", "sls,fc,interaction", "--workload", "smoke", "--precision", "fp32",
                    "--threads", "1", "--no-report")
DEFAULT_REPLICATES = 3

DEFAULT_PAIRS = 10
# 5 calls against 4 is exactly 25% more work on every row (bench/commands/sweep.py --calls-per-rep).
POWER_BASELINE_CALLS = 4
POWER_CANDIDATE_CALLS = 5
# Verdicts of rows that were tested; the others (NEW, MISSING, errors) say nothing on noise.
TESTED_VERDICTS = ("IMPROVED", "REGRESSED", "UNCHANGED", "INCONCLUSIVE")
CSV_COLUMNS = ("mode", "experiment", "pair", "setting", "rounds", "factor", "alpha",
               "rows_tested",
               "regressed", "improved", "unchanged", "inconclusive", "other", "geomean_ratio",
               "largest_change", "baseline_run", "candidate_run")


@dataclass(frozen=True)
class Setting:
    """One (factor, alpha) at which every pair is checked."""

    name: str
    factor: float
    alpha: float
    round_test: str = ab.ROUND_TEST  # --mode ab: how the rounds' log ratios are tested


def build_parser() -> argparse.ArgumentParser:
    """The tool's options."""
    parser = argparse.ArgumentParser(
        prog="tools/checker_power.py",
        description="(a) false alarms: P A/A pairs of fresh CI sweeps of the same code checked "
                    "against each other; (b) power: P pairs with the baseline at "
                    f"--calls-per-rep {POWER_BASELINE_CALLS} and the candidate at "
                    f"{POWER_CANDIDATE_CALLS} (25%% more work). Each pair is checked at the CI "
                    "setting and at the default setting. Run it on a quiet machine (or on the "
                    "CI runner whose noise it should measure): 4P sweeps of ~1 min each.")
    parser.add_argument("--mode", choices=MODES, default="ci",
                        help="ci: two fresh wall-clock CI sweeps per pair (check --ci); ab: one "
                             "interleaved A/B run of --rounds rounds per pair (check --ab); "
                             "instructions: two instruction-count sweeps per pair (the CI gate, "
                             "check --metric instructions; needs valgrind). Default ci")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                        help=f"pairs per experiment (default {DEFAULT_PAIRS})")
    parser.add_argument("--rounds", type=int, default=ab.DEFAULT_ROUNDS,
                        help=f"--mode ab: rounds per A/B run (default {ab.DEFAULT_ROUNDS})")
    parser.add_argument("--replicates", type=int, default=DEFAULT_REPLICATES,
                        help=f"--mode replicates: K of each sweep's --replicates (default "
                             f"{DEFAULT_REPLICATES})")
    parser.add_argument("--evaluate-replicates",
                        help="--mode replicates: check each pair on its first k replicates, for "
                             "each k in this comma list (1..--replicates; default 1 and "
                             "--replicates); replicate k of a sweep runs after replicate k-1 of "
                             "every configuration, so a prefix is what --replicates k runs")
    parser.add_argument("--evaluate-rounds",
                        help="--mode ab: also check each pair on only its first K rounds, for "
                             "each K in this comma list (2..--rounds; default: --rounds only). "
                             "The first K rounds are exactly what `check --ab --rounds K` runs "
                             "(A B, B A, ...), so one long run measures several round counts")
    parser.add_argument("--factor", type=float,
                        help=f"the checked setting's factor (default: ci {ci_sweep.CI_FACTOR:g}, "
                             f"ab {DEFAULT_FACTOR:g}, instructions "
                             f"{ci_sweep.INSTRUCTION_FACTOR:g})")
    parser.add_argument("--alpha", type=float,
                        help=f"its alpha (default: ci {ci_sweep.CI_ALPHA:g}, ab "
                             f"{DEFAULT_ALPHA:g}; instruction counts use none)")
    parser.add_argument("--default-factor", type=float, default=DEFAULT_FACTOR,
                        help=f"--mode ci: the second setting's factor (default "
                             f"{DEFAULT_FACTOR:g})")
    parser.add_argument("--default-alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"--mode ci: the second setting's alpha (default "
                             f"{DEFAULT_ALPHA:g})")
    parser.add_argument("--experiments", default="false_positive,power",
                        help="which to run: false_positive, power or both (default both)")
    parser.add_argument("--out", type=Path,
                        help="directory for the runs and checker_power.csv "
                             "(default results/checker-power/<timestamp>)")
    parser.add_argument("--sweep-args",
                        help="replace the CI sweep's arguments (one quoted string), e.g. for a "
                             "quick trial of this tool")
    return parser


def _largest_change(verdicts) -> float:
    """The largest |ratio - 1| of the tested rows (A/A: the spread a factor must clear)."""
    changes = [abs(v.ratio - 1) for v in verdicts
               if v.verdict in TESTED_VERDICTS and math.isfinite(v.ratio)]
    return round(max(changes), 6) if changes else math.nan


def _round_number(path: Path) -> int:
    """k of an A/B round directory A-k or B-k."""
    return int(path.name.split("-", 1)[1])


def _first_rounds(directory: Path, side: str, count: int) -> list[Path]:
    """The first `count` round directories of one side of an A/B pair."""
    return sorted(directory.glob(f"{side}-*"), key=_round_number)[:count]


def _first_replicates(path: Path, count: int) -> list:
    """The rows of a --replicates run's first `count` replicates (1: as a plain run)."""
    rows = [row for row in load_results(path) if (replicate_index(row) or 1) <= count]
    if count == 1:  # a plain run's rows carry no replicate index
        for row in rows:
            metrics = json.loads(row.metrics or "{}")
            metrics.pop("replicate", None)
            metrics.pop("replicates", None)
            row.metrics = json.dumps(metrics)
    return rows


def _verdicts(mode: str, baseline: Path, candidate: Path, setting: Setting,
              rounds: int | None = None) -> list:
    """The check of one pair, as the measured command would decide it."""
    if mode == "replicates":  # rounds: here the replicates evaluated
        return check_verdicts(_first_replicates(baseline, rounds),
                              _first_replicates(candidate, rounds), setting.factor,
                              setting.alpha)
    if mode == "ab":  # baseline/candidate are the merged A/B sides beside their A-k, B-k rounds
        a_dirs = _first_rounds(baseline.parent, "A", rounds)
        b_dirs = _first_rounds(baseline.parent, "B", rounds)
        # The merged sides of a prefix pool exactly its rounds, as check --ab would.
        prefix = baseline.parent / f"first-{rounds}"
        a_rows = ab.merged_rounds(a_dirs, "A", prefix / "A")
        b_rows = ab.merged_rounds(b_dirs, "B", prefix / "B")
        return ab.ab_verdicts(a_rows, b_rows, a_dirs, b_dirs, setting.factor, setting.alpha,
                              setting.round_test)
    if mode == "ci":  # the plain check's rule, the spread between processes included
        return check_verdicts(load_results(baseline), load_results(candidate), setting.factor,
                              setting.alpha)
    return compare_rows(load_results(baseline), load_results(candidate), factor=setting.factor,
                        alpha=setting.alpha, metric="instructions")


def _check_pair(mode: str, experiment: str, pair: int, baseline: Path, candidate: Path,
                settings: list[Setting], round_counts: list[int | None]) -> list[dict]:
    """CSV records of one pair checked at every setting (and, for ab, every round count)."""
    records = []
    for setting, rounds in itertools.product(settings, round_counts):
        verdicts = _verdicts(mode, baseline, candidate, setting, rounds)
        counts = count_verdicts(verdicts)
        tested = sum(counts.get(name, 0) for name in TESTED_VERDICTS)
        records.append({
            "mode": mode, "experiment": experiment, "pair": pair, "setting": setting.name,
            "rounds": rounds or "", "factor": setting.factor, "alpha": setting.alpha,
            "rows_tested": tested,
            "regressed": counts.get("REGRESSED", 0), "improved": counts.get("IMPROVED", 0),
            "unchanged": counts.get("UNCHANGED", 0),
            "inconclusive": counts.get("INCONCLUSIVE", 0), "other": len(verdicts) - tested,
            "geomean_ratio": round(geometric_mean_ratio(verdicts), 4),
            "largest_change": _largest_change(verdicts),
            "baseline_run": str(baseline), "candidate_run": str(candidate),
        })
    return records


def _run_pair(out: Path, experiment: str, pair: int, calls: tuple[int, int],
              sweep_args, mode: str = "ci", rounds: int = 1) -> tuple[Path, Path]:
    """Two fresh CI sweeps; odd pairs run the candidate first, so slow drift cancels.

    --mode ab: an A/B run instead, `rounds` rounds of both sides in alternating order, each
    side's rounds merged as `check --ab` merges them."""
    extra = {"instructions": ci_sweep.INSTRUCTION_SWEEP_OPTIONS,
             "replicates": ("--replicates", str(rounds))}.get(mode, ())
    if mode != "ab":
        sides = [("baseline", calls[0]), ("candidate", calls[1])]
        if pair % 2:
            sides.reverse()
        run_dirs = {}
        for side, calls_per_rep in sides:
            run_dirs[side] = ci_sweep.run_ci_sweep(
                out, f"{experiment}-{pair}-{side}",
                extra_args=(*extra, "--calls-per-rep", str(calls_per_rep)),
                sweep_args=sweep_args, label=f"{experiment} pair {pair} {side}")
        return run_dirs["baseline"], run_dirs["candidate"]
    directory = out / f"{experiment}-{pair}"
    a_dirs, b_dirs = [], []
    for round_number in range(1, rounds + 1):
        sides = [("A", calls[0], a_dirs), ("B", calls[1], b_dirs)]
        if round_number % 2 == 0:  # A B, B A, ... as check --ab runs them
            sides.reverse()
        for side, calls_per_rep, dirs in sides:
            dirs.append(ci_sweep.run_ci_sweep(
                directory, f"{side}-{round_number}",
                extra_args=("--calls-per-rep", str(calls_per_rep)), sweep_args=sweep_args,
                label=f"{experiment} pair {pair} {side} round {round_number}/{rounds}"))
    ab.merged_rounds(a_dirs, "A", directory / "A")
    ab.merged_rounds(b_dirs, "B", directory / "B")
    return directory / "A", directory / "B"


def _share(count: int, total: int) -> str:
    """'count/total (percent)' so that small denominators stay visible."""
    percent = f"{100 * count / total:.1f}%" if total else "-"
    return f"{count}/{total} ({percent})"


def summary_table(records: list[dict]) -> str:
    """Markdown table: per experiment and setting, rows and checks flagged, with counts."""
    lines = [
        "| experiment | setting | factor | alpha | pairs | rows REGRESSED | rows IMPROVED | "
        "rows INCONCLUSIVE | checks failing (any REGRESSED) | "
        "geomean ratio (median over pairs) | largest row change (any pair) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        unit = "replicates" if record["mode"] == "replicates" else "rounds"
        setting = record["setting"] + (f", {record['rounds']} {unit}" if record["rounds"] else "")
        groups.setdefault((record["experiment"], setting), []).append(record)
    for (experiment, setting), group in groups.items():
        tested = sum(record["rows_tested"] for record in group)
        ratios = sorted(record["geomean_ratio"] for record in group
                        if math.isfinite(record["geomean_ratio"]))
        median_ratio = f"{ratios[len(ratios) // 2]:.3f}" if ratios else "-"
        failing = sum(1 for record in group if record["regressed"])
        changes = [record["largest_change"] for record in group
                   if math.isfinite(record["largest_change"])]
        largest = f"{100 * max(changes):.3g}%" if changes else "-"
        lines.append(
            f"| {experiment} | {setting} | {group[0]['factor']:g} | {group[0]['alpha']:g} | "
            f"{len(group)} | {_share(sum(r['regressed'] for r in group), tested)} | "
            f"{_share(sum(r['improved'] for r in group), tested)} | "
            f"{_share(sum(r['inconclusive'] for r in group), tested)} | "
            f"{_share(failing, len(group))} | {median_ratio} | {largest} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the experiments, write the CSV, print the summary; exit 2 on bad input."""
    args = build_parser().parse_args(argv)
    experiments = [name.strip() for name in args.experiments.split(",") if name.strip()]
    unknown = set(experiments) - {"false_positive", "power"}
    problems = []
    if args.pairs < 1:
        problems.append(f"--pairs must be >= 1, got {args.pairs}")
    if args.rounds < 2:
        problems.append(f"--rounds must be >= 2 (the paired test needs two), got {args.rounds}")
    round_counts: list[int | None] = [None]
    if args.mode == "replicates":
        try:
            listed = (f"1,{args.replicates}" if args.evaluate_replicates is None
                      else args.evaluate_replicates)
            round_counts = sorted({int(item) for item in listed.split(",")})
        except ValueError:
            round_counts = []
        if args.replicates < 1 or not round_counts or not all(
                1 <= count <= args.replicates for count in round_counts):
            problems.append(f"--evaluate-replicates must list integers in 1..{args.replicates} "
                            f"(--replicates >= 1), got {args.evaluate_replicates!r}")
    elif args.evaluate_replicates:
        problems.append("--evaluate-replicates applies to --mode replicates only")
    if args.mode == "ab":
        try:
            listed = str(args.rounds) if args.evaluate_rounds is None else args.evaluate_rounds
            round_counts = sorted({int(item) for item in listed.split(",")})
        except ValueError:
            round_counts = []
        if not round_counts or not all(2 <= count <= args.rounds for count in round_counts):
            problems.append(f"--evaluate-rounds must list integers in 2..{args.rounds} "
                            f"(--rounds), got {args.evaluate_rounds!r}")
    elif args.evaluate_rounds:
        problems.append("--evaluate-rounds applies to --mode ab only")
    defaults = {"ci": (ci_sweep.CI_FACTOR, ci_sweep.CI_ALPHA),
                "ab": (DEFAULT_FACTOR, DEFAULT_ALPHA),
                "instructions": (ci_sweep.INSTRUCTION_FACTOR, DEFAULT_ALPHA),
                "replicates": (DEFAULT_FACTOR, DEFAULT_ALPHA)}[args.mode]
    args.factor = defaults[0] if args.factor is None else args.factor
    args.alpha = defaults[1] if args.alpha is None else args.alpha
    if unknown or not experiments:
        problems.append(f"--experiments: choose from false_positive, power (got "
                        f"{args.experiments!r})")
    for name in ("factor", "default_factor"):
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("alpha", "default_alpha"):
        if not 0 < getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be in (0, 1)")
    if problems:
        print(f"checker_power.py: error: {problems[0]}", file=sys.stderr)
        return 2
    settings = [Setting("check" if args.mode == "replicates" else args.mode, args.factor,
                        args.alpha)]
    if args.mode == "ci":
        settings.append(Setting("default", args.default_factor, args.default_alpha))
    if args.mode == "ab":  # both round tests on the same rounds: which one check --ab uses
        settings = [Setting(f"ab {test}", args.factor, args.alpha, test) for test in ROUND_TESTS]
    sweep_args = shlex.split(args.sweep_args) if args.sweep_args else (
        list(REPLICATES_SWEEP) if args.mode == "replicates" else None)
    out = args.out or Path("results/checker-power") / (
        f"{args.mode}-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    plans = {"false_positive": (1, 1), "power": (POWER_BASELINE_CALLS, POWER_CANDIDATE_CALLS)}
    records: list[dict] = []
    csv_path = out / "checker_power.csv"
    interrupted = False
    try:
        for experiment in experiments:
            for pair in range(1, args.pairs + 1):
                baseline, candidate = _run_pair(
                    out, experiment, pair, plans[experiment], sweep_args, args.mode,
                    args.replicates if args.mode == "replicates" else args.rounds)
                records.extend(_check_pair(args.mode, experiment, pair, baseline, candidate,
                                           settings, round_counts))
                # Rewritten after every pair: an interrupted study keeps what it measured.
                with open(csv_path, "w", newline="", encoding="utf-8") as handle:
                    writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
                    writer.writeheader()
                    writer.writerows(records)
    except (ci_sweep.CiSweepError, CheckInputError, ValueError) as error:
        print(f"checker_power.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("checker_power.py: interrupted; summarising the pairs so far", file=sys.stderr)
        interrupted = True
    if not records:
        return 130
    print(f"per-pair counts: {csv_path}\n")
    print(summary_table(records))
    print("\nrows REGRESSED in false_positive = false alarms per row; checks failing = share of "
          "CI checks that would fail on identical code. In power, every row does 25% more "
          "work, so rows REGRESSED = detection power.")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
