"""ISA levels: the knobs each level sets, refusal of levels this CPU lacks, and verification."""

import json
import os
import subprocess
import sys

import pytest

from bench.run import devices, isa_probe
from conftest import REPO_ROOT

LIBRARY_KNOBS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


PROBE = ("import json; from bench.run import isa_probe; effective = isa_probe.effective_isa(); "
         "print(json.dumps([effective, isa_probe.isa_mismatch({level!r}, effective)]))")


def probe_level(level: str, levels: dict | None = None) -> tuple[str, str]:
    """(isa_effective, mismatch) that a fresh process with this level's knobs reports."""
    environment = devices.isa_environment(level)
    if levels is not None:  # a planted ISA_LEVELS table
        for knob in devices.ISA_KNOBS:
            environment.pop(knob, None)
        environment.update(levels[level])
    environment["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run([sys.executable, "-c", PROBE.format(level=level)], cwd=REPO_ROOT,
                            env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    effective, mismatch = json.loads(result.stdout.strip().splitlines()[-1])
    return effective, mismatch


CAPPED_LEVELS = [name for name in devices.ISA_LEVELS if name != "native"]


@pytest.mark.slow
@pytest.mark.parametrize("level", CAPPED_LEVELS)
def test_every_capped_level_takes_effect_in_each_library(level):
    """The knobs a level sets make every library that can report say it ran that level."""
    if level not in devices.available_isa_levels():
        pytest.skip(f"this CPU lacks {level}")
    effective, mismatch = probe_level(level)
    assert mismatch == "", effective
    reported = isa_probe.parse_effective(effective)
    assert set(reported) == {"aten", "mkl", "onednn", "fbgemm"}
    # FBGEMM answers for itself now (its dispatcher), never the knob echoed back.
    assert not reported["fbgemm"].endswith(isa_probe.UNVERIFIED), effective


@pytest.mark.skipif("avx2" not in devices.available_isa_levels(), reason="CPU lacks AVX2")
def test_a_knob_that_does_not_cap_its_library_is_caught():
    """Planted fault: avx2 that leaves FBGEMM at AVX512 and ATen at avx512 is a mismatch."""
    planted = {**devices.ISA_LEVELS, "avx2": {**devices.ISA_LEVELS["avx2"],
                                              "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512",
                                              "ATEN_CPU_CAPABILITY": "avx512"}}
    if "avx512" not in devices.available_isa_levels():
        pytest.skip("this CPU lacks AVX-512, so FBGEMM cannot run wider than avx2")
    effective, mismatch = probe_level("avx2", planted)
    assert "fbgemm=avx512" in mismatch and "aten=avx512" in mismatch, effective


def test_native_sets_nothing_and_clears_inherited_knobs():
    inherited = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": "/bin"}
    environment = devices.isa_environment("native", base=inherited)
    assert "ATEN_CPU_CAPABILITY" not in environment
    assert "ONEDNN_MAX_CPU_ISA" not in environment
    assert environment["PATH"] == "/bin"


def test_level_environment_replaces_other_levels_knobs():
    environment = devices.isa_environment("avx2", base=devices.ISA_LEVELS["amx"])
    assert environment["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert environment["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"


def test_worker_environment_sets_level_threads_and_import_root_first(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    environment = devices.worker_environment("avx2", 3, "/checkout")
    assert environment["ATEN_CPU_CAPABILITY"] == "avx2"
    assert environment["OMP_NUM_THREADS"] == environment["MKL_NUM_THREADS"] == "3"
    assert environment["PYTHONPATH"].split(os.pathsep) == ["/checkout", "/elsewhere"]
    # Without an import root the inherited path is left as it was.
    assert devices.worker_environment("native", 1, None)["PYTHONPATH"] == "/elsewhere"
    assert devices.with_import_root({}, "/checkout") == {"PYTHONPATH": "/checkout"}


def test_unknown_level_is_refused_with_the_choices():
    with pytest.raises(devices.DeviceError) as raised:
        devices.check_isa("avx9000")
    assert "avx2" in str(raised.value) and "amx" in str(raised.value)


def test_level_the_cpu_lacks_is_refused_naming_available_levels(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"sse4_2", "avx2", "fma"}))
    assert devices.available_isa_levels() == ["native", "sse4", "avx2"]
    with pytest.raises(devices.DeviceError) as raised:
        devices.check_isa("amx")
    message = str(raised.value)
    assert "amx_tile" in message and "available here: native, sse4, avx2" in message


@pytest.mark.parametrize("level, effective, problem", [
    ("avx2", "aten=avx2;mkl=AVX2;onednn=not-used;fbgemm=avx2", ""),
    ("avx2", "aten=avx512;mkl=AVX2;onednn=not-used;fbgemm=avx2", "aten=avx512"),
    ("amx", "aten=avx512;mkl=AVX-512;onednn=brg_matmul:avx10_1_512_amx;fbgemm=avx512", ""),
    ("amx", "aten=avx512;mkl=AVX-512;onednn=brg_matmul:avx512_core_bf16;fbgemm=avx512",
     "onednn=brg_matmul:avx512_core_bf16"),
    ("avx512", "aten=avx512;mkl=AVX-512;onednn=brg_matmul:avx10_1_512_amx;fbgemm=avx512",
     "onednn=brg_matmul:avx10_1_512_amx"),
    ("native", "aten=avx512;mkl=AVX-512+AMX;onednn=x;fbgemm=auto", ""),
    ("avx2", "aten=avx2;mkl=AVX2;onednn=not-used;fbgemm=avx512", "fbgemm=avx512"),
    ("sse4", "aten=default;mkl=SSE4_2;onednn=not-used;fbgemm=avx2", "fbgemm=avx2"),
    ("avx512", "aten=avx512;mkl=AVX-512;onednn=gemm:jit;fbgemm=avx2", "fbgemm=avx2"),
    # An unverified library is not checked, whatever its knob says.
    ("avx2", "aten=avx2;mkl=avx2(unverified);onednn=not-used;fbgemm=avx2", ""),
    ("avx2", "aten=avx2;mkl=avx2(unverified);onednn=not-used;fbgemm=avx2(unverified)", ""),
    ("avx2", "aten=avx2;mkl=avx2(unverified);onednn=not-used", "fbgemm=missing"),
])
def test_mismatch_names_the_library_that_ignored_the_request(level, effective, problem):
    result = isa_probe.isa_mismatch(level, effective)
    if problem:
        assert problem in result and result.startswith(f"requested {level}")
    else:
        assert result == ""


@pytest.mark.skipif("avx2" not in devices.available_isa_levels(), reason="CPU lacks AVX2")
def test_worker_at_avx2_reports_what_ran(tmp_path):
    """A sweep capped at avx2 records the libraries' own report, and no mismatch."""
    command = [sys.executable, "run_bench.py", "--workload", "smoke", "--ops", "sls",
               "--impls", "embedding_bag", "--sls-modes", "sum", "--precision", "fp32",
               "--isa", "avx2",
               "--min-run-time", "0.02", "--out", str(tmp_path), "--run-id", "isa",
               "--no-report"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    from bench.records import read_rows

    (row,) = read_rows(tmp_path / "isa" / "results.csv")
    assert row.isa == "avx2"
    reported = isa_probe.parse_effective(row.isa_effective)
    assert reported["aten"] == "avx2" and reported["fbgemm"] == "avx2", row.isa_effective
    # MKL's banner names its ISA on Intel CPUs only; elsewhere the row says it is unverified.
    assert reported["mkl"] in ("AVX2", "avx2" + isa_probe.UNVERIFIED), row.isa_effective
    metrics = json.loads(row.metrics)
    assert "isa_mismatch" not in metrics
    unverified = isa_probe.unverified_libraries(row.isa_effective)
    assert metrics.get("isa_unverified", "") == ", ".join(unverified)
    # env.json records the facts behind the row's fingerprint, and the clock the run saw.
    env = json.loads((tmp_path / "isa" / "env.json").read_text())
    facts = env["fingerprint_facts"][row.fingerprint]
    assert facts["isa"] == "avx2" and facts["threads"] == row.threads
    assert devices.fingerprint_of_facts(facts) == row.fingerprint
    clock = env["effective_clock"]
    assert clock["effective_clock_hz"] is None and clock["reason"] or \
        clock["effective_clock_hz"] > 0


def test_unverified_libraries_are_listed():
    effective = "aten=avx2;mkl=avx2(unverified);onednn=not-used;fbgemm=avx2(unverified)"
    assert isa_probe.unverified_libraries(effective) == ["mkl", "fbgemm"]
    assert isa_probe.unverified_libraries("aten=avx2;mkl=AVX2;fbgemm=avx2") == []


@pytest.mark.parametrize("banner, expected", [
    ("MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture "
     "Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors, Lnx 2.60GHz "
     "lp64 gnu_thread", "AVX2"),
    ("MKL_VERBOSE oneMKL 2024.0 for Intel(R) 64 architecture Intel(R) Advanced Vector "
     "Extensions 512 (Intel(R) AVX-512) with support for INT8, BF16, FP16 (limited) "
     "instructions, and Intel(R) Advanced Matrix Extensions (Intel(R) AMX) with INT8 and "
     "BF16, Lnx 2.40GHz lp64 intel_thread", "AVX-512+AMX"),
    # What this suite's AMD EPYC host prints: MKL names no ISA on CPUs it does not tune for.
    ("MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture "
     "Intel(R) Architecture processors, Lnx 2.60GHz lp64 gnu_thread\n"
     "MKL_VERBOSE SGEMM(N,N,64,64,64,...) 4.11ms CNR:OFF Dyn:1 FastMM:1 TID:0  NThr:2", ""),
    # A banner printed earlier in the process is not printed again: only the call line.
    ("MKL_VERBOSE SGEMM(N,N,64,64,64,...) 4.11ms CNR:OFF Dyn:1 FastMM:1 TID:0  NThr:2", ""),
])
def test_mkl_banner_parsing(banner, expected):
    assert isa_probe.mkl_isa_from_banner(banner) == expected


def test_mkl_without_its_banner_is_the_knob_marked_unverified(monkeypatch):
    """MKL prints its banner once per process; once it is gone the probe must not guess."""
    first = isa_probe.mkl_isa()
    isa_probe.capture_stdout(isa_probe._mkl_fp32_matmul)  # whatever banner is left, used up
    isa_probe.mkl_isa.cache_clear()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    try:
        assert isa_probe.mkl_isa() == "avx2" + isa_probe.UNVERIFIED
    finally:
        isa_probe.mkl_isa.cache_clear()
    # Without the knob the banner is read again or the answer says it is unverified; never a
    # guess that the knob's value outlived it (an Intel host's banner names its ISA, an AMD
    # host's names none, so `first` differs by host).
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS")
    again = isa_probe.mkl_isa()
    isa_probe.mkl_isa.cache_clear()
    assert again == first or again.endswith(isa_probe.UNVERIFIED)
    assert not again.startswith("avx2")


def test_fbgemm_reports_its_own_dispatch_in_this_process():
    value = isa_probe.fbgemm_isa()
    assert value in ("reference", "avx2", "avx512_ymm", "avx512"), value
