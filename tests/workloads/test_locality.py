"""Tests of locality-controlled index distributions, LFU/LRU predictions and the locality study."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.run.devices import perf_counter_support
from bench.records import ResultRow, ResultsWriter
from workloads import generators, reuse
from workloads.generators import (LOCALITY_BLOCK_ACCESSES, draw_indices, locality_indices,
                                  reuse_distance_probabilities, stream)
from workloads.presets import synthetic
from workloads.specs import (IndexDistribution, PoolingDistribution, SpecError, TableSpec,
                            WorkloadSpec)
from workloads.traces import save_trace


def table(rows: int, distribution: IndexDistribution) -> TableSpec:
    """A one-table spec drawing from distribution."""
    return TableSpec(rows=rows, dim=8, distribution=distribution)


@pytest.fixture
def trace_file(tmp_path) -> Path:
    """A small .npy trace of known ids."""
    path = tmp_path / "ids.npy"
    save_trace(path, np.array([5, 17, 3, 99, 42], dtype=np.int64))
    return path


# ---------------------------------------------------------------- parse and label

@pytest.mark.parametrize("text, fields", [
    ("hitrate:0.9@100000", {"target_hit_rate": 0.9, "capacity_rows": 100000}),
    ("hitrate:0@1", {"target_hit_rate": 0.0, "capacity_rows": 1}),
    ("hitrate:1@7", {"target_hit_rate": 1.0, "capacity_rows": 7}),
    ("reuse:0.1,1000", {"cold_probability": 0.1, "mean_distance": 1000.0}),
    ("reuse:0,0", {"cold_probability": 0.0, "mean_distance": 0.0}),
    ("reuse:0.125,12.5", {"cold_probability": 0.125, "mean_distance": 12.5}),
])
def test_locality_kinds_parse_and_label_round_trip(text, fields):
    parsed = IndexDistribution.parse(text)
    assert parsed.kind == text.partition(":")[0]
    assert {name: getattr(parsed, name) for name in fields} == fields
    assert parsed.label() == text
    assert IndexDistribution.parse(parsed.label()) == parsed
    assert parsed.is_locality


def test_trace_kind_parses_a_path_and_round_trips(trace_file):
    parsed = IndexDistribution.parse(f"trace:{trace_file}")
    assert (parsed.kind, parsed.path) == ("trace", str(trace_file))
    assert IndexDistribution.parse(parsed.label()) == parsed


def test_old_kinds_keep_their_labels():
    assert IndexDistribution.parse("uniform").label() == "uniform"
    assert IndexDistribution.parse("zipf:1.05").label() == "zipf:1.05"
    assert not IndexDistribution("zipf", 1.1).is_locality


@pytest.mark.parametrize("text", [
    "hitrate", "hitrate:", "hitrate:0.9", "hitrate:0.9@", "hitrate:@100", "hitrate:x@100",
    "hitrate:0.9@1.5", "hitrate:1.5@100", "hitrate:-0.1@100", "hitrate:0.5@0", "hitrate:nan@10",
    "reuse", "reuse:", "reuse:0.1", "reuse:0.1,", "reuse:a,b", "reuse:2,10", "reuse:0.1,-1",
    "reuse:0.1,inf", "reuse:nan,1", "trace", "trace:", "trace:/no/such/file.npy",
    "trace:ids.bin", "lru:0.5",
])
def test_locality_kinds_reject_bad_text_in_one_line(text):
    with pytest.raises(SpecError) as error:
        IndexDistribution.parse(text)
    assert "\n" not in str(error.value) and str(error.value)


def test_new_fields_survive_the_task_round_trip(trace_file):
    for distribution in (IndexDistribution.parse("hitrate:0.5@300"),
                         IndexDistribution.parse("reuse:0.2,40"),
                         IndexDistribution.parse(f"trace:{trace_file}")):
        spec = synthetic(1000, 8, PoolingDistribution("fixed", 4.0), 2, distribution)
        rebuilt = WorkloadSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert rebuilt == spec and rebuilt.key() == spec.key()


# ---------------------------------------------------------------- generators

def test_uniform_draws_are_unchanged_by_the_new_kinds():
    drawn = draw_indices(table(1000, IndexDistribution()), 50, seed=4, table_index=1,
                         batch_index=2)
    expected = stream(4, 0, 1, 2).integers(0, 1000, size=50, dtype=np.int64)
    assert np.array_equal(drawn, expected)


@pytest.mark.parametrize("text", ["hitrate:0.6@500", "reuse:0.3,50"])
def test_locality_kinds_are_reproducible_and_continue_across_batches(text):
    spec = table(20_000, IndexDistribution.parse(text))
    first = draw_indices(spec, 3000, seed=7, table_index=1, batch_index=0)
    assert np.array_equal(first, draw_indices(spec, 3000, seed=7, table_index=1, batch_index=0))
    assert not np.array_equal(first, draw_indices(spec, 3000, seed=8, table_index=1))
    assert not np.array_equal(first, draw_indices(spec, 3000, seed=7, table_index=0))
    second = draw_indices(spec, 3000, seed=7, table_index=1, batch_index=1)
    stream_part = locality_indices(spec, 0, 6000, seed=7, table_index=1)
    assert np.array_equal(np.concatenate([first, second]), stream_part)
    assert first.dtype == np.int64 and 0 <= first.min() and first.max() < 20_000


def test_locality_stream_spans_block_boundaries():
    spec = table(5000, IndexDistribution.parse("hitrate:0.5@100"))
    start = LOCALITY_BLOCK_ACCESSES - 10
    spanning = locality_indices(spec, start, 20, seed=1)
    before = locality_indices(spec, start, 10, seed=1)
    after = locality_indices(spec, LOCALITY_BLOCK_ACCESSES, 10, seed=1)
    assert np.array_equal(spanning, np.concatenate([before, after]))
    assert locality_indices(spec, 0, 0, seed=1).size == 0


@pytest.mark.parametrize("target", [0.0, 0.3, 0.75, 0.95])
def test_hitrate_kind_hits_its_target_at_the_capacity(target):
    capacity = 800
    spec = table(50_000, IndexDistribution("hitrate", target_hit_rate=target,
                                           capacity_rows=capacity))
    batch = draw_indices(spec, 8000, seed=3)
    assert reuse.simulate_lru_hit_rate(batch, capacity) == pytest.approx(target, abs=0.03)
    # Two consecutive batches are one locality process: the target holds over both.
    both = np.concatenate([batch, draw_indices(spec, 8000, seed=3, batch_index=1)])
    assert reuse.simulate_lru_hit_rate(both, capacity) == pytest.approx(target, abs=0.03)


def test_hitrate_capacity_beyond_the_table_is_clamped():
    spec = table(50, IndexDistribution("hitrate", target_hit_rate=0.5, capacity_rows=10_000))
    indices = draw_indices(spec, 2000, seed=0)
    assert indices.max() < 50
    assert np.array_equal(draw_indices(table(1, spec.distribution), 5, seed=0), np.zeros(5))


def test_reuse_kind_follows_its_cold_probability_and_mean_distance():
    spec = table(100_000, IndexDistribution("reuse", cold_probability=0.2, mean_distance=30.0))
    indices = draw_indices(spec, 20_000, seed=5)
    distances = reuse.stack_distances(indices)
    assert np.mean(distances == reuse.COLD) == pytest.approx(0.2, abs=0.02)
    warm = distances[distances != reuse.COLD]
    assert warm.mean() == pytest.approx(30.0, rel=0.15)


def test_reuse_distance_probabilities_are_geometric_with_the_mean():
    probabilities = reuse_distance_probabilities(100.0, 1_000_000)
    assert probabilities.sum() == pytest.approx(1.0)
    assert (np.arange(probabilities.size) @ probabilities) == pytest.approx(100.0, rel=1e-6)
    clipped = reuse_distance_probabilities(100.0, 50)
    assert clipped.size == 50 and clipped.sum() == pytest.approx(1.0)
    assert np.array_equal(reuse_distance_probabilities(0.0, 10), [1.0])


def test_trace_kind_replays_the_file_in_order_wrapping_and_folding(trace_file, tmp_path):
    spec = table(1000, IndexDistribution("trace", path=str(trace_file)))
    assert draw_indices(spec, 3, seed=0).tolist() == [5, 17, 3]
    assert draw_indices(spec, 3, seed=9, batch_index=1).tolist() == [99, 42, 5]
    folded = table(10, spec.distribution)
    assert draw_indices(folded, 5, seed=0).tolist() == [5, 7, 3, 9, 2]
    text_trace = tmp_path / "ids.csv"
    text_trace.write_text("row\n4\n8\n15\n")
    spec = table(100, IndexDistribution.parse(f"trace:{text_trace}"))
    assert draw_indices(spec, 4, seed=0).tolist() == [4, 8, 15, 4]


def test_edited_trace_file_is_read_again(tmp_path):
    path = tmp_path / "ids.npy"
    save_trace(path, np.array([1, 2, 3]))
    spec = table(100, IndexDistribution("trace", path=str(path)))
    assert draw_indices(spec, 3, seed=0).tolist() == [1, 2, 3]
    save_trace(path, np.array([7, 8, 9, 10]))
    os.utime(path, ns=(1, 10**18))  # a distinct mtime even on coarse-clock filesystems
    assert draw_indices(spec, 3, seed=0).tolist() == [7, 8, 9]
    generators._trace_file.cache_clear()


# ---------------------------------------------------------------- predictions

def test_predict_lfu_hit_rate_hand_case():
    warmup = [5, 5, 5, 3, 3, 1, 2]
    # Cache of 2: rows 5 (3 looks) and 3 (2 looks); eval hits 5, 3, 5 of 6 lookups.
    assert reuse.predict_lfu_hit_rate(warmup, [5, 3, 1, 2, 9, 5], 2) == pytest.approx(0.5)
    # Ties go to the lower row id, as the TT cache populates.
    assert reuse.predict_lfu_hit_rate([2, 1, 7], [1, 2, 7], 1) == pytest.approx(1 / 3)
    # Rows the warm-up never saw are not cached, however large the cache.
    assert reuse.predict_lfu_hit_rate([4], [4, 6], 100) == pytest.approx(0.5)
    assert reuse.predict_lfu_hit_rate([4], [4, 6], 0) == 0.0
    with pytest.raises(ValueError):
        reuse.predict_lfu_hit_rate([1], [], 1)
    with pytest.raises(ValueError):
        reuse.predict_lfu_hit_rate([1], [1], -1)


def test_steady_state_hit_rate_is_the_replayed_pass():
    assert reuse.steady_state_hit_rate([1, 2, 3, 1, 2, 3], 3) == 1.0
    assert reuse.steady_state_hit_rate([1, 2, 3, 4], 3) == 0.0  # a cyclic scan thrashes LRU
    trace = np.random.default_rng(0).integers(0, 50, 300)
    third_pass = reuse.simulate_lru_hit_rate(np.concatenate([trace] * 3), 20) * 3 \
        - reuse.simulate_lru_hit_rate(np.concatenate([trace] * 2), 20) * 2
    assert reuse.steady_state_hit_rate(trace, 20) == pytest.approx(third_pass)


# ---------------------------------------------------------------- perf counters

def fake_perf(directory: Path, stderr: str, code: int = 0) -> None:
    """A `perf` script on directory that prints stderr and exits with code."""
    script = directory / "perf"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{stderr}' >&2\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("stderr, code, supported, words", [
    ("<not supported>,,cache-misses,0,100.00,,", 0, False, "<not supported>"),
    ("<not counted>,,cache-misses,0,0.00,,", 0, False, "<not counted>"),
    ("WARNING: perf not found for kernel 6.1", 2, False, "exit 2"),
    ("12345,,cache-misses,812345,100.00,,", 0, True, "counts"),
])
def test_perf_counter_support_reads_perf_stat(tmp_path, monkeypatch, stderr, code, supported,
                                              words):
    fake_perf(tmp_path, stderr, code)
    monkeypatch.setenv("PATH", str(tmp_path))
    result = perf_counter_support()
    assert result["supported"] is supported and words in result["reason"]


def test_perf_counter_support_without_perf(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert perf_counter_support() == {"supported": False, "reason": "perf not installed"}


# ---------------------------------------------------------------- the locality subcommand

def test_locality_study_end_to_end(tmp_path, capsys):
    from bench.commands.locality import main

    out = tmp_path / "study"
    # Each level is one run_bench.py sweep in a subprocess: most of this test's time.
    code = main(["--rows", "5000", "--dim", "8", "--pooling", "4", "--batch-size", "256",
                 "--levels", "0.2,0.9", "--llc-bytes", "8192", "--min-run-time", "0.02",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    table = pd.read_csv(out / "locality.csv")
    assert table["level"].tolist() == [0.2, 0.9]
    assert table["distribution"].tolist() == ["hitrate:0.2@256", "hitrate:0.9@256"]
    assert table["predicted_hit_rate_llc"].tolist() == pytest.approx([0.2, 0.9], abs=0.05)
    assert (table["status"] == "ok").all()
    assert (table[["gbps", "median_s", "samples_per_s"]] > 0).all().all()
    assert (out / "locality.png").read_bytes().startswith(b"\x89PNG")


def test_locality_rejects_a_cache_that_holds_the_table(tmp_path, capsys):
    from bench.commands import main

    code = main(["locality", "--rows", "100", "--dim", "8", "--llc-bytes", "1000000",
                 "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2 and "holds all 100 rows" in error and error.count("\n") == 1
    assert main(["locality", "--rows", "5000", "--levels", "1.5", "--llc-bytes", "4096",
                 "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "locality.csv").exists()


def test_tt_cache_comparison_regenerates_the_warm_up_trace(tmp_path):
    from bench.commands.locality import tt_cache_comparison

    run = tmp_path / "run"
    run.mkdir()
    argv = ["--workload", "synthetic", "--rows", "3000", "--dim", "8", "--pooling", "4",
            "--num-tables", "1", "--dist", "zipf:1.1", "--batch-size", "64", "--seed", "2"]
    (run / "args.json").write_text(json.dumps({"argv": argv}))
    params = json.dumps({"rows": 3000, "dim": 8, "distribution": "zipf:1.1", "cache": "lfu"})
    with ResultsWriter(run / "results.csv") as writer:
        for impl in ("tt_cached", "dense"):
            writer.write(ResultRow(op="tt_sls", impl=impl, workload="synthetic", params=params,
                                   precision="fp32", batch_size=64, median_s=1e-3,
                                   metrics=json.dumps({"hit_rate": 0.61}),
                                   timestamp="2025-01-01T00:00:00"))
    table = tt_cache_comparison(run)
    assert len(table) == 1 and table["cache_rows"].iloc[0] == 300
    assert table["observed_hit_rate"].iloc[0] == 0.61
    spec = synthetic(3000, 8, PoolingDistribution("fixed", 4.0), 1,
                     IndexDistribution("zipf", 1.1)).with_batch_size(64)
    warmup = np.concatenate([generators.make_table_batch(spec, 0, 2, batch).indices
                             for batch in range(1, 5)])
    evaluation = generators.make_table_batch(spec, 0, 2).indices
    assert table["predicted_lfu_hit_rate"].iloc[0] == pytest.approx(
        reuse.predict_lfu_hit_rate(warmup, evaluation, 300))
    assert 0 < table["predicted_lru_hit_rate"].iloc[0] < 1
