"""The only code that reads a clock: torch.utils.benchmark on CPU, CUDA events on GPU."""

from __future__ import annotations

import dataclasses
import math
import timeit
from typing import Any, Callable, Optional

import torch
import torch.utils.benchmark as torch_benchmark

from bench.records import NOISY_IQR_RATIO, Summary, summarize  # noqa: F401 (re-exported)

@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    """How long and how often to time a closure."""

    min_run_time_s: float = 0.5  # measure at least this long in total
    min_samples: int = 10  # and keep at least this many per-repetition times
    max_run_time_s: float = 20.0  # stop adding repetitions past this, even below min_samples
    warmup_calls: int = 2  # untimed calls first: caches, JIT kernels, allocator pools


class BlockTimes(list):
    """Per-sample seconds, each the mean of calls_per_sample back-to-back calls, and the wall
    the untimed warm-up calls before them took."""

    calls_per_sample: int = 1
    warmup_wall_s: float = 0.0


def time_cpu(fn: Callable[[], Any], policy: TimingPolicy, threads: int,
             clock: Callable[[], float] = timeit.default_timer) -> list[float]:
    """Per-repetition seconds of fn via torch.utils.benchmark (blocks of calls for short fns);
    the warm-up's wall is read from monotonic_s, as measure reads its own."""
    warmup_started = last_call_started = monotonic_s()
    for _ in range(policy.warmup_calls):
        last_call_started = monotonic_s()
        fn()
    warmup_ended = monotonic_s()
    warmup_wall_s = warmup_ended - warmup_started
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads,
                                  timer=clock)
    # The last warm-up call sets the pace (the first is the cold one).
    last_call_s = warmup_ended - last_call_started if policy.warmup_calls else 0.0
    measurement = timer.blocked_autorange(min_run_time=autorange_run_time(policy, last_call_s))
    samples = list(measurement.times)
    spent = sum(samples) * measurement.number_per_run
    # Only when the warm-up misjudged the call (or there was none): add blocks until there are
    # enough repetitions for percentiles, within the time cap. Timer.timeit runs two untimed
    # calls before each block, so this path costs three calls a sample.
    while len(samples) < policy.min_samples and spent < policy.max_run_time_s:
        extra = timer.timeit(number=measurement.number_per_run)
        samples.extend(extra.times)
        spent += sum(extra.times) * measurement.number_per_run
    blocks = BlockTimes(samples)
    blocks.calls_per_sample = int(measurement.number_per_run)
    blocks.warmup_wall_s = warmup_wall_s
    return blocks


def autorange_run_time(policy: TimingPolicy, call_s: float) -> float:
    """blocked_autorange's min_run_time: long enough for min_samples calls of call_s seconds,
    within [min_run_time, max_run_time], so one autorange yields the samples."""
    wanted = max(policy.min_run_time_s, policy.min_samples * call_s)
    return min(wanted, max(policy.max_run_time_s, policy.min_run_time_s))


def monotonic_s() -> float:
    """Seconds on the measuring clock, for deadlines (a batcher's timeout), not for figures."""
    return timeit.default_timer()


def time_each_call(fn: Callable[[], Any], count: int) -> list[float]:
    """Seconds of each of count calls of fn, read from time_cpu's clock (no warm-up, no blocks)."""
    clock = timeit.default_timer
    seconds = []
    for _ in range(count):
        start = clock()
        fn()
        seconds.append(clock() - start)
    return seconds


class _L2Flusher:
    """Writes a buffer larger than the GPU's L2 so each repetition starts with a cold cache."""

    def __init__(self, device: torch.device):
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        size = max(2 * int(l2_bytes), 64 << 20)
        self.buffer = torch.empty(size // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def cuda_repetitions(call_s: float, flush_s: float, policy: TimingPolicy) -> int:
    """Repetitions: min_run_time of timed calls, within max_run_time of wall incl. flushes."""
    # The flush runs between repetitions and is not in the samples, but it costs wall time:
    # a 10 us kernel after a 40 us flush would otherwise run 5x past max_run_time.
    call_s = max(call_s, 1e-6)
    repetition_wall_s = call_s + max(flush_s, 0.0)
    wanted = max(policy.min_samples, math.ceil(policy.min_run_time_s / call_s))
    allowed = max(policy.min_samples, int(policy.max_run_time_s / repetition_wall_s))
    return int(min(wanted, allowed))


def time_cuda(fn: Callable[[], Any], policy: TimingPolicy, device: torch.device,
              flush_l2: bool, region=None) -> list[float]:
    """Per-repetition seconds of fn from CUDA events, one pair per call, synchronised once.

    region (a telemetry.Monitor) is told when the timed repetitions begin and end, so that
    energy is read over them only, not over warm-up or the probe."""
    with torch.cuda.device(device):
        warmup_started = monotonic_s()
        for _ in range(policy.warmup_calls):
            fn()
        torch.cuda.synchronize()
        warmup_wall_s = monotonic_s() - warmup_started
        flush: Optional[_L2Flusher] = _L2Flusher(device) if flush_l2 else None
        # Estimate the per-call time (and the flush's) to choose a repetition count.
        probe_start, probe_middle, probe_end = (torch.cuda.Event(True) for _ in range(3))
        probe_start.record()
        if flush is not None:
            flush()
        probe_middle.record()
        fn()
        probe_end.record()
        torch.cuda.synchronize()
        flush_s = probe_start.elapsed_time(probe_middle) / 1e3
        estimate_s = probe_middle.elapsed_time(probe_end) / 1e3
        repetitions = cuda_repetitions(estimate_s, flush_s, policy)
        events = [(torch.cuda.Event(True), torch.cuda.Event(True)) for _ in range(repetitions)]
        torch.cuda.synchronize()
        if region is not None:
            region.begin_timed()
        started = monotonic_s()
        for start, end in events:
            if flush is not None:
                flush()  # outside the event pair: its time is not counted
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        if region is not None:
            region.end_timed(monotonic_s() - started)
        samples = BlockTimes(start.elapsed_time(end) / 1e3 for start, end in events)
        samples.warmup_wall_s = warmup_wall_s
        return samples


def measure(fn: Callable[[], Any], device: torch.device, policy: TimingPolicy, threads: int,
            flush_l2: bool = False, monitor=None) -> tuple[Summary, Any]:
    """Time fn on its device; returns the summary and the monitor's telemetry (or None). The
    summary's warmup_wall_s and timed_wall_s split the wall of this call: the untimed warm-up
    calls, and the rest of the timed window (choosing a repetition count, the repetitions)."""
    if monitor is not None:
        monitor.start()
    started = monotonic_s()
    if device.type == "cuda":
        samples = time_cuda(fn, policy, device, flush_l2, region=monitor)
    else:
        samples = time_cpu(fn, policy, threads)
    elapsed_s = monotonic_s() - started
    telemetry = monitor.stop(elapsed_s) if monitor is not None else None
    summary = summarize(samples, getattr(samples, "calls_per_sample", 1))
    if not math.isfinite(summary.median_s):
        raise ValueError("timing produced a non-finite median")
    warmup_wall_s = float(getattr(samples, "warmup_wall_s", 0.0))
    return dataclasses.replace(summary, warmup_wall_s=warmup_wall_s,
                               timed_wall_s=elapsed_s - warmup_wall_s), telemetry


class PhaseTimer:
    """Seconds of the named phases of one multi-phase call (a distributed step), read from
    time_cpu's clock; synchronize runs before each reading so that queued GPU work counts in
    the phase that launched it."""

    def __init__(self, synchronize: Optional[Callable[[], None]] = None,
                 clock: Callable[[], float] = timeit.default_timer):
        self.synchronize = synchronize or (lambda: None)
        self.clock = clock
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        """Forget the phases of the previous call."""
        self.seconds = {}

    def phase(self, name: str) -> "_Phase":
        """A context manager adding its duration to phase name (repeated phases accumulate)."""
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> "_Phase":
        self.timer.synchronize()
        self.started = self.timer.clock()
        return self

    def __exit__(self, *exc_info) -> None:
        self.timer.synchronize()
        elapsed = self.timer.clock() - self.started
        self.timer.seconds[self.name] = self.timer.seconds.get(self.name, 0.0) + elapsed
