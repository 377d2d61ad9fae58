"""Telemetry: CPU use and RSS always, RAPL energy where readable, GPU telemetry absent cleanly."""

import math

import pytest

from bench.run import telemetry


class FakeCpuClock:
    """Process CPU seconds that advance by a fixed step per reading."""

    def __init__(self, step_s: float):
        self.step_s, self.now_s = step_s, 10.0

    def __call__(self) -> float:
        self.now_s += self.step_s
        return self.now_s


def test_cpu_telemetry_without_energy_sources(monkeypatch, tmp_path):
    # The CPU-time source is injected: the real one ticks every 10 ms, so a short burn on a
    # busy machine could read 0.0 and fail for no fault of the code.
    monkeypatch.setattr(telemetry, "RAPL_ROOT", tmp_path / "absent")
    monitor = telemetry.Monitor("cpu", cpu_seconds=FakeCpuClock(0.25))
    monitor.start()
    observed = monitor.stop(wall_s=0.5)
    assert observed.cpu_util == pytest.approx(0.5)  # 0.25 CPU seconds over 0.5 wall seconds
    assert observed.peak_rss_bytes > 1 << 20
    assert math.isnan(observed.energy_j) and math.isnan(observed.avg_power_w)
    assert observed.sources == []


def test_default_cpu_source_reads_this_process():
    # What is guaranteed of the real source: finite, never negative, never decreasing.
    monitor = telemetry.Monitor("cpu")
    first = monitor.cpu_seconds()
    sum(index * index for index in range(100_000))
    second = monitor.cpu_seconds()
    assert math.isfinite(first) and 0 <= first <= second


def test_rapl_energy_is_read_from_powercap_files(monkeypatch, tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("1000000\n")
    monkeypatch.setattr(telemetry, "RAPL_ROOT", tmp_path)
    monitor = telemetry.Monitor("cpu")
    monitor.start()
    (zone / "energy_uj").write_text("4000000\n")  # 3 J later
    observed = monitor.stop(wall_s=2.0)
    assert observed.energy_j == pytest.approx(3.0)
    assert observed.avg_power_w == pytest.approx(1.5)
    assert observed.sources == ["rapl package energy"]


def test_gpu_monitor_without_nvml_leaves_gpu_fields_empty(monkeypatch, tmp_path):
    monkeypatch.setattr(telemetry, "RAPL_ROOT", tmp_path / "absent")

    def no_nvml(index):
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(telemetry, "NvmlSampler", no_nvml)
    monitor = telemetry.Monitor("cuda:0")
    monitor.start()
    observed = monitor.stop(wall_s=0.5)
    assert observed.gpu == {}
    assert math.isnan(observed.energy_j)


def test_gpu_sampler_records_clocks_and_power_on_a_real_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as error:
        pytest.skip(f"NVML unavailable: {error}")
    import time

    monitor = telemetry.Monitor("cuda:0")
    monitor.start()
    matrix = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    monitor.begin_timed()
    started = time.perf_counter()
    for _ in range(200):
        matrix = matrix @ matrix
        matrix /= matrix.norm()
    torch.cuda.synchronize()
    monitor.end_timed(time.perf_counter() - started)
    observed = monitor.stop(wall_s=1.0)
    assert observed.gpu["sm_clock_mhz"] > 0
    assert observed.avg_power_w > 0
