"""The GPU path, checked on CPU: NVML by UUID, timed-region energy, flush budget, no host syncs."""

from __future__ import annotations

import contextlib
import math
import types

import pytest
import torch
from conftest import tiny_workload

from bench import registry
from bench.run import telemetry, timing, worker
from bench.models.dlrm import (BatchedEmbeddings, FusedSGDEmbeddings, flatten_tables,
                               row_start_values)
from bench.registry import BuildContext, Unsupported

# ---------------------------------------------------------------- a fake NVML

TORCH_UUIDS = {0: "11111111-aaaa-bbbb-cccc-000000000000", 1: "22222222-aaaa-bbbb-cccc-000000000000"}


class FakeNvmlError(Exception):
    """Stands in for pynvml.NVMLError."""


def fake_nvml(energy_mj: dict, sampled_power_mw: float = 999_000.0, energy_counter=True):
    """A pynvml stand-in: GPUs named GPU-<uuid>; index lookups are a planted wrong answer."""
    # NVML's index order differs from torch's (CUDA_VISIBLE_DEVICES=1,0 here): NVML index 0 is
    # torch's cuda:1. Taking the handle by torch's index gives the other GPU.
    handles = {f"GPU-{uuid}": f"handle-of-{uuid}" for uuid in TORCH_UUIDS.values()}
    by_nvml_index = {0: handles[f"GPU-{TORCH_UUIDS[1]}"], 1: handles[f"GPU-{TORCH_UUIDS[0]}"]}
    calls = {"init": 0, "shutdown": 0, "energy_reads": 0}

    def get_handle_by_uuid(uuid):
        if uuid not in handles:
            raise FakeNvmlError(f"no GPU {uuid}")
        return handles[uuid]

    def total_energy(handle):
        if not energy_counter:
            raise FakeNvmlError("not supported")
        calls["energy_reads"] += 1
        return energy_mj["value"]

    module = types.SimpleNamespace(
        NVMLError=FakeNvmlError, NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: calls.__setitem__("init", calls["init"] + 1),
        nvmlShutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
        nvmlDeviceGetHandleByUUID=get_handle_by_uuid,
        nvmlDeviceGetHandleByIndex=lambda index: by_nvml_index[index],
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
        nvmlDeviceGetClockInfo=lambda handle, kind: 1500 if kind == 0 else 2600,
        nvmlDeviceGetPowerUsage=lambda handle: sampled_power_mw,
        nvmlDeviceGetTemperature=lambda handle, kind: 60,
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=1 << 30),
    )
    return module, handles, calls


@pytest.fixture
def nvml(monkeypatch):
    """Install a fake pynvml and torch device properties; yields (module, handles, counter)."""
    energy = {"value": 1000.0}
    module, handles, calls = fake_nvml(energy)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", module)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(uuid=TORCH_UUIDS[index]))
    monkeypatch.setattr(telemetry, "RAPL_ROOT", __import__("pathlib").Path("/nonexistent"))
    return module, handles, energy, calls


def test_nvml_handle_is_found_by_torch_uuid_not_index(nvml):
    module, handles, _, _ = nvml
    for index, uuid in TORCH_UUIDS.items():
        assert telemetry.nvml_handle(module, index) == handles[f"GPU-{uuid}"]
        # The planted wrong answer: NVML's index names the other GPU here.
        assert module.nvmlDeviceGetHandleByIndex(index) != handles[f"GPU-{uuid}"]


def test_sampler_takes_the_uuid_handle(nvml):
    _, handles, _, calls = nvml
    sampler = telemetry.NvmlSampler(1)
    assert sampler.handle == handles[f"GPU-{TORCH_UUIDS[1]}"]
    sampler.finish()
    assert calls["shutdown"] == 1


def test_uuid_forms_nvml_accepts():
    assert telemetry.nvml_uuid_candidates("abc-1") == ["GPU-abc-1", "MIG-abc-1"]
    assert telemetry.nvml_uuid_candidates("GPU-abc-1") == ["GPU-abc-1"]
    assert telemetry.nvml_uuid_candidates("MIG-abc-1") == ["MIG-abc-1"]


def test_unknown_uuid_is_an_error_and_nvml_is_shut_down(nvml, monkeypatch):
    _, _, _, calls = nvml
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(uuid="99999999-0000"))
    with pytest.raises(LookupError, match="99999999"):
        telemetry.NvmlSampler(0)
    assert calls["shutdown"] == calls["init"]


def test_energy_is_the_counter_difference_over_the_timed_region_only(nvml):
    _, _, energy, _ = nvml
    monitor = telemetry.Monitor("cuda:0")
    monitor.start()
    energy["value"] = 5000.0  # warm-up and the probe spent 4 J: not the measurement's
    monitor.begin_timed()
    energy["value"] = 8000.0  # the timed repetitions: 3 J
    monitor.end_timed(2.0)
    energy["value"] = 20000.0  # after the region (summaries, the next build)
    observed = monitor.stop(wall_s=10.0)
    assert observed.energy_j == pytest.approx(3.0)
    assert observed.avg_power_w == pytest.approx(1.5)  # 3 J over the 2 s region
    # The sampled GetPowerUsage (999 W here) is kept for reference, not reported as power.
    assert observed.sources == ["nvml energy counter over the timed repetitions"]
    assert observed.gpu["energy_window_s"] == 2.0


def _wait_for_samples(sampler) -> None:
    for _ in range(500):
        if sampler.samples:
            return
        sampler.stopping.wait(telemetry.NVML_INTERVAL_S)
    raise AssertionError("the sampler recorded nothing while the region was open")


def test_without_an_energy_counter_power_is_sampled_inside_the_region(monkeypatch):
    module, _, _ = fake_nvml({"value": 0.0}, sampled_power_mw=250_000.0, energy_counter=False)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", module)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(uuid=TORCH_UUIDS[index]))
    monitor = telemetry.Monitor("cuda:0")
    monitor.start()
    monitor.begin_timed()
    _wait_for_samples(monitor.sampler)
    monitor.end_timed(1.0)
    observed = monitor.stop(wall_s=1.0)
    assert math.isnan(observed.energy_j)
    assert observed.avg_power_w == pytest.approx(250.0)
    assert observed.sources == ["nvml sampled power (no energy counter)"]


def test_sampler_records_nothing_outside_the_timed_region(nvml):
    sampler = telemetry.NvmlSampler(0)
    sampler.start()
    sampler.stopping.wait(5 * telemetry.NVML_INTERVAL_S)  # running, but not recording
    assert sampler.samples == []
    sampler.begin()
    _wait_for_samples(sampler)
    sampler.end(0.1)
    count = len(sampler.samples)
    assert count >= 1
    sampler.stopping.wait(5 * telemetry.NVML_INTERVAL_S)
    assert len(sampler.samples) <= count + 1  # at most one sample already under way
    sampler.finish()


# ---------------------------------------------------------------- time_cuda on a fake GPU

class FakeGpu:
    """A virtual GPU clock: each fn call and each flush advances it; events read it."""

    def __init__(self, call_ms: float, flush_ms: float):
        self.now_ms, self.call_ms, self.flush_ms = 0.0, call_ms, flush_ms
        self.log: list[str] = []

    def event_class(self):
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at_ms = None

            def record(self):
                self.at_ms = gpu.now_ms

            def elapsed_time(self, other):
                return other.at_ms - self.at_ms

        return Event

    def call(self):
        self.now_ms += self.call_ms
        self.log.append("call")

    def flush(self):
        self.now_ms += self.flush_ms
        self.log.append("flush")


@pytest.fixture
def fake_gpu(monkeypatch):
    """time_cuda's torch.cuda pieces replaced by a virtual clock (1 ms calls, 4 ms flushes)."""
    gpu = FakeGpu(call_ms=1.0, flush_ms=4.0)
    monkeypatch.setattr(torch.cuda, "Event", gpu.event_class())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())

    class Flusher:
        def __init__(self, device):
            pass

        def __call__(self):
            gpu.flush()

    monkeypatch.setattr(timing, "_L2Flusher", Flusher)
    return gpu


class RecordingRegion:
    """Stands in for telemetry.Monitor: logs when the timed region begins and ends."""

    def __init__(self, gpu: FakeGpu):
        self.gpu = gpu

    def begin_timed(self):
        self.gpu.log.append("begin")

    def end_timed(self, wall_s):
        self.gpu.log.append("end")


def test_repetitions_budget_the_flush_time(fake_gpu):
    # 1 ms calls after 4 ms flushes: min_run_time wants 10 calls; 10 x 5 ms = 50 ms of wall
    # is twice max_run_time, so only 5 fit. Counting the call alone would run 10.
    policy = timing.TimingPolicy(min_run_time_s=0.010, min_samples=3, max_run_time_s=0.025,
                                 warmup_calls=2)
    samples = timing.time_cuda(fake_gpu.call, policy, torch.device("cuda:0"), flush_l2=True)
    assert len(samples) == 5
    assert all(sample == pytest.approx(0.001) for sample in samples)  # flushes not counted
    assert fake_gpu.log.count("call") == 2 + 1 + 5  # warm-up, the probe, the repetitions


def test_without_flushing_min_run_time_decides(fake_gpu):
    policy = timing.TimingPolicy(min_run_time_s=0.010, min_samples=3, max_run_time_s=0.025,
                                 warmup_calls=2)
    samples = timing.time_cuda(fake_gpu.call, policy, torch.device("cuda:0"), flush_l2=False)
    assert len(samples) == 10 and "flush" not in fake_gpu.log


def test_timed_region_excludes_warm_up_and_probe(fake_gpu):
    policy = timing.TimingPolicy(min_run_time_s=0.004, min_samples=4, max_run_time_s=1.0,
                                 warmup_calls=3)
    timing.time_cuda(fake_gpu.call, policy, torch.device("cuda:0"), flush_l2=True,
                     region=RecordingRegion(fake_gpu))
    log = fake_gpu.log
    begin, end = log.index("begin"), log.index("end")
    assert log[:begin] == ["call"] * 3 + ["flush", "call"]  # warm-up, then the probe
    assert log[begin + 1:end] == ["flush", "call"] * 4 and end == len(log) - 1


@pytest.mark.parametrize("call_s, flush_s, expected", [
    (1e-3, 0.0, 10), (1e-3, 4e-3, 5), (1.0, 0.0, 3), (1e-9, 0.0, 10_000),  # estimates floor at 1 us
])
def test_cuda_repetitions(call_s, flush_s, expected):
    policy = timing.TimingPolicy(min_run_time_s=0.010, min_samples=3, max_run_time_s=0.025)
    assert timing.cuda_repetitions(call_s, flush_s, policy) == expected


# ---------------------------------------------------------------- pinning

def test_gpu_workers_are_not_pinned_to_few_cores(monkeypatch):
    pinned, threads = [], []
    monkeypatch.setattr(worker.os, "sched_setaffinity", lambda pid, cpus: pinned.append(cpus))
    monkeypatch.setattr(worker.torch, "set_num_threads", threads.append)
    allowed = sorted(worker.os.sched_getaffinity(0))
    assert worker.pin_threads(1, "cuda:0") == allowed
    assert pinned == [] and threads == [1]
    # CPU workers still pin (the planted opposite: pinning nothing anywhere).
    assert worker.pin_threads(1, "cpu") == allowed[:1]
    assert pinned == [allowed[:1]]


# ---------------------------------------------------------------- no host syncs in closures

@pytest.fixture
def recorded_repeat_interleave(monkeypatch):
    """torch.repeat_interleave wrapped to record its keyword arguments."""
    calls = []
    real = torch.repeat_interleave

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "repeat_interleave", recording)
    return calls


@pytest.fixture
def no_host_tensors(monkeypatch):
    """Make building a tensor from host data, or reading one back, fail while armed."""
    armed = {"on": False}

    def guard(name, real):
        def guarded(*args, **kwargs):
            if armed["on"]:
                raise AssertionError(f"{name} inside the timed closure (a host copy or sync)")
            return real(*args, **kwargs)
        return guarded

    monkeypatch.setattr(torch, "tensor", guard("torch.tensor", torch.tensor))
    for name in ("new_tensor", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, guard(f"Tensor.{name}",
                                                      getattr(torch.Tensor, name)))
    return armed


def _table_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(rows, 4, generator=generator) for rows in (7, 11, 5)]
    indices = [torch.randint(0, weight.shape[0], (count,), generator=generator)
               for weight, count in zip(weights, (6, 9, 3))]
    offsets = [torch.tensor([0, 2, 4]), torch.tensor([0, 3, 5]), torch.tensor([0, 1, 2])]
    return weights, indices, offsets


def test_fused_sgd_lookup_passes_output_size(recorded_repeat_interleave, no_host_tensors):
    weights, indices, offsets = _table_inputs()
    module = FusedSGDEmbeddings(weights, learning_rate=0.1)
    no_host_tensors["on"] = True
    module(indices, offsets).sum().backward()
    no_host_tensors["on"] = False
    assert recorded_repeat_interleave, "the fused lookup no longer uses repeat_interleave"
    assert all("output_size" in kwargs for kwargs in recorded_repeat_interleave)


def test_batched_lookup_makes_no_host_tensor(recorded_repeat_interleave, no_host_tensors):
    weights, indices, offsets = _table_inputs()
    module = BatchedEmbeddings(weights, sparse=True)
    no_host_tensors["on"] = True
    pooled = module(indices, offsets)
    no_host_tensors["on"] = False
    assert all("output_size" in kwargs for kwargs in recorded_repeat_interleave)
    expected = torch.stack([torch.nn.functional.embedding_bag(table_indices, weight,
                                                              table_offsets, mode="sum")
                            for weight, table_indices, table_offsets
                            in zip(weights, indices, offsets)], dim=1)
    torch.testing.assert_close(pooled, expected)


def test_flatten_tables_shifts_ids_and_bag_starts():
    weights, indices, offsets = _table_inputs()
    shifted, bag_starts = flatten_tables(indices, offsets, row_start_values(weights))
    assert shifted.tolist() == (indices[0].tolist() + (indices[1] + 7).tolist()
                                + (indices[2] + 18).tolist())
    assert bag_starts.tolist() == [0, 2, 4, 6, 9, 11, 15, 16, 17]


def test_host_values_are_refused_while_armed(no_host_tensors):
    # The guard itself can fail: an .item() while armed is caught.
    no_host_tensors["on"] = True
    with pytest.raises(AssertionError, match="Tensor.item"):
        torch.ones(1).item()
    no_host_tensors["on"] = False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
@pytest.mark.parametrize("op, impl, variant", [
    ("sls_multi", "batched", {"mode": "sum"}),
    ("sls", "embedding_bag", {"mode": "weighted"}),
    ("dlrm_infer", "batched", {}),
    ("dlrm_train", "fused_sgd", {}),
])
def test_timed_closures_make_no_host_sync_on_a_gpu(op, impl, variant):
    context = BuildContext(workload=tiny_workload(), variant=variant, precision="fp32",
                           device=torch.device("cuda:0"), seed=0)
    prepared = registry.impls(op)[impl].build(context)
    prepared.run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        prepared.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ---------------------------------------------------------------- casts and fp16 training

def test_per_sample_weights_are_cast_at_build():
    context = BuildContext(workload=tiny_workload(), variant={"mode": "weighted"},
                           precision="bf16", device=torch.device("cpu"), seed=0)
    prepared = registry.impls("sls")["embedding_bag"].build(context)
    table, indices, offsets, mode, weights = (prepared.check.func, *prepared.check.args)
    assert weights.dtype == torch.bfloat16 == table.weight.dtype
    # A float32 weight vector reaching the bf16 table (a cast left in the closure) is refused.
    with pytest.raises(TypeError, match="cast them at build"):
        table(indices, offsets, mode, weights.float())


def test_fp16_training_on_cuda_is_skipped_for_loss_scaling():
    context = BuildContext(workload=tiny_workload(), variant={}, precision="fp16",
                           device=torch.device("cuda:0"), seed=0)
    with pytest.raises(Unsupported, match="GradScaler"):
        registry.impls("dlrm_train")["per_table"].build(context)


def test_fp16_training_on_cpu_still_builds():
    context = BuildContext(workload=tiny_workload(), variant={}, precision="fp16",
                           device=torch.device("cpu"), seed=0)
    prepared = registry.impls("dlrm_train")["per_table"].build(context)
    assert prepared.params["autocast"] == "fp16"
