"""`check --ab REV`: time a base revision (A) and the working tree (B) alternately in one job."""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.records import ARGS_FILENAME, SchemaError, read_json
from bench.run import ci_sweep, lifeline
from reports.check import (
    EXIT_CANNOT_COMPARE,
    VERDICTS_FILENAME,
    CheckInputError,
    load_results,
    report_verdicts,
)
from reports.compare import ROUND_TEST_MODERATED, Side, compare_rows
from reports.merge import MergeError, merge_runs, write_results

# 3 rounds with the moderated t met the issue's targets on a quiet VM (README, "Regression
# checks": 0 A/A false alarms, 25% more work found in 213 of 216 rows); the per-row paired t-test
# (df 2) found 80% at 3 rounds and needed 5.
DEFAULT_ROUNDS = 3
# How check --ab tests each row's per-round log ratios (reports/compare.py ROUND_TESTS).
ROUND_TEST = ROUND_TEST_MODERATED
DEFAULT_AB_ROOT = Path("results/ab")


class AbError(Exception):
    """An A/B run that cannot start or finish; the message is one line."""


def _git(root: Path, *arguments: str) -> subprocess.CompletedProcess:
    """Run git in root, capturing its output."""
    return subprocess.run(["git", "-C", str(root), *arguments], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


def resolve_revision(revision: str, root: Path = ci_sweep.PROJECT_ROOT) -> str:
    """The full commit hash of revision in the repository at root; AbError if there is none."""
    if not revision or revision.startswith("-"):
        raise AbError(f"{revision!r} is not a revision; give one such as HEAD~1 or origin/main")
    if _git(root, "rev-parse", "--git-dir").returncode != 0:
        raise AbError(f"--ab needs a git checkout, and {root} is not one")
    result = _git(root, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    if result.returncode != 0 or not result.stdout.strip():
        raise AbError(f"unknown revision {revision!r} (git rev-parse found no commit)")
    return result.stdout.strip()


@contextlib.contextmanager
def base_worktree(commit: str, root: Path = ci_sweep.PROJECT_ROOT) -> Iterator[Path]:
    """A detached `git worktree` of commit in a temporary directory, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="dlrm-bench-ab-"))
    worktree = parent / "base"
    try:
        added = _git(root, "worktree", "add", "--detach", "--quiet", str(worktree), commit)
        if added.returncode != 0:
            message = " ".join(added.stderr.split()) or f"exit {added.returncode}"
            raise AbError(f"git worktree add {commit[:12]} failed: {message}")
        yield worktree
    finally:
        # Clean up even on error or Ctrl-C: a stale worktree blocks the next `worktree add`.
        _git(root, "worktree", "remove", "--force", str(worktree))
        shutil.rmtree(parent, ignore_errors=True)
        _git(root, "worktree", "prune")


def merged_rounds(run_dirs: Sequence[Path], run_id: str, destination: Path) -> list:
    """Merge the rounds of one side into destination/results.csv; returns the rows."""
    try:
        rows = merge_runs([load_results(directory) for directory in run_dirs], run_id=run_id)
    except (CheckInputError, MergeError) as error:
        raise AbError(f"cannot merge the {run_id} runs: {error}") from error
    write_results(rows, destination)
    return rows


def _timing_policy(run_dirs: Sequence[Path]) -> dict | None:
    """The timing policy the runs of one side recorded in args.json (None if not recorded)."""
    try:
        policies = [read_json(Path(path) / ARGS_FILENAME).get("timing_policy")
                    for path in run_dirs]
    except (SchemaError, AttributeError):
        return None
    if any(policy != policies[0] for policy in policies) or not isinstance(policies[0], dict):
        return None
    return policies[0]


def ab_verdicts(a_rows: list, b_rows: list, a_dirs: Sequence[Path], b_dirs: Sequence[Path],
                factor: float, alpha: float, round_test: str = ROUND_TEST) -> list:
    """Verdicts of B against A: each row tested on its rounds' log ratios (round_test)."""
    # Each round pairs an A run with a B run: the paired test on their log ratios treats
    # the run, not the sample, as the replicate. The timing policies recorded by both
    # revisions must agree, or their times mean different things.
    return compare_rows(Side(a_rows, rounds=[load_results(path) for path in a_dirs],
                             policy=_timing_policy(a_dirs)),
                        Side(b_rows, rounds=[load_results(path) for path in b_dirs],
                             policy=_timing_policy(b_dirs)),
                        factor=factor, alpha=alpha, check_code_version=False, across_hosts=True,
                        round_test=round_test)


def run_ab(
    revision: str,
    rounds: int = DEFAULT_ROUNDS,
    factor: float = 0.10,
    alpha: float = 0.01,
    out_dir: str | Path | None = None,
    sweep_args: Sequence[str] | None = None,
    root: Path = ci_sweep.PROJECT_ROOT,
    python: str = sys.executable,
) -> int:
    """Run the CI sweep A B A B ... (A: revision, B: the working tree); 0, 1 or 2 like check."""
    # Each round writes OUT/A-k and OUT/B-k; OUT/A and OUT/B hold each side's rounds merged
    # (samples pooled per task_key), OUT/verdicts.csv the comparison. Interleaving spreads slow
    # drift of a shared machine over both sides instead of onto one. sweep_args replaces the
    # CI sweep's arguments (tests use a tiny sweep).
    try:
        if rounds < 1:
            raise AbError(f"--rounds must be >= 1, got {rounds}")
        commit = resolve_revision(revision, root)
        out = Path(out_dir) if out_dir is not None else (
            DEFAULT_AB_ROOT / ci_sweep.new_run_id(f"{commit[:8]}-"))
        a_dirs: list[Path] = []
        b_dirs: list[Path] = []
        with lifeline.terminate_as_interrupt(), base_worktree(commit, root) as worktree:
            for round_number in range(1, rounds + 1):
                # The base runs its own run_bench.py and bench package from the worktree.
                run_a = functools.partial(
                    ci_sweep.run_ci_sweep, out, f"A-{round_number}", cwd=worktree, python=python,
                    sweep_args=sweep_args, label=f"A ({revision}) round {round_number}/{rounds}")
                run_b = functools.partial(
                    ci_sweep.run_ci_sweep, out, f"B-{round_number}", cwd=root, python=python,
                    sweep_args=sweep_args, label=f"B (working tree) round {round_number}/{rounds}")
                # A B, B A, A B, ...: a fixed order let whichever side ran second pay for
                # the first one's after-effects (an A/A run here found B 12% slower).
                if round_number % 2:
                    a_dirs.append(run_a())
                    b_dirs.append(run_b())
                else:
                    b_dirs.append(run_b())
                    a_dirs.append(run_a())
        a_rows = merged_rounds(a_dirs, "A", out / "A")
        b_rows = merged_rounds(b_dirs, "B", out / "B")
        # Changed impl code is what an A/B run is for, so code versions are not compared; both
        # sides ran on this host by construction, so fingerprints that differ can only come
        # from a revision that computes them another way (across_hosts: compare anyway).
        verdicts = ab_verdicts(a_rows, b_rows, a_dirs, b_dirs, factor, alpha)
    except (AbError, ci_sweep.CiSweepError, ValueError) as error:
        print(f"check: --ab: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_CANNOT_COMPARE
    return report_verdicts(
        verdicts,
        f"{out / 'A' / 'results.csv'} ({revision} = {commit[:12]}, {rounds} rounds merged)",
        f"{out / 'B' / 'results.csv'} (working tree, {rounds} rounds merged)",
        factor,
        alpha,
        out / VERDICTS_FILENAME,
        failure_advice=(f"the working tree is slower than {revision} where REGRESSED; "
                        f"rounds and merged runs are in {out}"),
    )
