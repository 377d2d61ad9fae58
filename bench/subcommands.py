"""Subcommands of run_bench.py beside the sweep: report, check, analyze, tt-study."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def report(argv: list[str]) -> int:
    """Build the HTML/markdown report of one or more run directories."""
    parser = argparse.ArgumentParser(prog="run_bench.py report",
                                     description="Build RUN_DIR/report/ from results.csv")
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="report directory (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    for directory in args.run_dirs:
        if not (directory / "results.csv").is_file():
            print(f"run_bench.py report: error: {directory}: no results.csv; give a run "
                  "directory written by run_bench.py", file=sys.stderr)
            return 2
    from reports.build import build_report

    path = build_report(list(args.run_dirs), args.out)
    print(f"report: {path / 'index.html'}")
    return 0


def check(argv: list[str]) -> int:
    """Compare a candidate run against a baseline (see reports.check)."""
    from reports.check import main

    return main(argv, program="python run_bench.py check")


def analyze(argv: list[str]) -> int:
    """Reuse-distance analysis of a workload's index trace."""
    from bench.analyze import main

    return main(argv)


def tt_study(argv: list[str]) -> int:
    """TT-Rec memory/accuracy/time trade-off study (see bench.ttrec.study)."""
    from bench.ttrec.study import main

    return main(argv)


def dispatch(name: str, argv: list[str]) -> int:
    """Run a subcommand by name."""
    return {"report": report, "check": check, "analyze": analyze,
            "tt-study": tt_study}[name](argv)
