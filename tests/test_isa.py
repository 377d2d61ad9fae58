"""ISA levels: the knobs each level sets, refusal of levels this CPU lacks, and verification."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import devices, isa_probe

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_KNOBS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


@pytest.mark.parametrize("level", [name for name in devices.ISA_LEVELS if name != "native"])
def test_every_capped_level_sets_each_library_knob(level):
    knobs = devices.ISA_LEVELS[level]
    for knob in LIBRARY_KNOBS:
        assert knob in knobs, f"{level} does not set {knob}"
    # FBGEMM is capped either by its instruction knob or by its scalar reference path.
    assert "FBGEMM_ENABLE_INSTRUCTIONS" in knobs or knobs.get("FBGEMM_NO_ASMJIT") == "1"


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
               "--sls-modes", "sum", "--precision", "fp32", "--isa", "avx2",
               "--min-run-time", "0.02", "--out", str(tmp_path), "--run-id", "isa",
               "--no-report"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    from bench.records import read_rows

    (row,) = read_rows(tmp_path / "isa" / "results.csv")
    assert row.isa == "avx2"
    assert "aten=avx2" in row.isa_effective and "mkl=AVX2" in row.isa_effective
    assert "isa_mismatch" not in json.loads(row.metrics)
