"""cuda_graph impls: static buffers, capture and replay orchestration on the CPU with an eager
stand-in for the graph, checked against float64; on a CPU sweep they are skipped rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.run.settings import WorkerSettings
from bench.ops import dlrm_cuda_graph
from bench.ops.dlrm import LEARNING_RATE, build_infer
from bench.ops.dlrm_cuda_graph import (CPU_SKIP, WARM_UP_CALLS, StaticCall, build_graphed_infer,
                                       build_graphed_train, fill, static_copies)
from bench.records import ResultRow
from bench.registry import BuildContext, Unsupported
from bench.run import worker
from bench.run.sweep import plan
from workloads import presets
from workloads.specs import PoolingDistribution

from conftest import tiny_workload

CPU = torch.device("cpu")
SMOKE = presets.smoke()


class EagerGraph:
    """A CUDA graph's stand-in: capture runs the warm-up calls as capture_cuda does; replay()
    runs the captured function eagerly."""

    made: list["EagerGraph"] = []

    def __init__(self, function, warm_up_calls):
        self.function, self.replays, self.outputs = function, 0, None
        for _ in range(warm_up_calls):
            function()
        EagerGraph.made.append(self)

    def replay(self):
        self.replays += 1
        self.outputs = self.function()


def _context(precision="fp32", workload=SMOKE, variant=None, time_calls=None) -> BuildContext:
    return BuildContext(workload=workload, variant=variant or {}, precision=precision,
                        device=CPU, seed=0, time_calls=time_calls)


def _check(prepared, precision) -> str:
    row = ResultRow()
    message = worker.check(prepared, row, precision)
    assert message or math.isfinite(row.rel_error)
    return message


def test_static_buffers_keep_structure_and_storage_and_refuse_other_shapes():
    inputs = (torch.arange(4.0), [torch.arange(3), torch.arange(2)])
    static = static_copies(inputs)
    assert isinstance(static[1], list)
    assert static[0].data_ptr() != inputs[0].data_ptr()
    pointers = [static[0].data_ptr(), static[1][0].data_ptr()]
    fill(static, (torch.full((4,), 7.0), [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]))
    assert static[0].tolist() == [7.0] * 4 and static[1][0].tolist() == [5, 6, 7]
    assert [static[0].data_ptr(), static[1][0].data_ptr()] == pointers  # filled in place
    with pytest.raises(ValueError, match="shape"):
        fill(static, (torch.zeros(5), [torch.zeros(3), torch.zeros(2)]))


def test_a_static_call_replays_over_the_same_buffers_with_each_calls_inputs():
    seen = []

    def function(values):
        seen.append(values.data_ptr())
        return values * 2

    call = StaticCall(function, (torch.zeros(3),), EagerGraph)
    assert len(seen) == WARM_UP_CALLS  # warmed up at capture, never replayed yet
    assert call(torch.tensor([1.0, 2.0, 3.0])).tolist() == [2.0, 4.0, 6.0]
    assert call(torch.tensor([4.0, 5.0, 6.0])).tolist() == [8.0, 10.0, 12.0]
    assert len(set(seen)) == 1  # every call read the one static buffer


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_graphed_inference_passes_the_float64_check_and_replays_each_batch(precision):
    clock = []
    prepared = build_graphed_infer(
        _context(precision, time_calls=lambda fn, count: [fn(), clock.append(1), 0.25][2:]),
        capture=EagerGraph)
    assert _check(prepared, precision) == ""
    assert prepared.params["replay"] == dlrm_cuda_graph.INFER_REPLAY
    assert prepared.metrics["capture_s"] == 0.25 and clock == [1]
    eager = build_infer(_context(precision), "batched")
    assert prepared.params["rotation_batches"] >= 2
    for _ in range(prepared.params["rotation_batches"] + 1):
        # Each replay computes its own batch (the static buffers were refilled).
        assert torch.equal(prepared.run(), eager.run())


def test_a_graph_whose_buffers_are_not_refilled_is_caught(monkeypatch):
    """Planted fault: replays that skip the copy into the static buffers compute the captured
    batch again; the per-batch comparison above tells."""
    prepared = build_graphed_infer(_context(), capture=EagerGraph)
    eager = build_infer(_context(), "batched")
    monkeypatch.setattr(dlrm_cuda_graph, "fill", lambda static, inputs: None)
    outputs = [(prepared.run(), eager.run()) for _ in range(2)]
    assert torch.equal(*outputs[0]) and not torch.equal(*outputs[1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_training_passes_the_float64_check_after_its_warm_up(precision):
    EagerGraph.made.clear()
    prepared = build_graphed_train(_context(precision), capture=EagerGraph)
    # The warm-up trained the student; the check resets it and replays the checked batch.
    assert _check(prepared, precision) == ""
    assert prepared.params["replay"] == dlrm_cuda_graph.TRAIN_REPLAY
    assert "capture_s" not in prepared.metrics  # no clock given
    graph = EagerGraph.made[-1]
    before = graph.replays
    for _ in range(prepared.params["rotation_batches"]):
        logits = prepared.run()
        assert logits.shape == (SMOKE.batch_size,) and bool(torch.isfinite(logits).all())
    assert graph.replays == before + prepared.params["rotation_batches"]


def test_a_wrong_update_in_the_graphed_step_fails_the_check():
    prepared = build_graphed_train(_context(), capture=EagerGraph,
                                   learning_rate=5 * LEARNING_RATE,
                                   reference_learning_rate=LEARNING_RATE)
    assert "exceed" in _check(prepared, "fp32")


def test_refusals_name_their_reason():
    with pytest.raises(Unsupported, match="cuda only"):
        build_graphed_infer(_context())  # the real capture on a CPU
    with pytest.raises(Unsupported, match="cuda only"):
        build_graphed_train(_context())
    variable = tiny_workload(pooling=PoolingDistribution("uniform", 3.0, 1.0))
    with pytest.raises(Unsupported, match="variable pooling"):
        build_graphed_train(_context(workload=variable), capture=EagerGraph)
    with pytest.raises(Unsupported, match="TT-Rec"):
        build_graphed_infer(_context(variant={"tt_tables": 1, "tt_rank": 4}),
                            capture=EagerGraph)
    with pytest.raises(Unsupported, match="fp32/bf16"):
        build_graphed_train(_context("fp16"), capture=EagerGraph)


def test_a_cpu_sweep_shows_cuda_graph_as_skipped_rows_saying_cuda_only():
    planned = plan(["dlrm_infer", "dlrm_train"], [SMOKE], ["fp32"], ["cpu"], ["native"], [1], 0,
                   {}, {"cuda_graph"})
    assert {item.task.op for item in planned} == {"dlrm_infer", "dlrm_train"}
    for item in planned:
        assert item.skip_reason == (f"{item.task.op}/cuda_graph does not run on cpu "
                                    "(cuda only)")
    assert CPU_SKIP.startswith("cuda_graph captures CUDA kernels")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
@pytest.mark.parametrize("op, precision", [("dlrm_infer", "fp32"), ("dlrm_infer", "bf16"),
                                           ("dlrm_train", "fp32"), ("dlrm_train", "bf16")])
def test_cuda_graph_captures_replays_and_checks_on_cuda(op, precision):
    from bench.records import STATUS_OK
    from bench.run.tasks import Task
    from conftest import FAST_POLICY

    task = Task(op=op, impl="cuda_graph", workload=SMOKE, variant={}, precision=precision,
                device="cuda:0", isa="native", threads=1, seed=0)
    row = worker.run_task(task, WorkerSettings("cuda-graph", FAST_POLICY))
    assert row.status == STATUS_OK, row.error
    assert json.loads(row.metrics)["capture_s"] > 0
