"""Serving under LoadGen: rows carry LoadGen's own figures, batching merges and splits without
losing items, a crashed worker is an error row, the SLA search bisects on LoadGen's verdicts."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from bench.commands import main
from bench.faults import EXIT_CODE
from bench.records import STATUS_ERROR, STATUS_OK, read_rows
from bench.serve.batching import STOP, Batcher, BatchPolicy, Query
from bench.serve.queries import QuerySizeError, parse_query_sizes, query_table
from bench.serve.search import Probe, search_max_qps

pytest.importorskip("mlperf_loadgen")

SMOKE_SERVE = ["serve", "--workload", "smoke", "--query-size", "uniform:1,24",
               "--queries", "128", "--min-queries", "300", "--min-duration", "0.2"]


def _summary_figures(path) -> dict:
    """The summary log's figures, read independently of bench.serve.loadgen_logs."""
    text = path.read_text()
    latency = {name: int(re.search(rf"{re.escape(key)} percentile latency \(ns\)\s*:\s*(\d+)",
                                   text).group(1)) / 1e9
               for key, name in (("50.00", "p50_s"), ("90.00", "p90_s"), ("99.00", "p99_s"),
                                 ("99.90", "p999_s"))}
    completed = float(re.search(r"Completed samples per second\s*:\s*([\d.]+)", text).group(1))
    result = re.search(r"Result is : (\w+)", text).group(1)
    return {**latency, "completed_qps": completed, "result": result}


@pytest.mark.slow
def test_server_rows_hold_loadgens_figures_and_an_overload_ends_invalid(tmp_path):
    code = main([*SMOKE_SERVE, "--qps", "300,100000", "--sla-ms", "20", "--batching", "off,on",
                 "--max-batch", "16", "--batch-timeout-ms", "1", "--out", str(tmp_path),
                 "--run-id", "server"])
    assert code == 0
    directory = tmp_path / "server"
    rows = read_rows(directory / "results.csv")
    assert len(rows) == 4 and all(row.status == STATUS_OK for row in rows)
    for row in rows:
        metrics, params = json.loads(row.metrics), json.loads(row.params)
        logs = directory / metrics["loadgen_logs"]
        assert (logs / "mlperf_log_detail.txt").is_file()
        summary = _summary_figures(logs / "mlperf_log_summary.txt")
        assert row.median_s == pytest.approx(summary["p50_s"], abs=1e-9)
        assert row.p90_s == pytest.approx(summary["p90_s"], abs=1e-9)
        assert row.p99_s == pytest.approx(summary["p99_s"], abs=1e-9)
        assert metrics["p999_s"] == pytest.approx(summary["p999_s"], abs=1e-9)
        assert metrics["completed_qps"] == pytest.approx(summary["completed_qps"], abs=0.01)
        assert metrics["result"] == summary["result"]
        assert metrics["met_sla"] == (summary["result"] == "VALID")
        # The settings that judged the run are the recorded ones.
        assert (params["min_query_count"], params["sla_ms"]) == (300, 20.0)
        assert metrics["query_count"] >= 300 == metrics["min_query_count"]
        served = metrics["served_query_items"]
        assert served["count"] == metrics["query_count"] == row.n_samples
        assert 1 <= served["min"] <= served["max"] <= 24
        assert sum(worker["queries"] for worker in metrics["per_worker"].values()) == \
            metrics["query_count"]
        assert sum(worker["qps"] for worker in metrics["per_worker"].values()) == \
            pytest.approx(metrics["completed_qps"])
        if params["target_qps"] == 100000:
            # Far beyond what the worker serves: LoadGen says INVALID, the run still ends.
            assert metrics["result"] == "INVALID" and not metrics["perf_constraints_met"]
        if params["batching"] == "on":
            assert row.batch_size == 16
    assert (directory / "report" / "fig-serving-latency.png").stat().st_size > 0


@pytest.mark.slow
def test_a_worker_crash_ends_the_run_with_an_error_row(tmp_path):
    code = main([*SMOKE_SERVE, "--qps", "300", "--workers", "1", "--plant-fault",
                 "serve.batch:exit:5", "--out", str(tmp_path), "--run-id", "crash"])
    assert code == 1
    (row,) = read_rows(tmp_path / "crash" / "results.csv")
    assert row.status == STATUS_ERROR and f"died (exit code {EXIT_CODE})" in row.error


@pytest.mark.parametrize("argv, message", [
    (["--qps", "10", "--workers", "100000"], "CPUs"),
    ([], "needs --qps"),
    (["--qps", "10", "--query-size", "zipf:3"], "--query-size"),
    (["--qps", "10", "--impl", "nope"], "dlrm_infer impl"),
    (["--qps", "-1"], "--qps"),
])
def test_bad_input_is_refused_before_work(tmp_path, capsys, argv, message):
    assert main(["serve", "--workload", "smoke", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _batches(policies, queries, arrivals_s=None):
    """Run a Batcher on a simulated clock, each query arriving at its time (default all at
    0), then STOP; the pieces of every batch."""
    arrivals_s = list(arrivals_s or [0.0] * len(queries))
    incoming = list(zip(arrivals_s, queries)) + [(arrivals_s[-1], STOP)]
    now = [0.0]

    def receive(timeout_s):
        arrival_s, item = incoming[0]
        if timeout_s is not None and arrival_s > now[0] + timeout_s:
            now[0] += timeout_s
            return None  # nothing arrived within the timeout
        now[0] = max(now[0], arrival_s)
        incoming.pop(0)
        return item

    batcher, batches = Batcher(policies, receive, lambda: now[0]), []
    while (pieces := batcher.next_batch()) is not None:
        batches.append(pieces)
    return batches


def test_batcher_merges_to_the_cap_and_splits_large_queries():
    queries = [Query(0, index, start=index * 10, items=items)
               for index, items in enumerate([3, 5, 20, 2])]
    batches = _batches([BatchPolicy(True, 8, 1.0)], queries)
    assert [sum(piece.items for piece in pieces) for pieces in batches] == [8, 8, 8, 6]
    # Every query's rows are served once, in order, and its last piece is flagged once.
    for query in queries:
        pieces = [piece for pieces in batches for piece in pieces if piece.query == query]
        assert sum(piece.items for piece in pieces) == query.items
        assert pieces[0].start == query.start and [p.last for p in pieces][-1]
        assert sum(piece.last for piece in pieces) == 1
    assert len(_batches([BatchPolicy(False)], queries)) == 4  # off: one forward per query


def test_batcher_timeout_closes_a_batch_and_a_new_policy_starts_a_new_one():
    queries = [Query(0, 0, 0, 2), Query(0, 1, 5, 2), Query(0, 2, 9, 2), Query(1, 3, 20, 2)]
    policies = [BatchPolicy(True, 8, 0.5)] * 2
    # The second query comes within the first's 0.5 s, the third 2 s later: two batches; the
    # fourth names another policy (the next run): a batch of its own.
    sizes = [len(pieces) for pieces in _batches(policies, queries, [0.0, 0.3, 2.3, 2.4])]
    assert sizes == [2, 1, 1]
    assert [len(pieces) for pieces in _batches(policies, queries)] == [3, 1]


def test_merged_batches_give_the_logits_of_each_query_alone():
    from bench import registry
    from bench.registry import BuildContext
    from bench.serve.pool import SamplePool
    from workloads.presets import preset

    workload = preset("smoke")
    prepared = registry.impls("dlrm_infer")["batched"].build(
        BuildContext(workload, {}, "fp32", torch.device("cpu"), 0))
    pool = SamplePool(workload, 0, 256)
    windows = [(3, 5), (100, 1), (40, 17)]
    merged = prepared.forward(*pool.batch(windows))
    alone = torch.cat([prepared.forward(*pool.batch([window])) for window in windows])
    assert merged.shape == (23,) and torch.allclose(merged, alone, rtol=1e-5, atol=1e-6)


def test_query_sizes_are_seeded_and_bounded():
    sizes = parse_query_sizes("dlrmv2")
    table = query_table(sizes, 500, seed=3)
    assert table == query_table(sizes, 500, seed=3) != query_table(sizes, 500, seed=4)
    assert 100 <= min(table.sizes) and max(table.sizes) <= 700
    assert all(start + size <= table.pool_rows for start, size in zip(table.starts, table.sizes))
    heavy = query_table(parse_query_sizes("production"), 4000, seed=0).sizes
    assert max(heavy) > 8 * sorted(heavy)[len(heavy) // 2]  # a heavy tail
    assert set(query_table(parse_query_sizes("fixed:7"), 10, 0).sizes) == {7}
    for bad in ("uniform:9,2", "fixed:0", "lognormal:1", "pareto"):
        with pytest.raises(QuerySizeError):
            parse_query_sizes(bad)


def test_search_bisects_on_the_verdicts_and_says_when_no_qps_meets_the_bound():
    seen = []

    def probe(qps):
        seen.append(qps)
        return Probe(qps, qps <= 300, 0.001 * qps)

    result = search_max_qps(probe, 100, 1000, steps=6)
    assert 260 < result.best_qps <= 300 and len(seen) == 6 and 100 not in seen
    assert all(item.valid == (item.qps <= 300) for item in result.probes)
    low = search_max_qps(lambda qps: Probe(qps, qps <= 100, 0.01), 100, 1000, steps=2)
    assert low.best_qps == 100 and low.probes[-1].qps == 100  # the floor, probed last
    never = search_max_qps(lambda qps: Probe(qps, False, 0.5), 100, 1000, steps=6)
    assert never.best_qps is None and len(never.probes) == 7 and never.probes[-1].qps == 100
    assert "no offered QPS met the bound" in never.message and "500 ms" in never.message
    assert not math.isnan(never.probes[0].percentile_s)
