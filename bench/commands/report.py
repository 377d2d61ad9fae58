"""`run_bench.py report RUN_DIR...`: build the HTML/markdown report of one or more runs."""

from __future__ import annotations

from pathlib import Path

from bench.commands.common import OneLineParser, UsageError
from bench.records import RESULTS_FILENAME


def build_parser() -> OneLineParser:
    """Arguments of the report subcommand."""
    parser = OneLineParser(prog="run_bench.py report",
                           description="Build RUN_DIR/report/ from results.csv")
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="report directory (default: RUN_DIR/report)")
    return parser


def main(argv: list[str]) -> int:
    """Build the HTML/markdown report of one or more run directories."""
    args = build_parser().parse_args(argv)
    for directory in args.run_dirs:
        if not (directory / RESULTS_FILENAME).is_file():
            raise UsageError(f"{directory}: no results.csv; give a run directory written by "
                             "run_bench.py")
    from reports.build import build_report

    path = build_report(list(args.run_dirs), args.out)
    print(f"report: {path / 'index.html'}")
    return 0
