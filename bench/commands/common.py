"""What every command shares: the parser, UsageError, exit codes, run directories, converters."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench.records import RESULTS_FILENAME
from workloads.resolve import parse_numbers, split

# Exit codes of the measuring commands (sweep, serve, dist, reference); the sweep's --help
# epilog says the same. check keeps its own (1 there means a regression).
EXIT_OK = 0
EXIT_ALL_ERRORED = 1  # every configuration that ran errored: nothing measured
EXIT_USAGE = 2  # bad input, refused before any work
EXIT_SOME_ERRORED = 3  # some rows errored; the other rows and the report are still written
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are a UsageError (one line on stderr, exit 2), not a usage block."""

    def error(self, message: str):
        # Raised, not exited: the entry point prints every kind of bad input the same way,
        # and a caller in the same process gets exit code 2 back instead of SystemExit.
        raise UsageError(f"{message} (see --help)")


def exit_code(measured: int, errors: int) -> int:
    """0 without error rows; 1 when rows errored and none measured; 3 when some errored."""
    # A CI job must not pass on a run whose kernels crashed or failed their float64 check,
    # so any error row is non-zero; 3 tells "partly measured" from "nothing measured".
    if not errors:
        return EXIT_OK
    return EXIT_SOME_ERRORED if measured else EXIT_ALL_ERRORED


# ---------------------------------------------------------------- run directories

def new_run_id(label: str = "") -> str:
    """A run directory name: the local time, the command's label if any, 4 random hex digits."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{label + '-' if label else ''}{secrets.token_hex(2)}"


def check_writable_directory(directory: Path, given: str) -> None:
    """Refuse a directory that cannot be created or written, before any work starts."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the nearest ancestor that exists decides
    if not existing.is_dir():
        raise UsageError(f"{given}: {existing} is not a directory; give a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{given}: {existing} is not writable by this user; give another "
                         "directory")


def new_run_directory(out: Path | str, run_id: Optional[str], label: str = "",
                      occupied: Sequence[str] = (RESULTS_FILENAME,), hint: str = "",
                      create: bool = True) -> tuple[Path, str]:
    """OUT/RUN_ID for a new run, checked in this order: a plain name, not holding a run
    (any of `occupied`), writable; created unless create is False. (directory, run id).

    hint: what to do instead when the directory holds a run ({directory} is filled in)."""
    if run_id is None:
        run_id = new_run_id(label)
    # A path here would put the run outside --out (--run-id ../../x).
    elif run_id in ("", ".", "..") or "/" in run_id or os.sep in run_id:
        raise UsageError(f"--run-id {run_id!r}: give a plain name (no '/'), e.g. nightly-1")
    directory = Path(out) / run_id
    if any((directory / name).exists() for name in occupied):
        raise UsageError(f"--run-id {run_id}: {directory} already holds a run; "
                         f"{(hint or 'choose another --run-id').format(directory=directory)}")
    check_writable_directory(directory, f"--out {out}")
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--out {out}: cannot create {directory}: "
                             f"{error.strerror or error}") from None
    return directory, run_id


def build_report(directory: Path) -> None:
    """Build the run's HTML report; a report failure never touches the finished results."""
    try:
        from reports.build import build_report as build

        report = build([directory])
        print(f"report: {report / 'index.html'}")
    except Exception as error:  # the results are safe on disk; say what failed
        print(f"warning: report not built ({type(error).__name__}: {error}); "
              f"retry with: python run_bench.py report {directory}", file=sys.stderr)


# ---------------------------------------------------------------- argparse type= converters
# argparse turns the ArgumentTypeError into "argument --flag: MESSAGE", so no message names
# its flag.

def names(text: str) -> list[str]:
    """A comma list of names (empty parts dropped), at least one."""
    values = split(text)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one value")
    return values


def choice_list(*valid: str) -> Callable[[str], list[str]]:
    """A converter of comma lists drawn from valid (repeats dropped, order kept)."""
    def convert(text: str) -> list[str]:
        values = list(dict.fromkeys(names(text)))
        for value in values:
            if value not in valid:
                raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(valid)}")
        return values

    convert.__name__ = "choice_list"
    return convert


def _numbers(text: str, kind: type, minimum: float, exclusive: bool, example: str,
             single: bool = False) -> list:
    """The numbers of a comma list, each finite and above the bound (one of them when single)."""
    try:
        values = parse_numbers(text, kind)
    except ValueError:
        values = []
    low_ok = (lambda value: value > minimum) if exclusive else (lambda value: value >= minimum)
    if (not values or (single and len(values) != 1)
            or not all(math.isfinite(value) and low_ok(value) for value in values)):
        what = ("a whole number" if single else "whole numbers") if kind is int else (
            "a number" if single else "numbers")
        bound = f"{'>' if exclusive else '>='} {minimum:g}"
        raise argparse.ArgumentTypeError(f"{text!r}: give {what} {bound}, e.g. {example}")
    return values


def whole_numbers(text: str) -> list[int]:
    """A comma list of whole numbers >= 1."""
    return _numbers(text, int, 1, False, "1,2")


def non_negative_ints(text: str) -> list[int]:
    """A comma list of whole numbers >= 0."""
    return _numbers(text, int, 0, False, "0,1,2")


def positive_floats(text: str) -> list[float]:
    """A comma list of finite numbers > 0."""
    return _numbers(text, float, 0, True, "10,50")


def non_negative_floats(text: str) -> list[float]:
    """A comma list of finite numbers >= 0."""
    return _numbers(text, float, 0, False, "0,2")


def positive_int(text: str) -> int:
    """One whole number >= 1."""
    return _numbers(text, int, 1, False, "4", single=True)[0]


def non_negative_int(text: str) -> int:
    """One whole number >= 0."""
    return _numbers(text, int, 0, False, "0", single=True)[0]


def positive_float(text: str) -> float:
    """One finite number > 0."""
    return _numbers(text, float, 0, True, "2.5", single=True)[0]


# The longest timing a configuration may ask for, and the longest a configuration may run.
MAX_MIN_RUN_TIME_S = 3600.0
MAX_TASK_TIMEOUT_S = 86400.0


def seconds_up_to(maximum: float) -> Callable[[str], float]:
    """One finite number of seconds > 0 and at most maximum (an absurd bound is refused)."""
    def convert(text: str) -> float:
        value = positive_float(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{value:g}: give at most {maximum:g} seconds")
        return value

    convert.__name__ = "seconds"
    return convert
