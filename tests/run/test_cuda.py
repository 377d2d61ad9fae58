"""The GPU path: CUDA-event timing and ops on cuda; skipped cleanly where no GPU exists."""

import pytest
import torch

from bench.run import timing
from bench.records import STATUS_OK, STATUS_SKIPPED
from bench.run.settings import WorkerSettings
from bench.run.tasks import Task
from bench.run.worker import run_task
from workloads.presets import smoke

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
POLICY = timing.TimingPolicy(min_run_time_s=0.02, min_samples=5, max_run_time_s=2,
                             warmup_calls=1)
SETTINGS = WorkerSettings("cuda-test", POLICY)


def test_cuda_events_time_each_repetition():
    matrix = torch.randn(512, 512, device="cuda")
    samples = timing.time_cuda(lambda: matrix @ matrix, POLICY, torch.device("cuda:0"),
                               flush_l2=True)
    assert len(samples) >= POLICY.min_samples
    assert all(sample > 0 for sample in samples)


@pytest.mark.parametrize("op, impl, variant", [
    ("sls", "embedding_bag", {"mode": "sum"}),
    ("fc", "torch_linear", {"layer": "linear"}),
    ("dlrm_infer", "batched", {}),
    ("dlrm_train", "fused_sgd", {}),
])
def test_ops_run_and_check_on_cuda(op, impl, variant):
    task = Task(op=op, impl=impl, workload=smoke(), variant=variant, precision="fp32",
                device="cuda:0", isa="native", threads=1, seed=0)
    row = run_task(task, SETTINGS)
    assert row.status == STATUS_OK, row.error
    assert row.rel_error < 1e-4 and row.median_s > 0


def test_quantized_tables_are_skipped_on_cuda_with_a_reason():
    task = Task(op="sls", impl="embedding_bag", workload=smoke(), variant={"mode": "sum"},
                precision="int8", device="cuda:0", isa="native", threads=1, seed=0)
    row = run_task(task, SETTINGS)
    assert row.status == STATUS_SKIPPED and "CPU-only" in row.error
