"""Ask the libraries which SIMD ISA they actually dispatch to (ATen, MKL, oneDNN, FBGEMM)."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Callable

import torch


def capture_stdout(action: Callable[[], None]) -> str:
    """Run action with file descriptor 1 redirected; return what C libraries printed there."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            action()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode(errors="replace")


def _onednn_bf16_matmul() -> None:
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        matrix = torch.randn(64, 64, dtype=torch.bfloat16)
        torch.mm(matrix, matrix)


def _mkl_fp32_matmul() -> None:
    with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
        matrix = torch.randn(64, 64)
        torch.mm(matrix, matrix)


def onednn_isa() -> str:
    """oneDNN's bf16 matmul implementation (e.g. brg_matmul:avx10_1_512_amx) or 'not-used'."""
    text = capture_stdout(_onednn_bf16_matmul)
    implementation = re.search(r"exec,cpu,matmul,([^,]+),", text)
    if implementation:
        return implementation.group(1)
    # oneDNN prints its info lines once per process; an ISA cap below its minimum means
    # bf16 matmul falls back to ATen's own kernels and oneDNN prints nothing.
    return "not-used"


def mkl_isa() -> str:
    """The instruction set MKL reports for fp32 GEMM (e.g. AVX-512+AMX, AVX2)."""
    text = capture_stdout(_mkl_fp32_matmul)
    if "AMX" in text:
        return "AVX-512+AMX"
    for label, pattern in (("AVX-512", "AVX-512"), ("AVX2", "AVX2"), ("AVX", "AVX)"),
                           ("SSE4_2", "SSE4")):
        if pattern in text:
            return label
    return "unknown"


def fbgemm_isa() -> str:
    """FBGEMM does not report its choice; record the knob it reads (or its default)."""
    if os.environ.get("FBGEMM_NO_ASMJIT") == "1":
        return "reference"
    return os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "auto").lower()


def effective_isa() -> str:
    """One string naming what each library dispatches to in this process."""
    parts = {
        "aten": torch.backends.cpu.get_cpu_capability().lower(),
        "mkl": mkl_isa(),
        "onednn": onednn_isa(),
        "fbgemm": fbgemm_isa(),
    }
    return ";".join(f"{name}={value}" for name, value in parts.items())


# What each library must report for a requested level to count as having taken effect.
# FBGEMM reports nothing, so its knob cannot be verified and is not checked here.
_EXPECTED = {
    "sse4": {"aten": ("default",), "mkl": ("SSE4_2",), "onednn_forbid": ("avx512", "amx")},
    "avx2": {"aten": ("avx2",), "mkl": ("AVX2",), "onednn_forbid": ("avx512", "amx")},
    "avx512": {"aten": ("avx512",), "mkl": ("AVX-512",),
               "onednn_forbid": ("amx", "avx512_core_bf16")},
    "avx512_bf16": {"aten": ("avx512",), "mkl": ("AVX-512",), "onednn": ("avx512_core_bf16",)},
    "amx": {"aten": ("avx512",), "mkl": ("AVX-512",), "onednn": ("amx",)},
}


def isa_mismatch(level: str, effective: str) -> str:
    """Why the libraries' reports contradict the requested level ('' when they agree)."""
    if level not in _EXPECTED or not effective:
        return ""
    reported = dict(part.split("=", 1) for part in effective.split(";") if "=" in part)
    expected = _EXPECTED[level]
    problems = []
    if reported.get("aten") not in expected["aten"]:
        problems.append(f"aten={reported.get('aten')}")
    if reported.get("mkl") not in expected["mkl"]:
        problems.append(f"mkl={reported.get('mkl')}")
    onednn = reported.get("onednn", "")
    if "onednn" in expected and not any(part in onednn for part in expected["onednn"]):
        problems.append(f"onednn={onednn}")
    if any(part in onednn for part in expected.get("onednn_forbid", ())):
        problems.append(f"onednn={onednn}")
    return f"requested {level} but " + ", ".join(problems) if problems else ""
