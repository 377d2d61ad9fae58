"""The regression check: load two runs, print the verdict table, write verdicts.csv, exit 0/1/2."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.records import (
    COLUMNS,
    ENV_FILENAME,
    RESULTS_FILENAME,
    STATUS_OK,
    STATUSES,
    ResultRow,
    SchemaError,
    read_rows,
    row_to_record,
    samples_from_row,
    write_atomic,
)
from reports.compare import (
    DEFAULT_ALPHA,
    DEFAULT_FACTOR,
    FAILING_VERDICTS,
    Verdict,
    compare_rows,
    count_verdicts,
    describe_fingerprints,
    differing_facts,
    fingerprint_mismatches,
    METRIC_INSTRUCTIONS,
    METRIC_TIME,
    METRICS,
)
from reports.spread import DEFAULT_PROCESS_SD
from reports.verdict_table import (  # noqa: F401 (render_table: part of this module's API)
    atomic_write_csv,
    render_table,
    write_verdicts_csv,
)

DEFAULT_BASELINES_ROOT = "results/baselines"
VERDICTS_FILENAME = "verdicts.csv"
DEFAULT_PROGRAM = "python run_bench.py check"
# The facts behind each fingerprint: env.json beside a run's results.csv, and
# <fingerprint>.facts.json beside a stored baseline <fingerprint>.csv.
FACTS_SUFFIX = ".facts.json"

EXIT_OK = 0
EXIT_REGRESSED = 1
EXIT_CANNOT_COMPARE = 2



class CheckInputError(Exception):
    """A baseline or candidate that cannot be used; the message is a single line."""


def _one_line(text: object) -> str:
    """Collapse whitespace so a message fits on one terminal line."""
    return " ".join(str(text).split())


def results_csv_path(path: str | os.PathLike) -> Path:
    """The results CSV of a run directory, or the path itself when it is a file."""
    path = Path(path)
    return path / RESULTS_FILENAME if path.is_dir() else path


def _validate_row(csv_path: Path, line_number: int, row: ResultRow) -> None:
    """Reject a row the comparison could not interpret."""
    where = f"{csv_path}: data row {line_number}"
    if not row.task_key:
        raise CheckInputError(f"{where}: empty task_key")
    if row.status not in STATUSES:
        raise CheckInputError(f"{where}: unknown status {row.status!r}")
    try:
        samples = samples_from_row(row)
    except (ValueError, TypeError) as error:
        raise CheckInputError(
            _one_line(f"{where}: samples_s is not a JSON list of numbers ({error})")
        ) from error
    if not all(math.isfinite(sample) for sample in samples):
        raise CheckInputError(f"{where}: samples_s holds a non-finite time")


def load_results(path: str | os.PathLike) -> list[ResultRow]:
    """Rows of a run directory's results.csv or of a results CSV; CheckInputError if unusable."""
    csv_path = results_csv_path(path)
    if not csv_path.is_file():
        raise CheckInputError(f"{path}: no such run directory or results CSV")
    try:
        rows = read_rows(csv_path)
    except SchemaError as error:
        raise CheckInputError(_one_line(error)) from error
    except (ValueError, TypeError, csv.Error, OSError) as error:
        # A cell that does not parse (e.g. a word where a number belongs) or an unreadable file.
        raise CheckInputError(_one_line(f"{csv_path}: malformed results CSV ({error})")) from error
    for line_number, row in enumerate(rows, start=1):
        _validate_row(csv_path, line_number, row)
    return rows


def facts_path(path: str | os.PathLike) -> Path:
    """Where the fingerprint facts of a run directory or results CSV are recorded."""
    csv_path = results_csv_path(path)
    if csv_path.name == RESULTS_FILENAME:
        return csv_path.parent / ENV_FILENAME
    return csv_path.with_name(csv_path.stem + FACTS_SUFFIX)


def load_fingerprint_facts(path: str | os.PathLike) -> dict[str, dict]:
    """{fingerprint: facts} recorded beside a run or baseline; {} when none were recorded."""
    source = facts_path(path)
    if not source.is_file():
        return {}
    try:
        facts = json.loads(source.read_text(encoding="utf-8")).get("fingerprint_facts", {})
    except (OSError, ValueError, AttributeError) as error:
        raise CheckInputError(
            _one_line(f"{source}: unreadable fingerprint facts ({error})")) from error
    if not isinstance(facts, dict) or not all(isinstance(v, dict) for v in facts.values()):
        raise CheckInputError(f"{source}: fingerprint_facts is not an object of objects")
    return facts


def baseline_path(fingerprint: str, root: str | os.PathLike = DEFAULT_BASELINES_ROOT) -> Path:
    """Where the baseline for one hardware/software fingerprint lives: <root>/<fingerprint>.csv."""
    # The fingerprint becomes a file name, so anything that could escape root is refused.
    if not fingerprint or fingerprint in (".", "..") or any(c in fingerprint for c in "/\\\0"):
        raise ValueError(f"fingerprint {fingerprint!r} cannot name a baseline file")
    return Path(root) / f"{fingerprint}.csv"


def _single_fingerprint(rows: Iterable[ResultRow], source: str | os.PathLike) -> str:
    """The one fingerprint shared by rows; CheckInputError if there are several or none."""
    fingerprints = sorted({row.fingerprint for row in rows})
    if len(fingerprints) != 1 or not fingerprints[0]:
        found = ", ".join(repr(f) for f in fingerprints) or "none"
        raise CheckInputError(
            f"{source}: expected exactly one fingerprint, found {found}; "
            "a baseline holds the results of one machine and software stack"
        )
    return fingerprints[0]


def update_baseline(
    candidate: str | os.PathLike, root: str | os.PathLike = DEFAULT_BASELINES_ROOT
) -> Path:
    """Replace the baseline for the candidate's fingerprint with the candidate's ok rows."""
    ok_rows = [row for row in load_results(candidate) if row.status == STATUS_OK]
    if not ok_rows:
        raise CheckInputError(f"{candidate}: no ok rows to record as a baseline")
    fingerprint = _single_fingerprint(ok_rows, candidate)
    # Catch duplicates now rather than at the next check, when the baseline would be unusable.
    compare_rows([], ok_rows)
    destination = baseline_path(fingerprint, root)
    facts = load_fingerprint_facts(candidate).get(fingerprint)
    atomic_write_csv(destination, COLUMNS, (row_to_record(row) for row in ok_rows))
    sidecar = facts_path(destination)
    if facts is None:
        sidecar.unlink(missing_ok=True)  # never leave another recording's facts beside it
    else:
        write_atomic(sidecar, json.dumps({"fingerprint_facts": {fingerprint: facts}},
                                               indent=2, sort_keys=True) + "\n")
    return destination


def _other_baselines(root: str | os.PathLike, candidate_facts: dict | None) -> str:
    """The stored baselines of other fingerprints and how their facts differ from the candidate."""
    notes = []
    for path in sorted(Path(root).glob("*.csv")):
        try:
            facts = load_fingerprint_facts(path).get(path.stem)
        except CheckInputError:
            facts = None
        if facts is None or candidate_facts is None:
            notes.append(f"{path.stem} (facts not recorded)")
        else:
            notes.append(f"{path.stem} ({'; '.join(differing_facts(facts, candidate_facts)[:4])})")
    return ("; stored baselines are for other hosts or timing policies: " + ", ".join(notes)
            if notes else "")


def _fingerprints_differ(baseline: str | os.PathLike, candidate: str | os.PathLike,
                         pairs: list[tuple[str, str]], hint: str) -> int:
    """Refuse to compare rows of different fingerprints: name the facts that differ; exit 2."""
    baseline_facts = load_fingerprint_facts(baseline)
    candidate_facts = load_fingerprint_facts(candidate)
    described = " | ".join(describe_fingerprints(old, new, baseline_facts, candidate_facts)
                           for old, new in pairs)
    return _cannot_compare(
        f"NOT_COMPARABLE: baseline and candidate were timed on different hosts or under "
        f"different timing policies ({described}); a baseline holds only for its own "
        f"fingerprint: record one for the candidate's with: {hint}")


def default_rebaseline_hint(
    candidate: str | os.PathLike, program: str = DEFAULT_PROGRAM, root: str | None = None
) -> str:
    """The command that records the candidate as the new baseline."""
    command = f"{program} --candidate {shlex.quote(str(candidate))} --update-baseline"
    if root is not None and str(root) != DEFAULT_BASELINES_ROOT:
        command += f" --baselines-root {shlex.quote(str(root))}"
    return command


def _cannot_compare(message: str) -> int:
    """Report an unusable input on one stderr line and return exit code 2."""
    print(f"check: cannot compare: {_one_line(message)}", file=sys.stderr)
    return EXIT_CANNOT_COMPARE


def report_verdicts(
    verdicts: Sequence[Verdict],
    baseline_label: str,
    candidate_label: str,
    factor: float,
    alpha: float,
    verdicts_path: str | os.PathLike,
    failure_advice: str = "",
    stale_advice: str = "",
    metric: str = METRIC_TIME,
    process_note: bool = False,
) -> int:
    """Print the verdict table, write verdicts.csv, print the outcome; returns exit code 0 or 1."""
    print(f"baseline:  {baseline_label}")
    print(f"candidate: {candidate_label}")
    if metric == METRIC_INSTRUCTIONS:
        print(f"a change counts when instructions per call move by more than {factor * 100:g}% "
              "(callgrind counts; no significance test: A/A counts agree far closer)")
    else:
        print(f"a change counts when p < {alpha:g} (Benjamini-Hochberg adjusted over the rows) "
              f"and the median moves by more than {factor * 100:g}%"
              + ("; a plain check also tests the shift against the spread between worker "
                 "processes (replicates, or --process-sd)" if process_note else ""))
    print(render_table(verdicts))
    write_verdicts_csv(verdicts, verdicts_path)
    print(f"verdicts written to {verdicts_path}")

    counts = count_verdicts(verdicts)
    failing = {name: counts[name] for name in FAILING_VERDICTS if name in counts}
    if failing:
        summary = ", ".join(f"{count} {name}" for name, count in failing.items())
        print(f"FAIL: {summary}")
        if failure_advice:
            print(failure_advice)
        return EXIT_REGRESSED
    if "INCONCLUSIVE" in counts:
        # Not a failure: the shift may be real, but one process per side cannot show it.
        print(f"{counts['INCONCLUSIVE']} rows INCONCLUSIVE: moved beyond the factor within "
              "their runs, but no further than fresh processes of this host differ; to decide, "
              "measure both sides with run_bench.py --replicates 5")
    if "NOT_COMPARABLE" in counts:
        # Not a failure, but stale baselines hide regressions, so say how to refresh them.
        print(f"{counts['NOT_COMPARABLE']} rows NOT_COMPARABLE" + (
            f"; {stale_advice}" if stale_advice else ""))
    print("OK: no regression")
    return EXIT_OK


def run_check(
    baseline: str | os.PathLike | None,
    candidate: str | os.PathLike,
    factor: float = DEFAULT_FACTOR,
    alpha: float = DEFAULT_ALPHA,
    out_dir: str | os.PathLike | None = None,
    rebaseline_hint: str = "",
    baselines_root: str | os.PathLike = DEFAULT_BASELINES_ROOT,
    missing_baseline_ok: bool = False,
    metric: str = METRIC_TIME,
    process_sd: float | None = None,
) -> int:
    """Compare candidate to baseline (None: the stored one for its fingerprint); 0, 1 or 2.

    process_sd: the sd of log medians between fresh worker processes on this host, for rows
    without replicates on both sides (None: DEFAULT_PROCESS_SD)."""
    # missing_baseline_ok: a missing stored baseline is a skip (exit 0), not an error, so a CI
    # job on a machine that has no baseline yet says how to record one and passes.
    hint = rebaseline_hint or default_rebaseline_hint(candidate, root=str(baselines_root))
    try:
        candidate_rows = load_results(candidate)
        _check_metric(candidate_rows, candidate, metric)
        if baseline is None:
            fingerprint = _single_fingerprint(candidate_rows, candidate)
            baseline = baseline_path(fingerprint, baselines_root)
            if not baseline.is_file():
                facts = load_fingerprint_facts(candidate).get(fingerprint)
                message = (f"no baseline for fingerprint {fingerprint} at {baseline}; "
                           f"record one with: {hint}"
                           + _other_baselines(baselines_root, facts))
                if missing_baseline_ok:
                    print(f"check: skipped: {message}")
                    return EXIT_OK
                return _cannot_compare(message)
        baseline_rows = load_results(baseline)
        _check_metric(baseline_rows, baseline, metric)
        # Timings of another host or timing policy say nothing about this code: refuse the whole
        # comparison rather than print verdicts for it.
        mismatched = fingerprint_mismatches(baseline_rows, candidate_rows)
        if mismatched:
            return _fingerprints_differ(baseline, candidate, mismatched, hint)
        verdicts = check_verdicts(baseline_rows, candidate_rows, factor, alpha, metric,
                                  process_sd)
    except (CheckInputError, ValueError) as error:
        return _cannot_compare(str(error))

    if out_dir is None:
        out_dir = candidate if Path(candidate).is_dir() else Path.cwd()
    return report_verdicts(
        verdicts,
        str(results_csv_path(baseline)),
        str(results_csv_path(candidate)),
        factor,
        alpha,
        Path(out_dir) / VERDICTS_FILENAME,
        failure_advice=_moved_rows(verdicts, metric)
        + f"if this change is intended, re-baseline with: {hint}",
        stale_advice=f"to re-baseline: {hint}",
        metric=metric,
        process_note=True,
    )


def check_verdicts(baseline_rows: Sequence[ResultRow], candidate_rows: Sequence[ResultRow],
                   factor: float = DEFAULT_FACTOR, alpha: float = DEFAULT_ALPHA,
                   metric: str = METRIC_TIME, process_sd: float | None = None) -> list[Verdict]:
    """The plain check's verdicts: every time row's shift is tested against the spread
    between processes (the sides' replicates, else process_sd, else DEFAULT_PROCESS_SD)."""
    if process_sd is not None and not (math.isfinite(process_sd) and process_sd >= 0):
        raise CheckInputError(f"--process-sd must be a finite number >= 0, got {process_sd}")
    return compare_rows(baseline_rows, candidate_rows, factor=factor, alpha=alpha, metric=metric,
                        process_sd=DEFAULT_PROCESS_SD if process_sd is None else process_sd)


def _moved_rows(verdicts: Sequence[Verdict], metric: str) -> str:
    """Lines naming each failing row and how far it moved, for the end of a failing check."""
    lines = []
    for verdict in verdicts:
        if verdict.verdict in FAILING_VERDICTS:
            moved = (f"{(verdict.ratio - 1) * 100:+.1f}% "
                     f"{'instructions' if metric == METRIC_INSTRUCTIONS else 'time'}"
                     if math.isfinite(verdict.ratio) else verdict.reason)
            lines.append(f"  {verdict.verdict}: {verdict.op}/{verdict.impl} {verdict.workload} "
                         f"{verdict.precision}: {moved}")
    return "\n".join(lines) + "\n" if lines else ""


def _check_metric(rows: Sequence[ResultRow], source, metric: str) -> None:
    """Refuse a run that did not record what the check compares (times vs instruction counts)."""
    measured = [row for row in rows if row.status == STATUS_OK]
    if not measured:
        return
    counted = any(math.isfinite(row.instructions) for row in measured)
    timed = any(samples_from_row(row) for row in measured)
    if metric == METRIC_INSTRUCTIONS and not counted:
        raise CheckInputError(f"{source}: holds no instruction counts; check it without "
                              "--metric instructions, or record one with run_bench.py "
                              "--metric instructions")
    if metric == METRIC_TIME and counted and not timed:
        raise CheckInputError(f"{source}: holds instruction counts, not times; add "
                              "--metric instructions")


def build_parser(
    program: str = DEFAULT_PROGRAM, candidate_required: bool = True
) -> argparse.ArgumentParser:
    """Command-line options of the check."""
    parser = argparse.ArgumentParser(
        prog=program,
        description="Tell real performance regressions from noise between two benchmark runs.",
    )
    parser.add_argument(
        "--candidate",
        required=candidate_required,
        help="run directory (with results.csv) or results CSV"
        + ("" if candidate_required else " (default: run the CI sweep now into results/ci/)"),
    )
    parser.add_argument(
        "--baseline",
        help="run directory or results CSV (default: <baselines-root>/<fingerprint>.csv)",
    )
    parser.add_argument(
        "--factor", type=float, default=DEFAULT_FACTOR,
        help=f"smallest relative change that counts (default {DEFAULT_FACTOR:g})",
    )
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"significance level ({DEFAULT_ALPHA:g})")
    parser.add_argument("--out-dir", help="where verdicts.csv goes (default: the candidate run)")
    parser.add_argument("--baselines-root", default=DEFAULT_BASELINES_ROOT)
    parser.add_argument("--metric", choices=METRICS, default=METRIC_TIME,
                        help="compare wall-clock times (default) or instructions per call "
                             "(runs recorded with --metric instructions)")
    parser.add_argument(
        "--process-sd", type=float, metavar="SD",
        help="how far fresh worker processes of this host differ: the sd of a configuration's "
             "log median between processes, e.g. from a --replicates run of this host. Used "
             "for rows without replicates on both sides (default: the replicates either side "
             f"has, else {DEFAULT_PROCESS_SD:g}, which proves only changes beyond about 2.5x)")
    parser.add_argument(
        "--update-baseline",
        action="store_true",
        help="record the candidate's ok rows as the baseline for its fingerprint",
    )
    return parser


def execute(arguments: argparse.Namespace, program: str = DEFAULT_PROGRAM,
            missing_baseline_ok: bool = False) -> int:
    """Update the baseline or run the check for parsed arguments with a candidate set."""
    if arguments.update_baseline:
        try:
            path = update_baseline(arguments.candidate, arguments.baselines_root)
        except (CheckInputError, ValueError) as error:
            print(f"check: cannot update baseline: {_one_line(error)}", file=sys.stderr)
            return EXIT_CANNOT_COMPARE
        print(f"baseline written to {path}")
        return EXIT_OK
    hint = default_rebaseline_hint(arguments.candidate, program, arguments.baselines_root)
    return run_check(
        arguments.baseline,
        arguments.candidate,
        factor=arguments.factor,
        alpha=arguments.alpha,
        out_dir=arguments.out_dir,
        rebaseline_hint=hint,
        baselines_root=arguments.baselines_root,
        missing_baseline_ok=missing_baseline_ok,
        metric=arguments.metric,
        process_sd=arguments.process_sd,
    )


def main(argv: Sequence[str] | None = None, program: str = DEFAULT_PROGRAM) -> int:
    """Command-line entry point; returns the exit code."""
    return execute(build_parser(program).parse_args(argv), program)


if __name__ == "__main__":
    sys.exit(main(program="python -m reports.check"))
