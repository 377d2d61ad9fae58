"""Devices and ISA levels: what exists here, the environment knobs per level, and host facts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from bench import PROJECT_ROOT
from bench.host import available_memory_bytes, cache_sizes  # noqa: F401 (re-exported)
from bench.host import transparent_huge_pages


class DeviceError(ValueError):
    """A device or ISA level that is not available here; the message lists what is."""


# Each level names the environment knob of every library that dispatches on SIMD width: ATen
# elementwise kernels, FBGEMM's embedding_bag JIT, MKL's fp32 GEMM and oneDNN's bf16/fp16 GEMM.
# They are read once at library load, so a worker process sets them before importing torch.
# FBGEMM has no SSE kernels: at sse4 it falls back to its scalar reference path
# (FBGEMM_NO_ASMJIT=1).
ISA_LEVELS: dict[str, dict[str, str]] = {
    "native": {},
    "sse4": {"ATEN_CPU_CAPABILITY": "default", "FBGEMM_NO_ASMJIT": "1",
             "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx512_bf16": {"ATEN_CPU_CAPABILITY": "avx512", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                    "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "amx": {"ATEN_CPU_CAPABILITY": "avx512", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512",
            "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX10_1_512_AMX"},
}

# CPU flags (as /proc/cpuinfo spells them) each level needs.
ISA_REQUIRED_FLAGS: dict[str, tuple[str, ...]] = {
    "native": (),
    "sse4": ("sse4_2",),
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512_bf16": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
    "amx": ("avx512f", "amx_tile", "amx_bf16"),
}

# Every knob any level sets: a worker clears them all first so levels do not leak.
ISA_KNOBS = sorted({knob for knobs in ISA_LEVELS.values() for knob in knobs})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def available_isa_levels() -> list[str]:
    """ISA levels this CPU can run."""
    flags = cpu_flags()
    return [level for level, needed in ISA_REQUIRED_FLAGS.items()
            if all(flag in flags for flag in needed)]


def check_isa(level: str) -> None:
    """Raise DeviceError for an unknown level or one this CPU lacks."""
    if level not in ISA_LEVELS:
        raise DeviceError(f"unknown ISA level {level!r}; choose from {', '.join(ISA_LEVELS)}")
    available = available_isa_levels()
    if level not in available:
        missing = [flag for flag in ISA_REQUIRED_FLAGS[level] if flag not in cpu_flags()]
        raise DeviceError(f"ISA level {level!r} needs CPU flags {', '.join(missing)} that this "
                          f"CPU lacks; available here: {', '.join(available)}")


def isa_environment(level: str, base: Optional[dict] = None) -> dict[str, str]:
    """A process environment with exactly this level's knobs set."""
    environment = dict(os.environ if base is None else base)
    for knob in ISA_KNOBS:
        environment.pop(knob, None)
    environment.update(ISA_LEVELS[level])
    return environment


def with_import_root(environment: dict[str, str], root: os.PathLike | str) -> dict[str, str]:
    """The environment with root first on PYTHONPATH: that checkout's packages then win over
    an installed copy of another checkout."""
    kept = [part for part in environment.get("PYTHONPATH", "").split(os.pathsep) if part]
    return {**environment, "PYTHONPATH": os.pathsep.join([str(root)] + kept)}


def worker_environment(isa: str, threads: int,
                       import_root: Optional[os.PathLike | str] = PROJECT_ROOT) -> dict[str, str]:
    """A worker process's environment: exactly this ISA level's knobs, the thread pools sized
    (they size themselves at load time: set before torch starts) and, unless import_root is
    None, that checkout's packages importable first."""
    environment = isa_environment(isa)
    environment["OMP_NUM_THREADS"] = str(threads)
    environment["MKL_NUM_THREADS"] = str(threads)
    return environment if import_root is None else with_import_root(environment, import_root)


def cuda_device_count() -> int:
    """Visible CUDA devices (0 without a GPU or a CUDA build)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def available_devices() -> list[str]:
    """Device names usable here: cpu plus cuda:N per visible GPU."""
    return ["cpu"] + [f"cuda:{index}" for index in range(cuda_device_count())]


def normalize_device(name: str) -> str:
    """Validate a --device value and return its canonical form (cuda -> cuda:0)."""
    if name == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise DeviceError(f"unknown device {name!r}; choose from cpu, cuda, cuda:N")
    count = cuda_device_count()
    index = int(match.group(1) or 0)
    if count == 0:
        raise DeviceError(f"--device {name}: no CUDA GPU is visible here (torch sees none); "
                          "use --device cpu")
    if index >= count:
        raise DeviceError(f"--device {name}: only {count} GPU(s) here; "
                          f"choose from {', '.join(available_devices()[1:])}")
    return f"cuda:{index}"


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """py-cpuinfo's description (slow: it spawns a process, so it is cached)."""
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info()
    except Exception as error:  # py-cpuinfo fails on exotic platforms; facts stay partial
        return {"error": str(error)}


def perf_counter_support() -> dict:
    """Whether `perf stat` can count cache-misses here: {"supported": bool, "reason": str}."""
    perf = shutil.which("perf")
    if perf is None:
        return {"supported": False, "reason": "perf not installed"}
    try:
        # -x, gives CSV lines: value,unit,event,...; an uncountable event has a <...> value.
        result = subprocess.run([perf, "stat", "-x,", "-e", "cache-misses", "true"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return {"supported": False, "reason": f"perf stat failed: {type(error).__name__}"}
    output = result.stderr + result.stdout
    for marker in ("<not supported>", "<not counted>"):
        if marker in output:
            return {"supported": False, "reason": f"perf stat reports cache-misses {marker}"}
    counted = any(line.split(",")[0].strip().isdigit() and "cache-misses" in line
                  for line in output.splitlines())
    if result.returncode != 0 or not counted:
        # e.g. a kernel without perf events, perf_event_paranoid, or a distro wrapper script.
        first = next((line.strip() for line in output.splitlines() if line.strip()), "")
        return {"supported": False,
                "reason": f"perf stat exit {result.returncode}: {first[:200] or 'no output'}"}
    return {"supported": True, "reason": "perf stat counts cache-misses"}


def cpu_model() -> str:
    """The CPU's model name."""
    return cpu_info().get("brand_raw") or platform.processor() or "unknown"


def git_commit() -> str:
    """The project's git commit, with '+dirty' when the tree has changes."""
    root = PROJECT_ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty.strip() else "")


def library_versions() -> dict[str, str]:
    """torch, MKL and oneDNN versions as torch reports them."""
    import torch

    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([^\s]+)", config)
    onednn = re.search(r"MKL-DNN v([^\s]+)", config)
    return {
        "torch_version": torch.__version__,
        "mkl_version": mkl.group(1) if mkl else "",
        "onednn_version": onednn.group(1) if onednn else "",
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_version": torch.version.cuda or "",
    }


def gpu_facts() -> dict:
    """NVML facts per GPU (name, memory, clocks, driver); a reason where NVML is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # no driver or no library: a CPU-only host
        return {"available": False, "reason": f"NVML unavailable: {type(error).__name__}"}
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append({
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total_bytes": int(memory.total),
                "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle,
                                                                     pynvml.NVML_CLOCK_SM),
                "max_memory_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle,
                                                                         pynvml.NVML_CLOCK_MEM),
            })
        for gpu, l2_bytes in zip(gpus, torch_l2_bytes([gpu["name"] for gpu in gpus])):
            if l2_bytes:
                gpu["l2_cache_bytes"] = l2_bytes
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {"available": True, "driver": driver if isinstance(driver, str) else driver.decode(),
                "gpus": gpus}
    finally:
        pynvml.nvmlShutdown()


def torch_l2_bytes(nvml_names: list[str]) -> list[int]:
    """Each NVML GPU's L2 bytes as torch reports it (the report's device roofs need it), 0
    where torch's device of that index is another GPU (its order can differ from NVML's)."""
    import torch

    if not torch.cuda.is_available():
        return [0] * len(nvml_names)
    sizes = []
    for index, name in enumerate(nvml_names):
        if index >= torch.cuda.device_count():
            sizes.append(0)
            continue
        properties = torch.cuda.get_device_properties(index)
        same = properties.name == name
        sizes.append(int(getattr(properties, "L2_cache_size", 0)) if same else 0)
    return sizes


def effective_clock() -> dict:
    """The spin-loop clock estimate (bench.run.clock); a reason instead where it cannot run."""
    from bench.run.clock import effective_clock as measure_clock

    return measure_clock()


def host_facts() -> dict:
    """Everything env.json records about this machine and its software."""
    import psutil

    info = cpu_info()
    memory = psutil.virtual_memory()
    return {
        "cpu_model": cpu_model(),
        **cpu_identity(),
        "cpu_arch": info.get("arch_string_raw", platform.machine()),
        "cpu_flags": sorted(cpu_flags()),
        "logical_cpus": psutil.cpu_count(logical=True),
        "physical_cpus": psutil.cpu_count(logical=False),
        "isa_levels_available": available_isa_levels(),
        **cache_sizes(),
        "memory_total_bytes": int(memory.total),
        "memory_available_bytes": int(memory.available),
        # Random lookups into tables of gigabytes are TLB-bound without huge pages.
        "transparent_huge_pages": transparent_huge_pages(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        **library_versions(),
        "git_commit": git_commit(),
        "gpu": gpu_facts(),
        # The clock the run saw, to judge measured peaks against (bench/clock.py).
        "effective_clock": effective_clock(),
    }


def device_name(device: str) -> str:
    """Human name of a device: the CPU model or the GPU's name."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(int(device.partition(":")[2] or 0))
    return cpu_model()


_CPUINFO_IDENTITY_FIELDS = {"vendor_id": "cpu_vendor", "cpu family": "cpu_family",
                            "model": "cpu_model_number", "stepping": "cpu_stepping"}


def parse_cpu_identity(cpuinfo_text: str) -> dict[str, str]:
    """Vendor, family, model number and stepping of the first processor in /proc/cpuinfo text."""
    identity: dict[str, str] = {}
    for line in cpuinfo_text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        if key.strip() in _CPUINFO_IDENTITY_FIELDS:
            identity[_CPUINFO_IDENTITY_FIELDS[key.strip()]] = value.strip()
    return identity


@functools.lru_cache(maxsize=1)
def cpu_identity() -> dict[str, str]:
    """Vendor, family, model number and stepping of CPU 0 (/proc/cpuinfo, else py-cpuinfo)."""
    # The brand string alone ("Intel(R) Xeon(R) Processor" in some VMs) names several parts.
    try:
        identity = parse_cpu_identity(Path("/proc/cpuinfo").read_text())
    except OSError:
        identity = {}
    if len(identity) < len(_CPUINFO_IDENTITY_FIELDS):  # not Linux/x86: py-cpuinfo's spelling
        info = cpu_info()
        for source, name in (("vendor_id_raw", "cpu_vendor"), ("family", "cpu_family"),
                             ("model", "cpu_model_number"), ("stepping", "cpu_stepping")):
            identity.setdefault(name, str(info.get(source, "unknown")))
    return identity


@functools.lru_cache(maxsize=1)
def _host_speed_facts() -> dict:
    """The host facts that decide speed and do not change while a machine runs."""
    import psutil

    return {
        "cpu_model": cpu_model(),
        **cpu_identity(),
        # A missing level stays None, so two hosts that both lack it still agree.
        **{name: cache_sizes().get(name) for name in ("l1d_bytes", "l2_bytes", "l3_bytes")},
        "logical_cpus": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        # Whole GiB: the kernel's reserved memory moves MemTotal by a few MiB between boots.
        "memory_total_gib": round(psutil.virtual_memory().total / (1 << 30)),
        "torch_version": library_versions()["torch_version"],
    }


def _policy_fields(policy) -> Optional[dict]:
    """A TimingPolicy (or its dict) as a plain dict; None when no policy is given."""
    if policy is None:
        return None
    fields = dataclasses.asdict(policy) if dataclasses.is_dataclass(policy) else dict(policy)
    return {name: fields[name] for name in sorted(fields)}


def fingerprint_facts(device: str, isa: str, threads: int, policy=None) -> dict:
    """What makes timings comparable: the host's speed facts, device, ISA, threads, policy."""
    return {
        **_host_speed_facts(),
        "device": device.split(":")[0],
        "device_name": device_name(device),
        "isa": isa,
        "threads": threads,
        "timing_policy": _policy_fields(policy),
    }


def fingerprint_of_facts(facts: dict) -> str:
    """Short hash of a fingerprint_facts dict."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def fingerprint(device: str, isa: str, threads: int, policy=None) -> str:
    """Short hash of fingerprint_facts; rows with equal fingerprints can be compared."""
    return fingerprint_of_facts(fingerprint_facts(device, isa, threads, policy))


def fingerprint_records(configurations, policy=None) -> dict[str, dict]:
    """{fingerprint: facts} for (device, isa, threads) triples, as env.json records them."""
    records = {}
    for device, isa, threads in sorted(set(configurations)):
        facts = fingerprint_facts(device, isa, threads, policy)
        records[fingerprint_of_facts(facts)] = facts
    return records
