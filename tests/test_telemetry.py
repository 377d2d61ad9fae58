"""Telemetry: CPU use and RSS always, RAPL energy where readable, GPU telemetry absent cleanly."""

import math
import time

import pytest

from bench.run import telemetry


def _burn(cpu_seconds: float = 0.1) -> None:
    """Use at least cpu_seconds of CPU: well past the kernel's accounting tick (10 ms), which a
    fixed small loop on a busy machine can fall inside of, reading as zero."""
    start = time.process_time()
    while time.process_time() - start < cpu_seconds:
        sum(index * index for index in range(10_000))


def test_cpu_telemetry_without_energy_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(telemetry, "RAPL_ROOT", tmp_path / "absent")
    monitor = telemetry.Monitor("cpu")
    monitor.start()
    _burn()
    observed = monitor.stop(wall_s=1.0)
    assert observed.cpu_util > 0
    assert observed.peak_rss_bytes > 1 << 20
    assert math.isnan(observed.energy_j) and math.isnan(observed.avg_power_w)
    assert observed.sources == []


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
