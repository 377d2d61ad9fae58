"""Ask the libraries which SIMD ISA they actually dispatch to (ATen, MKL, oneDNN, FBGEMM)."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
import tempfile
from pathlib import Path
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


# Marks a library whose report cannot confirm what it ran: the value before it is the knob.
UNVERIFIED = "(unverified)"


def _unverified(knob: str) -> str:
    """The knob's value (or 'auto' when unset), marked as not confirmed by the library."""
    return os.environ.get(knob, "auto").lower() + UNVERIFIED


def mkl_isa_from_banner(text: str) -> str:
    """The ISA an MKL_VERBOSE banner names, '' when it names none."""
    # The banner reads "... for Intel(R) 64 architecture <ISA description>, Lnx 2.60GHz ...".
    # On CPUs MKL does not tune for (e.g. AMD EPYC) the description is the generic "Intel(R)
    # Architecture processors", and when the banner was printed earlier in the process there
    # is no banner at all: either way nothing confirms the ISA.
    banner = next((line for line in text.splitlines() if "architecture" in line), "")
    if "AMX" in banner:
        return "AVX-512+AMX"
    for label, pattern in (("AVX-512", "AVX-512"), ("AVX2", "AVX2"), ("AVX", "AVX)"),
                           ("SSE4_2", "SSE4")):
        if pattern in banner:
            return label
    return ""


@functools.lru_cache(maxsize=1)
def mkl_isa() -> str:
    """The instruction set MKL's banner reports for fp32 GEMM, or the knob marked unverified."""
    # MKL prints its banner once per process, so the first answer is kept for later calls.
    return mkl_isa_from_banner(capture_stdout(_mkl_fp32_matmul)) or _unverified(
        "MKL_ENABLE_INSTRUCTIONS")


def _fbgemm_function(name: str, restype, argtypes=()):
    """An exported FBGEMM function of libtorch_cpu via ctypes (AttributeError when absent)."""
    library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    function = getattr(library, name)
    function.restype, function.argtypes = restype, list(argtypes)
    return function


def fbgemm_dispatch() -> str:
    """What FBGEMM's own dispatcher picks: reference, avx2, avx512_ymm or avx512."""
    # FBGEMM prints nothing, but its embedding kernels choose by fbgemm::fbgemmInstructionSet()
    # (which reads FBGEMM_ENABLE_INSTRUCTIONS and the CPU) and fall back to the scalar
    # reference kernels when fbgemm::is_asmjit_disabled() (FBGEMM_NO_ASMJIT) says so. The enum's
    # numbering changed between FBGEMM versions, so its width is read with isZmm/isYmm; only
    # anyarch = 0 and avx2 = 1 have kept their values.
    instruction_set = _fbgemm_function("_ZN6fbgemm20fbgemmInstructionSetEv", ctypes.c_int)()
    asmjit_disabled = _fbgemm_function("_ZN6fbgemm18is_asmjit_disabledEv", ctypes.c_bool)()
    is_zmm = _fbgemm_function("_ZN6fbgemm5isZmmENS_10inst_set_tE", ctypes.c_bool, [ctypes.c_int])
    is_ymm = _fbgemm_function("_ZN6fbgemm5isYmmENS_10inst_set_tE", ctypes.c_bool, [ctypes.c_int])
    if asmjit_disabled or instruction_set == 0:
        return "reference"
    if is_zmm(instruction_set):
        return "avx512"
    if is_ymm(instruction_set):
        return "avx2" if instruction_set == 1 else "avx512_ymm"
    return f"inst_set_{instruction_set}"


def fbgemm_isa() -> str:
    """FBGEMM's dispatch decision, or its knob marked unverified where it cannot be asked."""
    try:
        return fbgemm_dispatch()
    except (OSError, AttributeError):  # a torch built without FBGEMM or with hidden symbols
        if os.environ.get("FBGEMM_NO_ASMJIT") == "1":
            return "reference" + UNVERIFIED
        return _unverified("FBGEMM_ENABLE_INSTRUCTIONS")


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
# A library whose report is marked UNVERIFIED is not checked (and the row says so).
_EXPECTED = {
    "sse4": {"aten": ("default",), "mkl": ("SSE4_2",), "fbgemm": ("reference",),
             "onednn_forbid": ("avx512", "amx")},
    "avx2": {"aten": ("avx2",), "mkl": ("AVX2",), "fbgemm": ("avx2",),
             "onednn_forbid": ("avx512", "amx")},
    "avx512": {"aten": ("avx512",), "mkl": ("AVX-512",), "fbgemm": ("avx512",),
               "onednn_forbid": ("amx", "avx512_core_bf16")},
    "avx512_bf16": {"aten": ("avx512",), "mkl": ("AVX-512",), "fbgemm": ("avx512",),
                    "onednn": ("avx512_core_bf16",)},
    "amx": {"aten": ("avx512",), "mkl": ("AVX-512",), "fbgemm": ("avx512",),
            "onednn": ("amx",)},
}


def parse_effective(effective: str) -> dict[str, str]:
    """'aten=avx2;mkl=AVX2;...' as {'aten': 'avx2', 'mkl': 'AVX2', ...}."""
    return dict(part.split("=", 1) for part in effective.split(";") if "=" in part)


def unverified_libraries(effective: str) -> list[str]:
    """Libraries whose entry in an isa_effective string is the knob, not their own report."""
    return [name for name, value in parse_effective(effective).items()
            if value.endswith(UNVERIFIED)]


def isa_mismatch(level: str, effective: str) -> str:
    """Why the libraries' reports contradict the requested level ('' when they agree)."""
    if level not in _EXPECTED or not effective:
        return ""
    reported = parse_effective(effective)
    expected = _EXPECTED[level]
    problems = []
    for library in ("aten", "mkl", "fbgemm"):
        value = reported.get(library, "")
        if value.endswith(UNVERIFIED):
            continue
        if value not in expected[library]:
            problems.append(f"{library}={value or 'missing'}")
    onednn = reported.get("onednn", "")
    if "onednn" in expected and not any(part in onednn for part in expected["onednn"]):
        problems.append(f"onednn={onednn}")
    if any(part in onednn for part in expected.get("onednn_forbid", ())):
        problems.append(f"onednn={onednn}")
    return f"requested {level} but " + ", ".join(problems) if problems else ""
