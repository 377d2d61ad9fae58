"""GPU-sized work: the batch a GPU is measured at without --batch-size, and the memory planner
holding a GPU run's tables to the device's memory (faked here: no GPU needed to pick a number)."""

from __future__ import annotations

import re

import pytest

from bench.commands.sweep import parse_sweep, workload_choices
from bench.run.sweep import (WORKER_BASE_BYTES, LeftOut, MemoryBudget, Named, check_memory,
                             device_memory_bytes, estimate_bytes, memories, plan)
from workloads import presets
from workloads.resolve import WorkloadChoices, resolve_workloads
from workloads.specs import SpecError

GIB = 2**30
H200_BYTES = 143_771 * 2**20  # the H200 of ../shared/notes/gpu-facts.md


def _batches(**choices) -> dict[str, int]:
    return {spec.name: spec.batch_size for spec in resolve_workloads(WorkloadChoices(**choices))}


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_runs_kaggle_at_65536_and_mlperf_at_the_mlperf_global_batch(device):
    assert presets.device_batch_size(presets.kaggle(), device) == 65_536
    assert presets.device_batch_size(presets.mlperf(), device) == 55_296
    # Presets without a GPU batch keep theirs: smoke stays a smoke test.
    assert presets.device_batch_size(presets.smoke(), device) == presets.smoke().batch_size
    assert presets.device_batch_size(presets.rm1(), device) == presets.rm1().batch_size


def test_the_cpu_keeps_every_preset_batch():
    for factory in presets.PRESETS.values():
        spec = factory()
        assert presets.device_batch_size(spec, "cpu") == spec.batch_size


def test_resolve_picks_the_gpu_batch_only_when_every_device_is_a_gpu():
    gpu = _batches(workloads="smoke,kaggle,mlperf", devices=("cuda:0",), quick_defaults=True)
    assert gpu == {"smoke": 64, "kaggle": 65_536, "mlperf": 55_296}
    assert _batches(workloads="kaggle,mlperf", devices=("cuda:0", "cuda:1")) == {
        "kaggle": 65_536, "mlperf": 55_296}
    cpu = {"kaggle": 2048, "mlperf": 2048}
    assert _batches(workloads="kaggle,mlperf") == cpu
    # One workload list serves every device of a sweep: a mixed list keeps the presets' batch.
    assert _batches(workloads="kaggle,mlperf", devices=("cpu", "cuda:0")) == cpu


def test_batch_size_still_overrides_on_a_gpu():
    specs = resolve_workloads(WorkloadChoices(workloads="kaggle,mlperf", batch_sizes="4096,8",
                                              devices=("cuda:0",)))
    assert sorted((spec.name, spec.batch_size) for spec in specs) == [
        ("kaggle", 8), ("kaggle", 4096), ("mlperf", 8), ("mlperf", 4096)]


def test_the_sweep_flags_reach_the_device_batch():
    args = parse_sweep(["--device", "cuda", "--workload", "kaggle,mlperf"])
    assert {spec.name: spec.batch_size for spec in resolve_workloads(workload_choices(args))} == {
        "kaggle": 65_536, "mlperf": 55_296}
    args = parse_sweep(["--device", "cuda", "--workload", "kaggle", "--batch-size", "2048"])
    assert [spec.batch_size for spec in resolve_workloads(workload_choices(args))] == [2048]
    args = parse_sweep(["--workload", "kaggle"])
    assert [spec.batch_size for spec in resolve_workloads(workload_choices(args))] == [2048]


# ---------------------------------------------------------------- the memory planner on a GPU

def _table_bytes(workload) -> float:
    return float(workload.total_rows) * workload.dim * 4


def test_mlperf_tables_on_the_device_are_held_to_the_device_factor():
    mlperf = presets.mlperf()
    tables = _table_bytes(mlperf)
    # A CPU run: every copy, plus the worker's own base (host memory only).
    assert estimate_bytes(mlperf, ["dlrm_train"]) == 6.0 * tables + WORKER_BASE_BYTES
    # A GPU run's training builds the student on the device and checks it without a copy of
    # its tables; its leanest impls hold them once (plus gradients), and next to nothing on
    # the host.
    assert estimate_bytes(mlperf, ["dlrm_train"], part="device") == 1.25 * tables
    assert estimate_bytes(mlperf, ["dlrm_train"], part="host") == (0.05 * tables
                                                                   + WORKER_BASE_BYTES)
    # Inference builds its teacher on the device and times it there at fp32 (the leanest
    # precision); a half-precision copy beside it is held to its own factor at plan time.
    assert estimate_bytes(mlperf, ["dlrm_infer"], part="device") == 1.05 * tables
    assert estimate_bytes(mlperf, ["dlrm_infer"], part="host") == (0.05 * tables
                                                                   + WORKER_BASE_BYTES)
    # An impl that builds on the host and copies is held to its own factors.
    heavy = {"fbgemm_tbe"}
    assert estimate_bytes(mlperf, ["dlrm_train"], part="device", impl_filter=heavy) == (
        2.0 * tables)
    device_bytes = int(2.0 * tables / 0.9) + GIB
    check_memory([mlperf], ["dlrm_train", "dlrm_infer"], 16 * device_bytes, "cuda:0",
                 device_bytes)
    with pytest.raises(SpecError):
        check_memory([mlperf], ["dlrm_train"], device_bytes, "cpu")


def test_mlperf_training_fits_one_h200_and_the_impls_that_copy_are_left_out():
    # 97 GiB of fp32 tables on a 140 GiB H200, 128 GiB of host memory (the GPU machine's).
    mlperf = presets.mlperf()
    host = 128 * GIB
    check_memory([mlperf], ["dlrm_train"], host, "cuda:0", H200_BYTES)
    budget = MemoryBudget("cuda:0", tuple(memories(host, "cuda:0", H200_BYTES)))
    left_out = LeftOut()
    planned = plan(["dlrm_train"], [mlperf], ["fp32"], ["cuda:0"], ["native"], [1], seed=0,
                   named=Named(), left_out=left_out, budgets={"cuda:0": budget})
    runs = {item.task.impl for item in planned}
    assert {"per_table", "batched", "fused_sgd"} <= runs
    assert not runs & {"compiled", "cuda_graph", "triton_tbe"}
    reasons = " ".join(record["reason"] for record in left_out.records())
    assert "GiB of cuda:0 memory for mlperf" in reasons and "--max-rows" in reasons
    # Named by --impls, an impl that does not fit is a skip row saying why.
    named = plan(["dlrm_train"], [mlperf], ["fp32"], ["cuda:0"], ["native"], [1], seed=0,
                 impl_filter={"cuda_graph"}, named=Named(impls=frozenset({"cuda_graph"})),
                 budgets={"cuda:0": budget})
    assert [item.skip_reason.split(" needs about ")[0] for item in named] == [
        "dlrm_train/cuda_graph"]


def test_mlperf_inference_fits_one_h200_at_fp32_and_not_beside_a_half_copy():
    mlperf = presets.mlperf()
    budget = MemoryBudget("cuda:0", tuple(memories(128 * GIB, "cuda:0", H200_BYTES)))
    left_out = LeftOut()
    planned = plan(["dlrm_infer"], [mlperf], ["fp32", "bf16"], ["cuda:0"], ["native"], [1],
                   seed=0, named=Named(), left_out=left_out, budgets={"cuda:0": budget})
    runs = {(item.task.impl, item.task.precision) for item in planned}
    assert {("per_table", "fp32"), ("batched", "fp32")} <= runs
    # bf16 holds the fp32 teacher and its bf16 copy (146 GiB); the impls that build on the
    # host or time a second model do not fit at either precision.
    assert not {impl for impl, precision in runs if precision == "bf16"}
    assert not {impl for impl, _ in runs} & {"compiled", "cuda_graph", "triton_tbe"}
    reasons = " ".join(record["reason"] for record in left_out.records())
    assert "memory for mlperf at bf16" in reasons and "--max-rows" in reasons


def test_a_gpu_run_that_outgrows_the_device_is_refused_with_a_cap_that_fits():
    mlperf = presets.mlperf()
    host = int(1e15)  # plenty: only the device can refuse
    small_gpu = 80 * GIB
    with pytest.raises(SpecError, match=r"is free on cuda:0; add --max-rows") as error:
        check_memory([mlperf], ["dlrm_train"], host, "cuda:0", small_gpu)
    cap = int(re.search(r"--max-rows ([\d,]+)", str(error.value)).group(1).replace(",", ""))
    # Full-size mlperf (5 tables of 40M rows, dim 128: 97 GiB fp32) cannot train on an 80 GiB
    # GPU; the cap the planner gives fits there.
    assert 10_000_000 < cap < 40_000_000
    check_memory([mlperf.capped(cap)], ["dlrm_train"], host, "cuda:0", small_gpu)


def test_the_host_is_still_checked_on_a_gpu_run():
    # The compiled impl builds the teacher on the host (HOST_BUILT_INFERENCE: 2 x 97 GiB).
    mlperf = presets.mlperf()
    with pytest.raises(SpecError, match=r"GiB is available; add --max-rows"):
        check_memory([mlperf], ["dlrm_infer"], 125 * GIB, "cuda:0", int(1e15),
                     impl_filter={"compiled"})


def test_a_cpu_run_has_no_device_memory():
    assert device_memory_bytes("cpu") is None
    check_memory([presets.smoke()], ["dlrm_train"], GIB, "cpu", device_memory_bytes("cpu"))
