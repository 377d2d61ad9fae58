"""Tests for locality-controlled trace generation and trace files in workloads.traces."""

from __future__ import annotations

import numpy as np
import pytest

from workloads.reuse import COLD, simulate_lru_hit_rate, stack_distances
from workloads.traces import (
    TraceFormatError,
    load_trace,
    save_trace,
    trace_for_hit_rate,
    trace_from_reuse_distances,
)


def test_reuse_distance_trace_shape_range_and_determinism():
    """Output is int64 in [0, num_rows), the requested length, and fixed by the seed."""
    probabilities = np.ones(20)
    first = trace_from_reuse_distances(probabilities, 0.3, 5000, 700, np.random.default_rng(1))
    again = trace_from_reuse_distances(probabilities, 0.3, 5000, 700, np.random.default_rng(1))
    other = trace_from_reuse_distances(probabilities, 0.3, 5000, 700, np.random.default_rng(2))
    assert first.dtype == np.int64 and first.shape == (5000,)
    assert first.min() >= 0 and first.max() < 700
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_reuse_distance_trace_follows_the_distance_distribution():
    """Measured stack distances of reuse accesses reproduce distance_probs; cold rate holds."""
    depths = np.arange(40)
    probabilities = 0.9**depths
    probabilities /= probabilities.sum()
    length, cold_probability = 60_000, 0.2
    trace = trace_from_reuse_distances(
        probabilities, cold_probability, length, 10**9, np.random.default_rng(3)
    )
    distances = stack_distances(trace)
    # With a huge table every cold access is a never-seen row: COLD in the stack distances.
    assert np.mean(distances == COLD) == pytest.approx(cold_probability, abs=0.01)
    reuse = distances[distances != COLD]
    assert reuse.max() < probabilities.size
    measured = np.bincount(reuse, minlength=probabilities.size) / reuse.size
    assert np.abs(measured - probabilities).max() < 0.01


def test_reuse_distance_trace_single_depth_is_exact():
    """With all mass at depth 4, every reuse after warm-up has stack distance exactly 4."""
    probabilities = np.zeros(5)
    probabilities[4] = 1.0
    # 20,000 accesses trim the internal stack several times; right after a trim the deepest
    # allowed depth must still be there.
    trace = trace_from_reuse_distances(probabilities, 0.25, 20_000, 10**6, np.random.default_rng(4))
    distances = stack_distances(trace)
    # Before five distinct rows exist, depth 4 is clipped to the bottom of the shorter stack.
    warmed_up = np.flatnonzero(np.cumsum(distances == COLD) >= 5)[0] + 1
    later = distances[warmed_up:]
    assert set(later[later != COLD].tolist()) == {4}
    assert set(distances[:warmed_up][distances[:warmed_up] != COLD].tolist()) <= {0, 1, 2, 3}


def test_reuse_distance_trace_extremes():
    """All-cold gives all-distinct rows; depth 0 with no cold accesses repeats one row."""
    all_cold = trace_from_reuse_distances([1.0], 1.0, 300, 1000, np.random.default_rng(5))
    assert np.unique(all_cold).size == 300
    repeated = trace_from_reuse_distances([1.0, 0.0], 0.0, 300, 1000, np.random.default_rng(5))
    assert np.unique(repeated).size == 1


def test_cold_accesses_reuse_least_recent_row_once_rows_run_out():
    """With only 10 rows, cold accesses cycle them: distance 9, the deepest possible."""
    trace = trace_from_reuse_distances([1.0], 1.0, 100, 10, np.random.default_rng(6))
    distances = stack_distances(trace)
    assert distances[:10].tolist() == [COLD] * 10
    assert set(distances[10:].tolist()) == {9}


def test_cold_accesses_take_least_recent_row_after_trims():
    """With 3,000 rows (past the trim size), every cold access after the first 3,000 is at 2999."""
    trace = trace_from_reuse_distances([0.5, 0.5], 0.5, 20_000, 3000, np.random.default_rng(8))
    distances = stack_distances(trace)
    exhausted = np.flatnonzero(np.cumsum(distances == COLD) == 3000)[0] + 1
    later = distances[exhausted:]
    assert set(later.tolist()) == {0, 1, 2999}
    assert np.mean(later == 2999) == pytest.approx(0.5, abs=0.02)


def test_reuse_distance_trace_deep_stack_beyond_trim():
    """Depths well past the internal trim threshold still land exactly (bounded stack logic)."""
    probabilities = np.zeros(3000)
    probabilities[[0, 1500, 2999]] = 1.0
    trace = trace_from_reuse_distances(probabilities, 0.5, 30_000, 10**7, np.random.default_rng(7))
    distances = stack_distances(trace)
    # Once 3000 distinct rows exist nothing is clipped, so only the three depths appear.
    warmed_up = np.flatnonzero(np.cumsum(distances == COLD) >= 3000)[0] + 1
    later = distances[warmed_up:]
    assert set(later[later != COLD].tolist()) == {0, 1500, 2999}


def test_reuse_distance_trace_rejects_bad_arguments():
    """Invalid probabilities, cold probability and sizes raise ValueError."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        trace_from_reuse_distances([0.5, -0.1], 0.1, 10, 10, rng)
    with pytest.raises(ValueError):
        trace_from_reuse_distances([0.0, 0.0], 0.1, 10, 10, rng)
    with pytest.raises(ValueError):
        trace_from_reuse_distances([], 0.1, 10, 10, rng)
    with pytest.raises(ValueError):
        trace_from_reuse_distances([1.0], 1.5, 10, 10, rng)
    with pytest.raises(ValueError):
        trace_from_reuse_distances([1.0], 0.1, 10, 0, rng)


@pytest.mark.parametrize("target", [0.0, 0.1, 0.37, 0.6, 0.9, 0.99])
def test_trace_for_hit_rate_hits_target_under_exact_lru(target):
    """The exact LRU simulation lands within 1/length of the target (documented bound)."""
    length, capacity = 20_000, 256
    trace = trace_for_hit_rate(target, capacity, length, 4096, np.random.default_rng(12))
    achieved = simulate_lru_hit_rate(trace, capacity)
    assert abs(achieved - target) <= 1 / length
    assert trace.min() >= 0 and trace.max() < 4096


def test_trace_for_hit_rate_edge_capacities_and_full_target():
    """Capacity one below the table still separates hits from misses; target 1 loses one access."""
    trace = trace_for_hit_rate(0.5, 99, 5000, 100, np.random.default_rng(13))
    assert simulate_lru_hit_rate(trace, 99) == pytest.approx(0.5, abs=1 / 5000)
    full = trace_for_hit_rate(1.0, 10, 1000, 50, np.random.default_rng(14))
    assert simulate_lru_hit_rate(full, 10) == pytest.approx(999 / 1000)


def test_trace_for_hit_rate_rejects_impossible_requests():
    """A cache as large as the table cannot miss, and targets outside [0, 1] make no sense."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="capacity_rows"):
        trace_for_hit_rate(0.5, 100, 1000, 100, rng)
    with pytest.raises(ValueError):
        trace_for_hit_rate(1.2, 10, 1000, 100, rng)
    with pytest.raises(ValueError):
        trace_for_hit_rate(0.5, 0, 1000, 100, rng)


def test_save_and_load_npy_round_trip(tmp_path):
    """Saved traces load back equal as int64, overwrite in place, and leave no temp files."""
    path = tmp_path / "trace.npy"
    trace = np.array([5, 0, 2**40, 5], dtype=np.int64)
    save_trace(path, trace)
    loaded = load_trace(path)
    assert loaded.dtype == np.int64 and loaded.tolist() == trace.tolist()
    save_trace(str(path), np.array([1, 2, 3], dtype=np.int32))
    assert load_trace(str(path)).tolist() == [1, 2, 3]
    assert load_trace(path).dtype == np.int64
    assert [entry.name for entry in tmp_path.iterdir()] == ["trace.npy"]


def test_load_npy_of_other_integer_dtypes(tmp_path):
    """Unsigned and narrow integer arrays written by other tools load as int64."""
    path = tmp_path / "narrow.npy"
    np.save(path, np.array([7, 0, 255], dtype=np.uint8))
    result = load_trace(path)
    assert result.dtype == np.int64 and result.tolist() == [7, 0, 255]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("plain.csv", "3\n1\n4\n", [3, 1, 4]),
        ("header.csv", "row\n3\n1\n", [3, 1]),
        ("index.csv", "Index\n9\n", [9]),
        ("commas.txt", "1,2,3\n4, 5 ,6,\n\n7\n", [1, 2, 3, 4, 5, 6, 7]),
        ("no-newline.txt", "  8  ", [8]),
        ("crlf.csv", "row\r\n10\r\n11\r\n", [10, 11]),
    ],
)
def test_load_text_traces(tmp_path, name, text, expected):
    """CSV/TXT with optional header, commas and newlines, blank lines and CRLF all parse."""
    path = tmp_path / name
    path.write_text(text, newline="")
    result = load_trace(path)
    assert result.dtype == np.int64 and result.tolist() == expected


def assert_one_line_error(error: TraceFormatError, prefix: str, fragment: str) -> None:
    """The message is one line, starts with '<path>[:<line>]: ', and carries a fix after ';'."""
    message = str(error)
    assert "\n" not in message
    assert message.startswith(prefix + ": "), message
    assert fragment in message, message
    assert "; " in message


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("row\n1\n2.5\n", 3, "non-integer entry '2.5'"),
        ("1\nabc\n", 2, "non-integer entry 'abc'"),
        ("1,,2\n", 1, "empty entry"),
        ("row\nrow\n", 2, "non-integer entry 'row'"),
        ("4\n\n-3\n", 3, "negative row id -3"),
        ("99999999999999999999\n", 1, "int64"),
    ],
)
def test_load_text_errors_name_the_line(tmp_path, text, line, fragment):
    """Bad CSV entries report '<path>:<line>: problem; fix'."""
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceFormatError) as caught:
        load_trace(path)
    assert_one_line_error(caught.value, f"{path}:{line}", fragment)


def test_load_errors_for_files(tmp_path):
    """Missing files, unknown extensions and empty traces are TraceFormatErrors (ValueErrors)."""
    missing = tmp_path / "missing.npy"
    with pytest.raises(TraceFormatError) as caught:
        load_trace(missing)
    assert_one_line_error(caught.value, str(missing), "no such trace file")
    assert isinstance(caught.value, ValueError)

    unknown = tmp_path / "trace.json"
    unknown.write_text("[1, 2]")
    with pytest.raises(TraceFormatError) as caught:
        load_trace(unknown)
    assert_one_line_error(caught.value, str(unknown), "unknown trace extension '.json'")

    header_only = tmp_path / "header_only.csv"
    header_only.write_text("row\n\n")
    with pytest.raises(TraceFormatError) as caught:
        load_trace(header_only)
    assert_one_line_error(caught.value, str(header_only), "trace is empty")


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.array([], dtype=np.int64), "trace is empty"),
        (np.array([[1, 2], [3, 4]], dtype=np.int64), "expected 1-D"),
        (np.array([1.0, 2.0]), "expected integers"),
        (np.array([True, False]), "expected integers"),
        (np.array([3, -1, 2], dtype=np.int32), "negative row id -1 at position 1"),
        (np.array([2**63], dtype=np.uint64), "int64"),
    ],
)
def test_load_npy_errors(tmp_path, array, fragment):
    """Bad .npy contents are reported with the path, the problem and a fix."""
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(TraceFormatError) as caught:
        load_trace(path)
    assert_one_line_error(caught.value, str(path), fragment)


def test_load_npy_refuses_pickles_and_garbage(tmp_path):
    """Object arrays (pickled) and corrupt files are refused rather than executed or misread."""
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(TraceFormatError) as caught:
        load_trace(pickled)
    assert_one_line_error(caught.value, str(pickled), "not a readable .npy array")
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not numpy at all")
    with pytest.raises(TraceFormatError) as caught:
        load_trace(garbage)
    assert_one_line_error(caught.value, str(garbage), "not a readable .npy array")


def test_save_errors_leave_existing_file_untouched(tmp_path):
    """Invalid traces or non-.npy paths are refused before anything is written."""
    path = tmp_path / "keep.npy"
    save_trace(path, np.array([1, 2]))
    for bad in (np.array([1, -2]), np.array([], dtype=np.int64), np.zeros((2, 2), np.int64),
                np.array([0.5])):
        with pytest.raises(TraceFormatError):
            save_trace(path, bad)
    assert load_trace(path).tolist() == [1, 2]
    with pytest.raises(TraceFormatError) as caught:
        save_trace(tmp_path / "trace.csv", np.array([1]))
    assert_one_line_error(caught.value, str(tmp_path / "trace.csv"), "use a .npy path")
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["keep.npy"]


def test_generated_trace_survives_a_file_round_trip(tmp_path):
    """A generated trace saved and reloaded keeps its exact LRU hit rate."""
    trace = trace_for_hit_rate(0.7, 64, 3000, 1000, np.random.default_rng(21))
    path = tmp_path / "generated.npy"
    save_trace(path, trace)
    reloaded = load_trace(path)
    assert np.array_equal(reloaded, trace)
    assert simulate_lru_hit_rate(reloaded, 64) == simulate_lru_hit_rate(trace, 64)
