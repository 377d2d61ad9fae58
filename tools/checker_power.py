#!/usr/bin/env python
"""Measure the regression checker: false alarms on identical code, detection of 25% more work."""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

from bench.run import ci_sweep  # noqa: E402
from reports.check import CheckInputError, load_results  # noqa: E402
from reports.compare import (DEFAULT_ALPHA, DEFAULT_FACTOR, compare_rows,  # noqa: E402
                             count_verdicts, geometric_mean_ratio)

DEFAULT_PAIRS = 10
# 5 calls against 4 is exactly 25% more work on every row (bench/commands/sweep.py --calls-per-rep).
POWER_BASELINE_CALLS = 4
POWER_CANDIDATE_CALLS = 5
# Verdicts that come from a rank test; the others (NEW, MISSING, errors) say nothing on noise.
TESTED_VERDICTS = ("IMPROVED", "REGRESSED", "UNCHANGED")
CSV_COLUMNS = ("experiment", "pair", "setting", "factor", "alpha", "rows_tested", "regressed",
               "improved", "unchanged", "other", "geomean_ratio", "baseline_run",
               "candidate_run")


@dataclass(frozen=True)
class Setting:
    """One (factor, alpha) at which every pair is checked."""

    name: str
    factor: float
    alpha: float


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
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                        help=f"pairs per experiment (default {DEFAULT_PAIRS})")
    parser.add_argument("--factor", type=float, default=ci_sweep.CI_FACTOR,
                        help=f"the CI factor (default {ci_sweep.CI_FACTOR:g})")
    parser.add_argument("--alpha", type=float, default=ci_sweep.CI_ALPHA,
                        help=f"the CI alpha (default {ci_sweep.CI_ALPHA:g})")
    parser.add_argument("--default-factor", type=float, default=DEFAULT_FACTOR,
                        help=f"the second setting's factor (default {DEFAULT_FACTOR:g})")
    parser.add_argument("--default-alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"the second setting's alpha (default {DEFAULT_ALPHA:g})")
    parser.add_argument("--experiments", default="false_positive,power",
                        help="which to run: false_positive, power or both (default both)")
    parser.add_argument("--out", type=Path,
                        help="directory for the runs and checker_power.csv "
                             "(default results/checker-power/<timestamp>)")
    parser.add_argument("--sweep-args",
                        help="replace the CI sweep's arguments (one quoted string), e.g. for a "
                             "quick trial of this tool")
    return parser


def _check_pair(experiment: str, pair: int, baseline: Path, candidate: Path,
                settings: list[Setting]) -> list[dict]:
    """CSV records of one pair checked at every setting."""
    baseline_rows, candidate_rows = load_results(baseline), load_results(candidate)
    records = []
    for setting in settings:
        verdicts = compare_rows(baseline_rows, candidate_rows, factor=setting.factor,
                                alpha=setting.alpha)
        counts = count_verdicts(verdicts)
        tested = sum(counts.get(name, 0) for name in TESTED_VERDICTS)
        records.append({
            "experiment": experiment, "pair": pair, "setting": setting.name,
            "factor": setting.factor, "alpha": setting.alpha, "rows_tested": tested,
            "regressed": counts.get("REGRESSED", 0), "improved": counts.get("IMPROVED", 0),
            "unchanged": counts.get("UNCHANGED", 0), "other": len(verdicts) - tested,
            "geomean_ratio": round(geometric_mean_ratio(verdicts), 4),
            "baseline_run": str(baseline), "candidate_run": str(candidate),
        })
    return records


def _run_pair(out: Path, experiment: str, pair: int, calls: tuple[int, int],
              sweep_args) -> tuple[Path, Path]:
    """Two fresh CI sweeps; odd pairs run the candidate first, so slow drift cancels."""
    sides = [("baseline", calls[0]), ("candidate", calls[1])]
    if pair % 2:
        sides.reverse()
    run_dirs = {}
    for side, calls_per_rep in sides:
        run_id = f"{experiment}-{pair}-{side}"
        run_dirs[side] = ci_sweep.run_ci_sweep(
            out, run_id, extra_args=("--calls-per-rep", str(calls_per_rep)),
            sweep_args=sweep_args, label=f"{experiment} pair {pair} {side}")
    return run_dirs["baseline"], run_dirs["candidate"]


def _share(count: int, total: int) -> str:
    """'count/total (percent)' so that small denominators stay visible."""
    percent = f"{100 * count / total:.1f}%" if total else "-"
    return f"{count}/{total} ({percent})"


def summary_table(records: list[dict]) -> str:
    """Markdown table: per experiment and setting, rows and checks flagged, with counts."""
    lines = [
        "| experiment | setting | factor | alpha | pairs | rows REGRESSED | rows IMPROVED | "
        "checks failing (any REGRESSED) | geomean ratio (median over pairs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["experiment"], record["setting"]), []).append(record)
    for (experiment, setting), group in groups.items():
        tested = sum(record["rows_tested"] for record in group)
        ratios = sorted(record["geomean_ratio"] for record in group
                        if math.isfinite(record["geomean_ratio"]))
        median_ratio = f"{ratios[len(ratios) // 2]:.3f}" if ratios else "-"
        failing = sum(1 for record in group if record["regressed"])
        lines.append(
            f"| {experiment} | {setting} | {group[0]['factor']:g} | {group[0]['alpha']:g} | "
            f"{len(group)} | {_share(sum(r['regressed'] for r in group), tested)} | "
            f"{_share(sum(r['improved'] for r in group), tested)} | "
            f"{_share(failing, len(group))} | {median_ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the experiments, write the CSV, print the summary; exit 2 on bad input."""
    args = build_parser().parse_args(argv)
    experiments = [name.strip() for name in args.experiments.split(",") if name.strip()]
    unknown = set(experiments) - {"false_positive", "power"}
    problems = []
    if args.pairs < 1:
        problems.append(f"--pairs must be >= 1, got {args.pairs}")
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
    settings = [Setting("ci", args.factor, args.alpha),
                Setting("default", args.default_factor, args.default_alpha)]
    sweep_args = shlex.split(args.sweep_args) if args.sweep_args else None
    out = args.out or Path("results/checker-power") / datetime.datetime.now().strftime(
        "%Y%m%d-%H%M%S")
    plans = {"false_positive": (1, 1), "power": (POWER_BASELINE_CALLS, POWER_CANDIDATE_CALLS)}
    records: list[dict] = []
    csv_path = out / "checker_power.csv"
    interrupted = False
    try:
        for experiment in experiments:
            for pair in range(1, args.pairs + 1):
                baseline, candidate = _run_pair(out, experiment, pair, plans[experiment],
                                                sweep_args)
                records.extend(_check_pair(experiment, pair, baseline, candidate, settings))
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
