"""Telemetry around a measurement: process CPU use and RSS, RAPL energy, NVML GPU energy."""

from __future__ import annotations

import dataclasses
import math
import resource
import threading
from pathlib import Path
from typing import Callable, Optional

import psutil

RAPL_ROOT = Path("/sys/class/powercap")
NVML_INTERVAL_S = 0.01  # NVML updates power about every 10-20 ms on recent GPUs


@dataclasses.dataclass
class Telemetry:
    """What was observed while one configuration was timed (NaN where unavailable)."""

    cpu_util: float = math.nan  # process CPU seconds / wall seconds (1.0 = one busy core)
    peak_rss_bytes: float = math.nan  # the worker's resident-set high-water mark so far
    avg_power_w: float = math.nan
    energy_j: float = math.nan
    gpu: dict = dataclasses.field(default_factory=dict)  # NVML averages (clocks, temperature)
    sources: list = dataclasses.field(default_factory=list)  # where the energy figure came from


def _rapl_energy_files() -> list[Path]:
    """Package-level RAPL counters readable by this user (none in most VMs)."""
    files = []
    for zone in sorted(RAPL_ROOT.glob("intel-rapl:*")):
        if zone.name.count(":") == 1 and (zone / "energy_uj").is_file():
            try:
                (zone / "energy_uj").read_text()
                files.append(zone / "energy_uj")
            except OSError:
                continue
    return files


def _read_rapl(files: list[Path]) -> Optional[float]:
    try:
        return sum(int(path.read_text()) for path in files) / 1e6
    except (OSError, ValueError):
        return None


def nvml_uuid_candidates(torch_uuid: str) -> list[str]:
    """NVML's names for the GPU torch reports: torch prints bare hex, NVML prefixes GPU-/MIG-."""
    text = str(torch_uuid).strip()
    if text.startswith(("GPU-", "MIG-")):
        return [text]
    return [f"GPU-{text}", f"MIG-{text}"]


def nvml_handle(nvml, device_index: int):
    """The NVML handle of torch's cuda:<device_index>, found by UUID."""
    # NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES; torch's index counts
    # visible devices only (in CUDA_DEVICE_ORDER). Only the UUID names the same GPU in both.
    import torch

    torch_uuid = torch.cuda.get_device_properties(device_index).uuid
    for candidate in nvml_uuid_candidates(str(torch_uuid)):
        try:
            return nvml.nvmlDeviceGetHandleByUUID(candidate)
        except nvml.NVMLError:
            continue
    raise LookupError(f"NVML knows no GPU with torch's UUID {torch_uuid} (cuda:{device_index})")


class NvmlSampler(threading.Thread):
    """Samples one GPU's clocks, temperature and memory while the timed region runs."""

    def __init__(self, index: int):
        super().__init__(daemon=True)
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        try:
            self.handle = nvml_handle(pynvml, index)
        except BaseException:
            pynvml.nvmlShutdown()
            raise
        self.samples: list[dict] = []
        self.stopping = threading.Event()
        # Samples and the energy counter cover the timed repetitions only, not warm-up,
        # the repetition-count probe or building inputs: begin() and end() bracket them.
        self.recording = threading.Event()
        self.energy_begin_mj: Optional[float] = None
        self.energy_end_mj: Optional[float] = None
        self.timed_wall_s = math.nan

    def _energy_mj(self) -> Optional[float]:
        try:
            return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except self.nvml.NVMLError:  # pre-Volta GPUs have no energy counter
            return None

    def _sample(self) -> dict:
        nvml, handle = self.nvml, self.handle
        return {
            "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "memory_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            "temperature_c": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "memory_used_bytes": nvml.nvmlDeviceGetMemoryInfo(handle).used,
        }

    def begin(self) -> None:
        """The timed region starts (the GPU is synchronised): read the energy counter."""
        self.energy_begin_mj = self._energy_mj()
        self.recording.set()

    def end(self, wall_s: float) -> None:
        """The timed region ended (synchronised) after wall_s seconds: read the counter again."""
        self.energy_end_mj = self._energy_mj()
        self.recording.clear()
        self.timed_wall_s = wall_s

    def run(self) -> None:
        """Sample while recording, until stopped."""
        while not self.stopping.is_set():
            if self.recording.is_set():
                try:
                    self.samples.append(self._sample())
                except self.nvml.NVMLError:
                    break
            self.stopping.wait(NVML_INTERVAL_S)

    def finish(self) -> dict:
        """Stop sampling; averages of the timed region's samples and its energy difference."""
        self.stopping.set()
        if self.ident is not None:  # started (Monitor.start starts it at once)
            self.join(timeout=1.0)
        summary = {}
        if self.samples:
            for key in self.samples[0]:
                summary[key] = sum(sample[key] for sample in self.samples) / len(self.samples)
            summary["memory_used_max_bytes"] = max(sample["memory_used_bytes"]
                                                   for sample in self.samples)
        if self.energy_begin_mj is not None and self.energy_end_mj is not None:
            summary["energy_j"] = (self.energy_end_mj - self.energy_begin_mj) / 1e3
        if math.isfinite(self.timed_wall_s):
            summary["energy_window_s"] = self.timed_wall_s
        self.nvml.nvmlShutdown()
        return summary


class Monitor:
    """Brackets a measurement: start() before timing, stop(wall_s) after."""

    def __init__(self, device: str, cpu_seconds: Optional[Callable[[], float]] = None):
        self.device = device
        self.process = psutil.Process()
        # Injectable so that tests need not burn CPU past the kernel's 10 ms accounting tick.
        self.cpu_seconds = cpu_seconds or self._process_cpu_seconds
        self.rapl_files = _rapl_energy_files()
        self.sampler: Optional[NvmlSampler] = None

    def _process_cpu_seconds(self) -> float:
        """User + system CPU seconds of this process (10 ms ticks)."""
        return sum(self.process.cpu_times()[:2])

    def start(self) -> None:
        """Record starting counters and start GPU sampling where NVML works."""
        self.cpu_start = self.cpu_seconds()
        self.rapl_start = _read_rapl(self.rapl_files) if self.rapl_files else None
        if self.device.startswith("cuda"):
            try:
                self.sampler = NvmlSampler(int(self.device.partition(":")[2] or 0))
                self.sampler.start()
            except Exception:  # no NVML (driver missing): GPU telemetry stays empty
                self.sampler = None

    def begin_timed(self) -> None:
        """bench.run.timing: the timed repetitions start now (GPU: after a synchronize)."""
        if self.sampler is not None:
            self.sampler.begin()

    def end_timed(self, wall_s: float) -> None:
        """bench.run.timing: the timed repetitions ended (synchronised) after wall_s seconds."""
        if self.sampler is not None:
            self.sampler.end(wall_s)

    def stop(self, wall_s: float) -> Telemetry:
        """Telemetry over the bracketed wall time (measured by bench.run.timing)."""
        telemetry = Telemetry()
        cpu_seconds = self.cpu_seconds() - self.cpu_start
        if wall_s > 0:
            telemetry.cpu_util = cpu_seconds / wall_s
        # ru_maxrss is in KiB on Linux.
        telemetry.peak_rss_bytes = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                         * 1024)
        if self.sampler is not None:
            telemetry.gpu = self.sampler.finish()
            window_s = telemetry.gpu.get("energy_window_s", math.nan)
            sampled_power_w = telemetry.gpu.pop("power_w", math.nan)
            if "energy_j" in telemetry.gpu:
                # Power is the energy counter's difference over the timed region's wall time,
                # not the mean of GetPowerUsage samples (a lagging, averaged reading).
                telemetry.energy_j = telemetry.gpu.pop("energy_j")
                telemetry.sources.append("nvml energy counter over the timed repetitions")
                if window_s > 0:
                    telemetry.avg_power_w = telemetry.energy_j / window_s
            elif math.isfinite(sampled_power_w):
                telemetry.avg_power_w = sampled_power_w
                telemetry.sources.append("nvml sampled power (no energy counter)")
            if math.isfinite(sampled_power_w):
                telemetry.gpu["sampled_power_w"] = sampled_power_w
            return telemetry
        if self.rapl_start is not None:
            end = _read_rapl(self.rapl_files)
            if end is not None and end >= self.rapl_start:
                telemetry.energy_j = end - self.rapl_start
                telemetry.sources.append("rapl package energy")
        if wall_s > 0 and math.isfinite(telemetry.energy_j) and math.isnan(telemetry.avg_power_w):
            telemetry.avg_power_w = telemetry.energy_j / wall_s
        return telemetry
