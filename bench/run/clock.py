"""The effective CPU clock a run saw: a spin loop of dependent integer adds, timed once."""

from __future__ import annotations

import ctypes
import mmap
import platform
import sys
from typing import Callable, Optional

# Why machine code: a Python loop measures the interpreter and a library kernel has no known
# cycle count. Here each iteration is a chain of ADDS_PER_ITERATION dependent 64-bit register
# adds (add rax, rdx), and every x86-64 core from Intel and AMD retires a dependent register
# add one cycle after the previous one, so one iteration is ADDS_PER_ITERATION cycles (the loop
# counter's dec/jnz runs beside the chain). Interruptions only slow a run down, so the fastest
# of several runs is the best estimate; the figure is the scalar clock of one core, and wide
# vector code may run at a lower one.
ADDS_PER_ITERATION = 32
# 8M cycles (~3 ms at 2.6 GHz): long against the timer's resolution, yet short enough that
# some of the runs fit between two preemptions on a shared machine (longer runs were all
# interrupted there and read low); the fastest of many such runs is kept.
DEFAULT_ITERATIONS = 250_000
DEFAULT_RUNS = 31
ASSUMPTION = (f"{ADDS_PER_ITERATION} dependent 64-bit register adds per iteration at 1 cycle "
              "each (x86-64 integer add latency); fastest of several runs; one core's scalar "
              "clock")


def spin_code() -> bytes:
    """x86-64 System V machine code of uint64 spin(uint64 n): n * ADDS_PER_ITERATION adds."""
    # mov rax, rdi; mov rdx, rdi; loop: (add rax, rdx) x ADDS; dec rdi; jnz loop; ret
    body = bytes.fromhex("4801d0") * ADDS_PER_ITERATION + bytes.fromhex("48ffcf")
    jump_back = -(len(body) + 2)  # rel8 counts from the end of the 2-byte jnz
    if jump_back < -128:
        raise ValueError("spin loop body too long for a short jump")
    return bytes.fromhex("4889f84889fa") + body + bytes([0x75, jump_back & 0xFF]) + b"\xc3"


def expected_spin_result(iterations: int) -> int:
    """What spin(iterations) returns: rax starts at n and gains n per add."""
    return (iterations + ADDS_PER_ITERATION * iterations * iterations) % (1 << 64)


class SpinLoop:
    """The spin loop mapped into executable memory; call it with an iteration count >= 1."""

    def __init__(self):
        if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux":
            raise OSError(f"the spin loop is x86-64 Linux machine code; this is "
                          f"{platform.machine()} {sys.platform}")
        code = spin_code()
        self._memory = mmap.mmap(-1, len(code),
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._memory.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        self._function = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(address)

    def __call__(self, iterations: int) -> int:
        """Run the loop; returns rax so a caller can check the code did what it should."""
        if iterations < 1:
            raise ValueError("the spin loop needs at least one iteration (0 would wrap)")
        return int(self._function(iterations))


def effective_clock(measure: Optional[Callable[[Callable[[], object], int], list]] = None,
                    iterations: int = DEFAULT_ITERATIONS, runs: int = DEFAULT_RUNS) -> dict:
    """{'effective_clock_hz', 'method', ...}; effective_clock_hz None with a reason if not run."""
    if measure is None:
        from bench.run.timing import time_each_call  # the project's one reader of a clock

        measure = time_each_call
    method = {"method": "spin loop", "assumption": ASSUMPTION, "iterations": iterations,
              "runs": runs}
    try:
        spin = SpinLoop()
        result = spin(1)  # first call: page-fault the code in, outside the timed runs
        if spin(iterations) != expected_spin_result(iterations) or result != \
                expected_spin_result(1):
            return {"effective_clock_hz": None, **method,
                    "reason": "spin loop returned a wrong value: the machine code did not run "
                              "as written"}
        seconds = min(measure(lambda: spin(iterations), runs))
    except (OSError, ValueError, AttributeError) as error:  # no PROT_EXEC memory, not x86-64
        return {"effective_clock_hz": None, **method, "reason": f"{type(error).__name__}: {error}"}
    if not seconds > 0:
        return {"effective_clock_hz": None, **method, "reason": f"non-positive time {seconds}"}
    cycles = iterations * ADDS_PER_ITERATION
    return {"effective_clock_hz": cycles / seconds, **method, "best_seconds": seconds}
