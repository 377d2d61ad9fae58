"""Locality-controlled embedding index traces (LRU reuse-distance model) and trace files."""

from __future__ import annotations

import io
import re
from collections import deque
from pathlib import Path

import numpy as np

from bench.records import write_atomic

# Accepted single-column headers on the first line of a CSV/TXT trace.
HEADER_NAMES = ("row", "index")
TEXT_SUFFIXES = (".csv", ".txt")
INTEGER_PATTERN = re.compile(r"[+-]?\d+")
INT64_MAX = np.iinfo(np.int64).max


class TraceFormatError(ValueError):
    """A trace file problem, as one line: '<path>[:<line>]: what is wrong; how to fix'."""


def _format_error(path, problem: str, fix: str, line: int | None = None) -> TraceFormatError:
    """Build a TraceFormatError with the '<path>[:<line>]: problem; fix' message."""
    location = f"{path}:{line}" if line is not None else f"{path}"
    return TraceFormatError(f"{location}: {problem}; {fix}")


def _generate(
    is_cold: np.ndarray, depths: np.ndarray, max_depth: int, num_rows: int, rng
) -> np.ndarray:
    """Replay a plan of cold/reuse accesses against an LRU stack of rows; return row ids."""
    # The LRU stack is split in two. `recent` is a Python list holding the most recently used
    # rows, most recent at the END, so re-touching depth d pops only the d rows above it
    # (O(d) memmove, not O(stack)). Depths are < max_depth, so rows deeper than that can only
    # come back as "cold" accesses; they move in bulk to the `evicted` FIFO, oldest first, which
    # keeps the trim amortized O(1). Rows never used yet are older than all of them.
    # A cold access takes a never-used row while any remain, and afterwards the least recently
    # used row (the bottom of the full stack), which is as far from reuse as a finite table allows.
    length = is_cold.size
    # Each cold access, plus a forced one at time 0, uses at most one never-used row.
    fresh_count = min(num_rows, int(np.count_nonzero(is_cold)) + 1)
    fresh_rows = rng.choice(num_rows, size=fresh_count, replace=False).tolist()
    fresh_index = 0
    recent: list[int] = []
    evicted: deque[int] = deque()
    trim_above = 2 * max_depth + 1024
    rows = [0] * length
    for time, (cold, depth) in enumerate(zip(is_cold.tolist(), depths.tolist(), strict=True)):
        if cold or not recent:
            if fresh_index < fresh_count:
                row = fresh_rows[fresh_index]
                fresh_index += 1
            elif evicted:
                row = evicted.popleft()
            else:
                row = recent.pop(0)
        else:
            # Depths past the stack of used rows are clipped to its bottom. When `evicted` is
            # non-empty, `recent` holds >= max_depth rows, so it alone decides the clip.
            row = recent.pop(-1 - min(depth, len(recent) - 1))
        recent.append(row)
        rows[time] = row
        if len(recent) > trim_above:
            cut = len(recent) - max_depth
            evicted.extend(recent[:cut])
            del recent[:cut]
    return np.array(rows, dtype=np.int64)


def _check_sizes(length: int, num_rows: int) -> None:
    """Reject negative lengths and empty row spaces."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")


def trace_from_reuse_distances(
    distance_probs: np.ndarray,
    cold_probability: float,
    length: int,
    num_rows: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """LRU-stack trace: cold row w.p. cold_probability, else re-touch depth d ~ distance_probs."""
    # The DLRM reference's approach: distance_probs[d] is the probability of re-touching the row
    # at LRU stack depth d (0 = the row just used), i.e. of an access with stack distance d;
    # d is clipped to the bottom of the stack of rows used so far. A cold access touches a row
    # never used before, or once all num_rows are used, the least recently used one. The first
    # access is always cold. Returns int64 ids in [0, num_rows). Measured: 200,000 accesses take
    # ~0.25 s with depths up to 10,000 and ~0.5 s up to 100,000 (each reuse costs O(d)).
    _check_sizes(length, num_rows)
    probabilities = np.asarray(distance_probs, dtype=np.float64)
    if probabilities.ndim != 1 or probabilities.size == 0:
        raise ValueError("distance_probs must be a non-empty 1-D array")
    if (probabilities < 0).any() or not np.isfinite(probabilities).all():
        raise ValueError("distance_probs must be finite and >= 0")
    if probabilities.sum() <= 0:
        raise ValueError("distance_probs must have a positive sum")
    if not 0.0 <= cold_probability <= 1.0:
        raise ValueError(f"cold_probability must be in [0, 1], got {cold_probability}")
    is_cold = rng.random(length) < cold_probability
    depths = rng.choice(probabilities.size, size=length, p=probabilities / probabilities.sum())
    return _generate(is_cold, depths, probabilities.size, num_rows, rng)


def trace_for_hit_rate(
    target_hit_rate: float, capacity_rows: int, length: int, num_rows: int, rng
) -> np.ndarray:
    """A trace whose exact LRU hit rate at capacity_rows is target_hit_rate (within 1/length)."""
    # Exactly round(target * length) accesses re-touch a row at a depth drawn uniformly from
    # [0, capacity_rows): always a hit. The others are cold: a never-used row, or the least
    # recently used row, which sits at depth num_rows - 1 >= capacity_rows: always a miss.
    # So the exact LRU hit rate is round(target * length) / length, off from the target by at
    # most 0.5 / length, plus 1 / length when target is 1 (the first access always misses).
    # Hit rates at other capacities follow from the uniform depths: about target * c / capacity
    # for c < capacity_rows.
    _check_sizes(length, num_rows)
    if not 0.0 <= target_hit_rate <= 1.0:
        raise ValueError(f"target_hit_rate must be in [0, 1], got {target_hit_rate}")
    if not 1 <= capacity_rows < num_rows:
        raise ValueError(
            f"capacity_rows must be in [1, num_rows), got {capacity_rows} with num_rows "
            f"{num_rows}: a cache holding every row cannot miss after warm-up"
        )
    hits = round(target_hit_rate * length)
    is_cold = np.ones(length, dtype=bool)
    is_cold[rng.choice(length, size=hits, replace=False)] = False
    if length and not is_cold[0]:
        # The first access must be cold (nothing to reuse yet): swap it with a cold position.
        cold_positions = np.flatnonzero(is_cold)
        if cold_positions.size:
            is_cold[rng.choice(cold_positions)] = False
        is_cold[0] = True
    depths = rng.integers(0, capacity_rows, size=length)
    return _generate(is_cold, depths, capacity_rows, num_rows, rng)


def _validate_ids(path, trace: np.ndarray) -> np.ndarray:
    """Check a loaded or to-be-saved array: 1-D, integer, non-empty, non-negative; as int64."""
    if trace.ndim != 1:
        raise _format_error(
            path, f"trace array has shape {trace.shape}, expected 1-D",
            "store one flat array of row ids (e.g. array.ravel())",
        )
    if trace.size == 0:
        raise _format_error(path, "trace is empty", "store at least one row id")
    if not np.issubdtype(trace.dtype, np.integer):
        raise _format_error(
            path, f"row ids have dtype {trace.dtype}, expected integers",
            "convert with array.astype(np.int64)",
        )
    if np.issubdtype(trace.dtype, np.unsignedinteger) and int(trace.max()) > INT64_MAX:
        raise _format_error(path, "row id exceeds the int64 range", "use ids below 2**63")
    if np.issubdtype(trace.dtype, np.signedinteger) and (trace < 0).any():
        position = int(np.argmax(trace < 0))
        raise _format_error(
            path, f"negative row id {int(trace[position])} at position {position}",
            "row ids must be >= 0",
        )
    return trace.astype(np.int64, copy=False)


def _load_text(path: Path) -> np.ndarray:
    """Parse ids separated by commas and/or newlines, with an optional 'row'/'index' header."""
    # A Python loop (~1 M ids/s) so every error can name its line; big traces belong in .npy.
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _format_error(
            path, "file is not UTF-8 text", "write row ids as plain text, or save as .npy"
        ) from None
    ids: list[int] = []
    seen_content = False
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if not seen_content:
            seen_content = True
            if stripped.lower() in HEADER_NAMES:
                continue
        tokens = stripped.split(",")
        if len(tokens) > 1 and not tokens[-1].strip():
            tokens.pop()  # a trailing comma ends the line, it does not add an entry
        for token in tokens:
            token = token.strip()
            if not INTEGER_PATTERN.fullmatch(token):
                shown = repr(token) if token else "an empty entry"
                raise _format_error(
                    path, f"non-integer entry {shown}",
                    "write whole-number row ids separated by commas or newlines"
                    f" (an optional first-line header may be {' or '.join(HEADER_NAMES)})",
                    line_number,
                )
            value = int(token)
            if value < 0:
                raise _format_error(
                    path, f"negative row id {value}", "row ids must be >= 0", line_number
                )
            if value > INT64_MAX:
                raise _format_error(
                    path, f"row id {value} exceeds the int64 range", "use ids below 2**63",
                    line_number,
                )
            ids.append(value)
    if not ids:
        raise _format_error(path, "trace is empty", "write at least one row id")
    return np.array(ids, dtype=np.int64)


def load_trace(path) -> np.ndarray:
    """Load a trace from .npy (1-D integer array) or .csv/.txt (ids by comma/newline) as int64."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".npy" and suffix not in TEXT_SUFFIXES:
        raise _format_error(
            path, f"unknown trace extension {suffix or '(none)'!r}",
            "use .npy, .csv or .txt",
        )
    if not path.is_file():
        raise _format_error(path, "no such trace file", "check the path")
    if suffix in TEXT_SUFFIXES:
        return _load_text(path)
    try:
        # No pickles: a trace file must not be able to run code when loaded.
        trace = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _format_error(
            path, f"not a readable .npy array ({problem})", "re-save it with save_trace"
        ) from None
    if not isinstance(trace, np.ndarray):
        raise _format_error(
            path, "file holds an .npz archive, not one array", "save one array with save_trace"
        )
    return _validate_ids(path, trace)


def save_trace(path, trace) -> None:
    """Write a trace to a .npy file atomically (temporary file in the same folder, os.replace)."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        raise _format_error(
            path, f"cannot save a trace as {path.suffix or '(no extension)'!r}",
            "use a .npy path",
        )
    trace = _validate_ids(path, np.asarray(trace))
    buffer = io.BytesIO()
    np.save(buffer, trace)
    write_atomic(path, buffer.getvalue())
