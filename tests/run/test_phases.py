"""Where a row's wall went: setup, check, reference, warm-up and timing columns of run_task."""

from __future__ import annotations

import math
import timeit

import pytest
import torch

from bench import registry
from bench.records import (STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, ResultRow, ResultsWriter,
                           read_rows)
from bench.registry import Impl, Prepared, Unsupported
from bench.run import timing, worker
from bench.run.settings import WorkerSettings
from bench.run.tasks import Task
from bench.run.timing import TimingPolicy
from workloads import presets

SMOKE = presets.smoke()
PHASES = ("setup_s", "check_s", "reference_s", "warmup_s", "timing_s")
EXPECTED = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)


def _task(impl_name: str) -> Task:
    return Task(op="sls", impl=impl_name, workload=SMOKE, variant={"mode": "sum"},
                precision="fp32", device="cpu", isa="native", threads=1, seed=0, options={})


def _fake_impl(monkeypatch, build, name="fake"):
    registry.load_all()
    monkeypatch.setitem(registry._IMPLS["sls"], name, Impl("sls", name, build, ("fp32",)))
    return name


class FakeClock:
    """The measuring clock, advanced only by the fake op's steps (each by a known cost)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    # monotonic_s and time_cpu's default clock both read timeit's default timer.
    monkeypatch.setattr(timing.timeit, "default_timer", fake)
    monkeypatch.setattr(timing, "time_cpu", _time_cpu_on(fake))
    return fake


def _time_cpu_on(fake: FakeClock):
    real = timing.time_cpu

    def time_cpu(fn, policy, threads):
        return real(fn, policy, threads, clock=fake)

    return time_cpu


def _costed_build(clock: FakeClock, output=EXPECTED.float(), build_s=3.0, check_s=5.0,
                  reference_s=7.0, call_s=0.01):
    def build(context):
        clock.spend(build_s)

        def check():
            clock.spend(check_s)
            return output

        def reference():
            clock.spend(reference_s)
            return EXPECTED

        return Prepared(run=lambda: clock.spend(call_s), check=check, reference=reference,
                        samples=4, flops=1.0, bytes_moved=1.0)

    return build


def test_phases_of_an_ok_row_are_the_costs_spent_in_each(monkeypatch, clock):
    name = _fake_impl(monkeypatch, _costed_build(clock))
    policy = TimingPolicy(min_run_time_s=0.2, min_samples=5, max_run_time_s=5.0,
                          warmup_calls=3)
    started = clock()
    row = worker.run_task(_task(name), WorkerSettings("r", policy))
    wall_s = clock() - started
    assert row.status == STATUS_OK, row.error
    assert row.setup_s == pytest.approx(3.0)
    assert row.check_s == pytest.approx(5.0)
    assert row.reference_s == pytest.approx(7.0)
    assert row.warmup_s == pytest.approx(3 * 0.01)
    # The timed window holds at least the timed repetitions (and the calibration calls).
    assert row.timing_s >= row.n_samples * row.calls_per_sample * 0.01 * (1 - 1e-9)
    # Contiguous phases: together they are the task's whole wall in the worker.
    assert sum(getattr(row, phase) for phase in PHASES) == pytest.approx(wall_s)


def test_phases_of_an_error_row_stop_where_it_failed(monkeypatch, clock):
    name = _fake_impl(monkeypatch, _costed_build(clock, output=EXPECTED.float() * 2))
    row = worker.run_task(_task(name), WorkerSettings("r", TimingPolicy()))
    assert row.status == STATUS_ERROR
    assert (row.setup_s, row.check_s, row.reference_s) == pytest.approx((3.0, 5.0, 7.0))
    assert math.isnan(row.warmup_s) and math.isnan(row.timing_s)


def test_phases_of_a_skipped_row_are_nan(monkeypatch, fast_policy):
    def build(context):
        raise Unsupported("not here")

    row = worker.run_task(_task(_fake_impl(monkeypatch, build)), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_SKIPPED
    assert all(math.isnan(getattr(row, phase)) for phase in PHASES)


def test_phases_of_a_real_row_add_up_to_its_wall(fast_policy):
    started = timeit.default_timer()
    row = worker.run_task(_task("embedding_bag"), WorkerSettings("r", fast_policy))
    wall_s = timeit.default_timer() - started
    assert row.status == STATUS_OK, row.error
    values = [getattr(row, phase) for phase in PHASES]
    assert all(math.isfinite(value) and value >= 0 for value in values), values
    assert row.warmup_s > 0 and row.timing_s >= sum(row_samples(row))
    # Inside the wall the test saw (the phases leave out only returning the row).
    assert sum(values) <= wall_s


def row_samples(row: ResultRow) -> list[float]:
    from bench.records import samples_from_row

    return [value * row.calls_per_sample for value in samples_from_row(row)]


def test_measure_splits_warm_up_from_the_timed_window(clock):
    policy = TimingPolicy(min_run_time_s=0.2, min_samples=5, max_run_time_s=5.0,
                          warmup_calls=4)
    summary, _ = timing.measure(lambda: clock.spend(0.02), torch.device("cpu"), policy, 1)
    assert summary.warmup_wall_s == pytest.approx(4 * 0.02)
    assert summary.timed_wall_s >= sum(summary.samples_s) * summary.calls_per_sample


def test_older_results_read_with_nan_phases_and_resume_keeps_their_header(tmp_path):
    path = tmp_path / "results.csv"
    old_columns = [name for name in ResultRow.__dataclass_fields__ if name not in PHASES]
    old = ResultRow(schema_version=2, op="sls", task_key="old", median_s=1.0)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        import csv

        from bench.records import row_to_record

        writer = csv.DictWriter(handle, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerow(row_to_record(old))
    with ResultsWriter(path) as writer:  # a resume appends under the file's own header
        writer.write(ResultRow(op="sls", task_key="new", median_s=2.0, setup_s=1.5))
    back = read_rows(path)
    assert [row.task_key for row in back] == ["old", "new"]
    assert [row.median_s for row in back] == [1.0, 2.0]
    assert all(math.isnan(getattr(row, phase)) for row in back for phase in PHASES)


def test_the_report_sums_each_op_s_phases_and_timing_share():
    from reports.phases import phase_table, timing_share_line
    from reports.runs import rows_to_frame

    rows = [ResultRow(op="sls", setup_s=1.0, check_s=0.5, reference_s=0.5, warmup_s=1.0,
                      timing_s=2.0),
            ResultRow(op="sls", setup_s=1.0, check_s=0.5, reference_s=0.5, warmup_s=0.0,
                      timing_s=2.0),
            ResultRow(op="fc", status=STATUS_ERROR, setup_s=3.0, check_s=1.0),
            ResultRow(op="fc", status=STATUS_SKIPPED)]
    table = phase_table(rows_to_frame(rows), {"sls": 1, "fc": 2}).set_index("op")
    assert list(table.index) == ["sls", "fc", "all ops"]
    assert table.loc["sls", "rows"] == 2 and table.loc["fc", "rows"] == 1
    assert table.loc["sls", "wall_s"] == pytest.approx(9.0)
    assert table.loc["sls", "timing_share"] == pytest.approx(4.0 / 9.0, abs=1e-3)
    assert table.loc["fc", "timing_share"] == 0.0
    assert table.loc["all ops", "wall_s"] == pytest.approx(13.0)
    assert "timing took 31% of the 13.0 s" in timing_share_line(rows)
    assert phase_table(rows_to_frame([ResultRow(op="sls")]), {}).empty  # schema 2 rows
    assert timing_share_line([ResultRow(op="sls")]) == ""
