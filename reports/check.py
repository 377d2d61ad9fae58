"""The regression check: load two runs, print the verdict table, write verdicts.csv, exit 0/1/2."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
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
    geometric_mean_ratio,
    METRIC_INSTRUCTIONS,
    METRIC_TIME,
    METRICS,
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

_TABLE_HEADERS = ("op", "impl", "workload", "precision", "ratio", "p-value", "verdict", "reason")
_VERDICT_COLUMNS = tuple(field.name for field in dataclasses.fields(Verdict))


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


def _format_ratio(ratio: float) -> str:
    """Ratio with three decimals, '-' when there is none."""
    return f"{ratio:.3f}" if math.isfinite(ratio) else "-"


def _format_p_value(p_value: float) -> str:
    """p-value readable both near 1 and near 0, '-' when there is none."""
    if not math.isfinite(p_value):
        return "-"
    return f"{p_value:.3f}" if p_value >= 0.001 else f"{p_value:.1e}"


def _summary_reason(verdicts: Sequence[Verdict]) -> str:
    """Text of the summary row: how many ratios went in and the verdict counts."""
    with_ratio = sum(1 for v in verdicts if math.isfinite(v.ratio) and v.ratio > 0)
    counts = ", ".join(f"{count} {name}" for name, count in count_verdicts(verdicts).items())
    return f"over {with_ratio} rows with a ratio; " + (counts or "no rows")


def render_table(verdicts: Iterable[Verdict]) -> str:
    """Fixed-width table of the verdicts; the last line is the geometric-mean summary."""
    verdicts = list(verdicts)
    body = [(v.op, v.impl, v.workload, v.precision, _format_ratio(v.ratio),
             _format_p_value(v.p_value), v.verdict, _one_line(v.reason)) for v in verdicts]
    summary = (
        "geomean", "", "", "", _format_ratio(geometric_mean_ratio(verdicts)), "", "",
        _summary_reason(verdicts),
    )
    lines_cells = [_TABLE_HEADERS, *body, summary]
    # The reason column is last and free text, so it is left unpadded.
    widths = [
        max(len(cells[column]) for cells in lines_cells) for column in range(len(_TABLE_HEADERS))
    ]
    numeric_columns = {4, 5}

    def format_line(cells: Sequence[str]) -> str:
        parts = []
        for column, cell in enumerate(cells):
            if column == len(cells) - 1:
                parts.append(cell)
            elif column in numeric_columns:
                parts.append(cell.rjust(widths[column]))
            else:
                parts.append(cell.ljust(widths[column]))
        return "  ".join(parts).rstrip()

    separator = "  ".join("-" * width for width in widths)
    lines = [format_line(_TABLE_HEADERS), separator]
    lines += [format_line(cells) for cells in body]
    lines += [separator, format_line(summary)]
    return "\n".join(lines)


def _atomic_write_csv(path: Path, fieldnames: Sequence[str], records: Iterable[dict]) -> None:
    """Write a CSV next to its destination and rename it in, so readers never see half a file."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(records)
    write_atomic(path, text.getvalue())


def _verdict_record(verdict: Verdict) -> dict:
    """Verdict as a CSV record with NaN written as an empty cell."""
    record = dataclasses.asdict(verdict)
    for key, value in record.items():
        if isinstance(value, float) and math.isnan(value):
            record[key] = ""
    return record


def write_verdicts_csv(verdicts: Iterable[Verdict], path: str | os.PathLike) -> None:
    """Write the verdicts to path atomically (bench.records.write_atomic)."""
    _atomic_write_csv(Path(path), _VERDICT_COLUMNS, (_verdict_record(v) for v in verdicts))


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
    _atomic_write_csv(destination, COLUMNS, (row_to_record(row) for row in ok_rows))
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
) -> int:
    """Print the verdict table, write verdicts.csv, print the outcome; returns exit code 0 or 1."""
    print(f"baseline:  {baseline_label}")
    print(f"candidate: {candidate_label}")
    if metric == METRIC_INSTRUCTIONS:
        print(f"a change counts when instructions per call move by more than {factor * 100:g}% "
              "(callgrind counts; no significance test: A/A counts agree far closer)")
    else:
        print(f"a change counts when p < {alpha:g} (Benjamini-Hochberg adjusted over the rows) "
              f"and the median moves by more than {factor * 100:g}%")
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
) -> int:
    """Compare candidate to baseline (None: the stored one for its fingerprint); 0, 1 or 2."""
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
        verdicts = compare_rows(baseline_rows, candidate_rows, factor=factor, alpha=alpha,
                                metric=metric)
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
    )


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
    )


def main(argv: Sequence[str] | None = None, program: str = DEFAULT_PROGRAM) -> int:
    """Command-line entry point; returns the exit code."""
    return execute(build_parser(program).parse_args(argv), program)


if __name__ == "__main__":
    sys.exit(main(program="python -m reports.check"))
