"""Calls per timing sample: exposed by bench.run.timing, recorded by the worker, kept by merges."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench.run import timing, worker
from bench.registry import Prepared
from bench.records import COLUMNS, ResultRow
from bench.run.telemetry import Telemetry
from reports import merge


class FakeWork:
    """A closure whose every call advances a fake clock by a fixed cost."""

    def __init__(self, cost_s: float):
        self.cost_s, self.calls = cost_s, 0

    def __call__(self) -> None:
        self.calls += 1

    def clock(self) -> float:
        return self.calls * self.cost_s


def test_time_cpu_says_how_many_calls_each_sample_averages():
    policy = timing.TimingPolicy(min_run_time_s=0.5, min_samples=6, max_run_time_s=100.0)
    fast = FakeWork(1e-5)
    samples = timing.time_cpu(fast, policy, threads=1, clock=fast.clock)
    # 10 us calls are timed in blocks: every sample is the mean of many calls.
    assert samples.calls_per_sample > 1
    slow = FakeWork(0.25)
    assert timing.time_cpu(slow, policy, threads=1, clock=slow.clock).calls_per_sample == 1
    summary = timing.summarize(samples, samples.calls_per_sample)
    assert summary.calls_per_sample == samples.calls_per_sample
    assert timing.summarize([1.0, 2.0]).calls_per_sample == 1


def test_worker_records_calls_per_sample_in_its_own_column():
    assert "calls_per_sample" in COLUMNS
    summary = timing.summarize([1e-3, 1.1e-3, 0.9e-3], calls_per_sample=40)
    prepared = Prepared(run=lambda: None, reference=lambda: None, samples=8, flops=1e6,
                        bytes_moved=1e6)
    observed = Telemetry(cpu_util=1.0, peak_rss_bytes=1.0)
    row, metrics = ResultRow(device="cpu"), {}
    worker._record_timing(row, prepared, summary, observed, 1, metrics)
    assert row.calls_per_sample == 40
    assert row.n_samples == 3


def test_merge_keeps_a_shared_block_size_and_forgets_a_mixed_one():
    row = ResultRow(task_key="k", op="sls", status="ok", n_samples=2, median_s=1.0,
                    samples_s=json.dumps([1.0, 1.0]), calls_per_sample=16, gbps=1.0)
    same = merge.merge_runs([[row], [dataclasses.replace(row)]])[0]
    assert same.calls_per_sample == 16
    mixed = merge.merge_runs([[row], [dataclasses.replace(row, calls_per_sample=4)]])[0]
    assert mixed.calls_per_sample == 0  # pooled samples of two block sizes: not one N


@pytest.mark.parametrize("calls, label", [(1, "single calls"), (8, "8-call block means"),
                                          (0, "samples of unrecorded block size")])
def test_sample_label(calls, label):
    from reports.tables import sample_label

    assert sample_label(calls) == label
