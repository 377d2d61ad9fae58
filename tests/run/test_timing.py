"""Timing: summary statistics and the CPU timer driven by an injected clock."""

from __future__ import annotations

import math

import pytest
import torch

from bench.run import timing
from bench.run.timing import Summary, TimingPolicy, autorange_run_time, summarize, time_cpu


# ---------------------------------------------------------------- summarize

def test_summarize_known_samples():
    summary = summarize([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert summary.samples_s == (5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0)
    assert summary.median_s == 5.5
    assert summary.mean_s == 5.5
    assert summary.min_s == 1.0
    # numpy's linear interpolation: position 0.9 * 9 = 8.1 -> 9.1; 0.99 * 9 = 8.91 -> 9.91
    assert summary.p90_s == pytest.approx(9.1)
    assert summary.p99_s == pytest.approx(9.91)
    assert summary.iqr_s == pytest.approx(7.75 - 3.25)
    assert summary.noisy  # IQR 4.5 > 10% of 5.5


def test_summarize_single_and_constant():
    one = summarize([0.25])
    assert (one.median_s, one.mean_s, one.p90_s, one.p99_s, one.min_s, one.iqr_s) == \
        (0.25, 0.25, 0.25, 0.25, 0.25, 0.0)
    constant = summarize([2e-3] * 7)
    assert constant.iqr_s == 0 and not constant.noisy


def test_summarize_odd_count_median_and_noise_threshold():
    summary = summarize([1.0, 1.02, 0.98, 1.01, 0.99])
    assert summary.median_s == 1.0
    assert summary.iqr_s == pytest.approx(0.02)
    assert not summary.noisy
    assert Summary((), 1.0, 1.0, 1.0, 1.0, 0.11, 1.0).noisy
    assert not Summary((), 1.0, 1.0, 1.0, 1.0, 0.09, 1.0).noisy


def test_summarize_rejects_empty():
    with pytest.raises(ValueError, match="no timing samples"):
        summarize([])


# ---------------------------------------------------------------- time_cpu with a fake clock

class FakeWork:
    """A closure whose every call advances a fake clock by a fixed cost."""

    def __init__(self, cost_s: float):
        self.cost_s = cost_s
        self.calls = 0
        self.calls_at_first_clock_read = None

    def __call__(self) -> None:
        self.calls += 1

    def clock(self) -> float:
        if self.calls_at_first_clock_read is None:
            self.calls_at_first_clock_read = self.calls
        return self.calls * self.cost_s


@pytest.mark.parametrize("cost_s", [1e-3, 0.25])
def test_time_cpu_fake_clock_gives_exact_times(cost_s):
    work = FakeWork(cost_s)
    policy = TimingPolicy(min_run_time_s=0.5, min_samples=6, max_run_time_s=100.0,
                          warmup_calls=3)
    samples = time_cpu(work, policy, threads=1, clock=work.clock)
    assert len(samples) >= policy.min_samples
    assert samples == pytest.approx([cost_s] * len(samples), rel=1e-9)
    # The warm-up calls happen before the clock is first read.
    assert work.calls_at_first_clock_read == 3
    # Enough repetitions to cover min_run_time (in fake seconds).
    assert sum(samples) >= policy.min_run_time_s * (1 - 1e-9)


def test_time_cpu_is_deterministic_with_a_fake_clock():
    policy = TimingPolicy(min_run_time_s=0.02, min_samples=12, max_run_time_s=10.0,
                          warmup_calls=1)
    work_a, work_b = FakeWork(2e-3), FakeWork(2e-3)
    first = time_cpu(work_a, policy, 1, clock=work_a.clock)
    second = time_cpu(work_b, policy, 1, clock=work_b.clock)
    assert first == second
    assert work_a.calls == work_b.calls
    assert len(first) >= 12


def test_time_cpu_adds_blocks_until_min_samples():
    # Each call costs 0.1 fake s and min_run_time is 0.15 s: blocked_autorange alone stops
    # after two blocks; time_cpu must add blocks to reach min_samples.
    work = FakeWork(0.1)
    policy = TimingPolicy(min_run_time_s=0.15, min_samples=9, max_run_time_s=100.0,
                          warmup_calls=0)
    samples = time_cpu(work, policy, threads=1, clock=work.clock)
    assert len(samples) >= 9
    assert samples == pytest.approx([0.1] * len(samples))


def test_time_cpu_respects_max_run_time():
    # With a 1 s cap on 0.1 s calls, time_cpu stops near 10 samples even though 1000 were
    # asked for.
    work = FakeWork(0.1)
    policy = TimingPolicy(min_run_time_s=0.15, min_samples=1000, max_run_time_s=1.0,
                          warmup_calls=0)
    samples = time_cpu(work, policy, threads=1, clock=work.clock)
    assert 2 <= len(samples) < 20
    assert sum(samples) >= 1.0 - 1e-9


def test_time_cpu_real_clock_smoke():
    calls = {"n": 0}

    def work():
        calls["n"] += 1
        return torch.ones(16).sum()

    policy = TimingPolicy(min_run_time_s=0.01, min_samples=5, max_run_time_s=2.0,
                          warmup_calls=2)
    samples = time_cpu(work, policy, threads=1)
    assert len(samples) >= 5
    assert all(value > 0 and math.isfinite(value) for value in samples)
    assert calls["n"] >= 2 + len(samples)


class FakeMonitor:
    """Records measure's start/stop calls and the elapsed time it is given."""

    def __init__(self):
        self.events, self.elapsed_s, self.result = [], None, object()

    def start(self):
        self.events.append("start")

    def stop(self, elapsed_s):
        self.events.append("stop")
        self.elapsed_s = elapsed_s
        return self.result


def test_measure_on_cpu_summarizes_what_time_cpu_returned(monkeypatch):
    policy = TimingPolicy(min_run_time_s=0.01, min_samples=4, max_run_time_s=2.0,
                          warmup_calls=1)
    received = []

    def fake_time_cpu(fn, given_policy, threads):
        received.append((fn, given_policy, threads))
        return [0.4, 0.1, 0.3, 0.2, 0.5]

    readings = iter([10.0, 12.5])
    monkeypatch.setattr(timing, "time_cpu", fake_time_cpu)
    monkeypatch.setattr(timing.timeit, "default_timer", lambda: next(readings))

    def work():
        return None

    monitor = FakeMonitor()
    summary, telemetry = timing.measure(work, torch.device("cpu"), policy, threads=3,
                                        monitor=monitor)
    assert received == [(work, policy, 3)]
    assert summary.samples_s == (0.4, 0.1, 0.3, 0.2, 0.5)
    assert (summary.median_s, summary.min_s) == (0.3, 0.1)
    assert summary.mean_s == pytest.approx(0.3)
    # The monitor spans the whole measurement and hands back its telemetry.
    assert monitor.events == ["start", "stop"] and telemetry is monitor.result
    assert monitor.elapsed_s == pytest.approx(2.5)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the IQR of infinities
def test_measure_refuses_a_non_finite_median(monkeypatch):
    monkeypatch.setattr(timing, "time_cpu", lambda fn, policy, threads: [math.inf] * 3)
    with pytest.raises(ValueError, match="non-finite"):
        timing.measure(lambda: None, torch.device("cpu"), TimingPolicy(), threads=1)


def test_measure_on_cpu_times_the_given_closure():
    calls = {"n": 0}

    def work():
        calls["n"] += 1
        return torch.ones(8) * 2

    policy = TimingPolicy(min_run_time_s=0.01, min_samples=4, max_run_time_s=2.0,
                          warmup_calls=1)
    summary, telemetry = timing.measure(work, torch.device("cpu"), policy, threads=1)
    assert telemetry is None  # no monitor given
    assert len(summary.samples_s) >= 4
    # Warm-up plus at least one call per sample: the closure given is the one timed.
    assert calls["n"] >= policy.warmup_calls + len(summary.samples_s)


def test_autorange_run_time_covers_min_samples_within_the_cap():
    policy = TimingPolicy(min_run_time_s=0.2, min_samples=10, max_run_time_s=5.0,
                          warmup_calls=2)
    assert autorange_run_time(policy, warmup_wall_s=0.0) == pytest.approx(0.2)
    assert autorange_run_time(policy, warmup_wall_s=2 * 0.1) == pytest.approx(1.0)
    assert autorange_run_time(policy, warmup_wall_s=2 * 1.6) == pytest.approx(5.0)
    no_warmup = TimingPolicy(min_run_time_s=0.2, min_samples=10, max_run_time_s=5.0,
                             warmup_calls=0)
    assert autorange_run_time(no_warmup, warmup_wall_s=1.0) == pytest.approx(0.2)


@pytest.mark.parametrize("cost_s", [0.05, 0.5, 1.6])
def test_a_slow_closure_pays_no_untimed_calls_beyond_warm_up_and_the_estimate(
        monkeypatch, cost_s):
    # The warm-up's wall (read from monotonic_s) sets the autorange's run time, so the samples
    # come from one autorange: the calls are the warm-up, the block-size estimate and the
    # samples, not three calls a sample (Timer.timeit's own two warm-up calls each).
    work = FakeWork(cost_s)
    monkeypatch.setattr(timing, "monotonic_s", work.clock)
    policy = TimingPolicy(min_run_time_s=0.2, min_samples=10, max_run_time_s=5.0,
                          warmup_calls=2)
    samples = time_cpu(work, policy, threads=1, clock=work.clock)
    assert samples == pytest.approx([cost_s] * len(samples))
    assert work.calls == 2 + 1 + len(samples)
    assert len(samples) >= min(10, int(5.0 / cost_s))
