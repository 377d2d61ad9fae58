"""Instruction counts (and simulated cache misses) of a closure from Valgrind's callgrind."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional

METRIC_TIME = "time"
METRIC_INSTRUCTIONS = "instructions"
METRICS = (METRIC_TIME, METRIC_INSTRUCTIONS)
# The dump files of one worker: callgrind appends ".N" for the N-th dump it writes.
DUMP_BASENAME = "callgrind.out"


class CallgrindError(Exception):
    """Callgrind is missing, or a dump it should have written is not there; one line."""


@dataclasses.dataclass(frozen=True)
class CountPolicy:
    """How a configuration's instructions are counted (the instruction mode's TimingPolicy)."""

    # Counts barely move from call to call and Valgrind runs code ~50x slower, so one warm-up
    # call (JIT kernels, first-touch allocations) and a few counted calls; a single counted
    # call moved by up to 1.5% between A/A runs (Python-level work is a larger share of the
    # small ops), three averaged with the GC held off and a fixed hash seed much less.
    warmup_calls: int = 1  # uncollected calls first
    calls_per_count: int = 3  # closure calls inside one collected window (one dump)
    counts: int = 1  # dumps per configuration; more show the spread within one run
    cache_sim: bool = False  # callgrind --cache-sim=yes: simulated D1/LL misses (slower)


def valgrind_path() -> Optional[str]:
    """The valgrind executable on PATH, or None."""
    return shutil.which("valgrind")


def valgrind_version() -> str:
    """'valgrind-3.19.0', or '' when valgrind is missing or does not answer."""
    path = valgrind_path()
    if path is None:
        return ""
    try:
        answer = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return answer.stdout.strip()


def require_valgrind() -> str:
    """The valgrind version; CallgrindError saying how to install it when it is missing."""
    version = valgrind_version()
    if not version:
        raise CallgrindError("--metric instructions needs Valgrind's callgrind, and valgrind is "
                             "not on PATH; install it (Debian/Ubuntu: apt-get install valgrind)")
    return version


# String hashes are randomised per process, which moves the instructions of every dict and
# attribute lookup between runs: counted workers use one fixed seed.
WORKER_ENVIRONMENT = {"PYTHONHASHSEED": "0"}


def worker_prefix(dump_directory: Path, cache_sim: bool) -> list[str]:
    """The command words that start a worker under callgrind with collection off."""
    # Collection starts off and the worker toggles it around the measured calls only, so one
    # Valgrind start-up (Python + torch import, ~50 s) serves every configuration of a group.
    words = [valgrind_path() or "valgrind", "--tool=callgrind", "--collect-atstart=no",
             f"--callgrind-out-file={Path(dump_directory) / DUMP_BASENAME}",
             "--dump-line=no", "--compress-strings=no"]
    if cache_sim:
        words.append("--cache-sim=yes")
    return words


def parse_dump(path: Path) -> dict[str, Any]:
    """{'events': {name: total}, 'caches': {'D1': 'desc'...}} of one callgrind dump file."""
    names: list[str] = []
    totals: list[int] = []
    caches: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("events:"):
                names = line.split(":", 1)[1].split()
            elif line.startswith(("totals:", "summary:")) and not totals:
                totals = [int(value) for value in line.split(":", 1)[1].split()]
            elif line.startswith("desc:") and " cache:" in line:
                name, _, description = line[len("desc:"):].partition(" cache:")
                if description.strip():
                    caches[name.strip()] = description.strip()
    if not names or not totals:
        raise CallgrindError(f"{path}: no events/totals lines; not a callgrind dump")
    # Trailing zero counts may be left out of the totals line.
    totals += [0] * (len(names) - len(totals))
    return {"events": dict(zip(names, totals)), "caches": caches}


def per_call(events: dict[str, int], calls: int) -> dict[str, float]:
    """Instructions and simulated misses per call from one dump's event totals."""
    figures = {"instructions": events.get("Ir", 0) / calls}
    if "D1mr" in events:
        # Data-cache misses only (the instruction cache is not the working set of an operator).
        figures["d1_misses"] = (events.get("D1mr", 0) + events.get("D1mw", 0)) / calls
        figures["ll_misses"] = (events.get("DLmr", 0) + events.get("DLmw", 0)) / calls
    return figures


class Counter:
    """In a worker started under worker_prefix: counts a closure's calls, one dump at a time."""

    def __init__(self, dump_directory: Path):
        self.dump_directory = Path(dump_directory)
        self.dumps = 0

    def _toggle(self) -> None:
        import torch

        torch._C._valgrind_toggle()

    def _toggle_and_dump(self) -> None:
        import torch

        torch._C._valgrind_toggle_and_dump_stats()

    def count_once(self, fn: Callable[[], Any], calls: int) -> dict[str, Any]:
        """Collect exactly `calls` calls of fn into one dump; its parsed totals."""
        # A cyclic-GC pass inside the window in one run and not in another would move the
        # count (timeit holds the GC off for the same reason).
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._toggle()
            for _ in range(calls):
                fn()
            self._toggle_and_dump()
        finally:
            if was_enabled:
                gc.enable()
        self.dumps += 1
        path = self.dump_directory / f"{DUMP_BASENAME}.{self.dumps}"
        if not path.is_file():
            raise CallgrindError(f"no callgrind dump at {path}: this worker is not running "
                                 "under valgrind --tool=callgrind")
        try:
            return parse_dump(path)
        finally:
            path.unlink(missing_ok=True)  # a sweep writes one per count: keep the disk clean

    def count(self, fn: Callable[[], Any], policy: CountPolicy) -> "Count":
        """Warm up uncollected, then policy.counts dumps of policy.calls_per_count calls each."""
        for _ in range(policy.warmup_calls):
            fn()
        dumps = [self.count_once(fn, policy.calls_per_count) for _ in range(policy.counts)]
        return Count([per_call(dump["events"], policy.calls_per_count) for dump in dumps],
                     policy.calls_per_count, dumps[-1]["caches"] if dumps else {})


@dataclasses.dataclass
class Count:
    """Per-call figures of each dump of one configuration."""

    per_dump: list[dict[str, float]]
    calls_per_count: int
    caches: dict[str, str]

    def median(self, name: str) -> float:
        """Median over the dumps of one per-call figure (NaN when not collected)."""
        values = [figures[name] for figures in self.per_dump if name in figures]
        return float(statistics.median(values)) if values else float("nan")

    @property
    def calls(self) -> int:
        """Closure calls the figures average over, all dumps together."""
        return self.calls_per_count * len(self.per_dump)


def counting_facts(policy: CountPolicy, version: str) -> dict:
    """How an instruction run counted, as its fingerprint records it (instead of timing)."""
    return {"metric": METRIC_INSTRUCTIONS, "valgrind": version, **dataclasses.asdict(policy)}
