"""`run_bench.py check`: regression verdicts of a candidate run against a baseline (or an A/B)."""

from __future__ import annotations

import argparse
import sys

from bench.commands.common import UsageError

CHECK_PROGRAM = "python run_bench.py check"


def _check_parser() -> argparse.ArgumentParser:
    """reports.check's options, plus the CI sweep, --ci and --ab."""
    from bench.commands import ab
    from bench.run import ci_sweep
    from reports.check import build_parser

    parser = build_parser(CHECK_PROGRAM, candidate_required=False)
    parser.description = (
        "Tell real performance regressions from noise. Without --candidate, run the CI sweep "
        "now (bench/run/ci_sweep.py, into results/ci/) and check it; without --baseline, check "
        "against the committed baseline for its fingerprint (results/baselines/). Exit 0: no "
        "regression, 1: regression, 2: cannot compare.")
    # None = not given, so that --ci can choose its own values.
    parser.set_defaults(factor=None, alpha=None)
    parser.add_argument("--ci", action="store_true",
                        help=f"CI mode: factor {ci_sweep.CI_FACTOR:g} and alpha "
                             f"{ci_sweep.CI_ALPHA:g} unless given (sized for shared runners; "
                             f"with --metric instructions the factor is "
                             f"{ci_sweep.INSTRUCTION_FACTOR:g}), "
                             "and exit 0 with a note when there is no baseline for this "
                             "fingerprint yet")
    parser.add_argument("--ci-out", default=str(ci_sweep.DEFAULT_CI_ROOT),
                        help="where the CI sweep's run goes when there is no --candidate")
    parser.add_argument("--ab", metavar="REV",
                        help="A/B in one job: run the CI sweep alternately on git revision REV "
                             "(a temporary worktree) and on this working tree, merge each "
                             "side's rounds and compare them; --out-dir is the A/B directory "
                             f"(default {ab.DEFAULT_AB_ROOT}/<id>)")
    parser.add_argument("--rounds", type=int,
                        help=f"--ab: rounds of A then B (default {ab.DEFAULT_ROUNDS})")
    return parser


def main(argv: list[str]) -> int:
    """Compare a candidate run (default: the CI sweep, run now) against a baseline."""
    from bench.run import ci_sweep
    from reports.check import EXIT_CANNOT_COMPARE, execute
    from reports.compare import DEFAULT_ALPHA, DEFAULT_FACTOR

    args = _check_parser().parse_args(argv)
    counting = args.metric == "instructions"
    args.factor = args.factor if args.factor is not None else (
        ci_sweep.INSTRUCTION_FACTOR if counting else
        ci_sweep.CI_FACTOR if args.ci else DEFAULT_FACTOR)
    args.alpha = args.alpha if args.alpha is not None else (
        ci_sweep.CI_ALPHA if args.ci else DEFAULT_ALPHA)
    if args.ab is not None and counting:
        raise UsageError("--ab interleaves wall-clock runs of two revisions; instruction "
                         "counts need no interleaving: compare two --metric instructions runs "
                         "with --baseline and --candidate")
    if args.ab is not None:
        clashing = [option for option, value in (("--candidate", args.candidate),
                                                 ("--baseline", args.baseline),
                                                 ("--update-baseline", args.update_baseline),
                                                 # --ab's rounds are its replicates.
                                                 ("--process-sd", args.process_sd is not None))
                    if value]
        if clashing:
            raise UsageError(f"--ab compares two revisions it runs itself; drop "
                             f"{', '.join(clashing)}")
        from bench.commands import ab

        rounds = ab.DEFAULT_ROUNDS if args.rounds is None else args.rounds
        return ab.run_ab(args.ab, rounds, factor=args.factor, alpha=args.alpha,
                         out_dir=args.out_dir)
    if args.rounds is not None:
        raise UsageError("--rounds applies to --ab only")
    if args.candidate is None:
        try:
            extra = ci_sweep.INSTRUCTION_SWEEP_OPTIONS if counting else ()
            args.candidate = str(ci_sweep.run_ci_sweep(
                args.ci_out, ci_sweep.new_run_id("instructions-" if counting else ""), extra,
                label="CI sweep (instruction counts)" if counting else "CI sweep"))
        except ci_sweep.CiSweepError as error:
            print(f"check: cannot compare: {error}", file=sys.stderr)
            return EXIT_CANNOT_COMPARE
    return execute(args, CHECK_PROGRAM, missing_baseline_ok=args.ci)
