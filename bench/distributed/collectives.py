"""Collective microbenchmarks (all-to-all, allreduce) and nccl-tests' bandwidth definitions."""

from __future__ import annotations

import torch
import torch.distributed as dist

from bench.run.timing import time_each_call

COLLECTIVE_OPS = ("alltoall", "allreduce")
DEFAULT_SIZES = tuple(1 << power for power in range(10, 27, 2))  # 1 KiB .. 64 MiB per rank


def bus_factor(op: str, world_size: int) -> float:
    """busbw / algbw as nccl-tests defines it: (n-1)/n for all-to-all, 2(n-1)/n for allreduce."""
    if op == "alltoall":
        return (world_size - 1) / world_size
    if op == "allreduce":
        return 2.0 * (world_size - 1) / world_size
    raise ValueError(f"unknown collective {op!r}")


def bandwidths(op: str, size_bytes: float, seconds: float, world_size: int) -> dict:
    """algbw = bytes per rank buffer / time; busbw = algbw x bus factor (both GB/s)."""
    algbw = size_bytes / seconds / 1e9
    return {"algbw_gbps": algbw, "busbw_gbps": algbw * bus_factor(op, world_size)}


def collective_closure(op: str, size_bytes: int, rank: int, world_size: int,
                       device: torch.device):
    """The collective on a per-rank buffer of size_bytes, and a check against its exact result."""
    count = max(world_size, size_bytes // 4 // world_size * world_size)
    # Values rank * count + position: exact in fp32 below 2^24, so the check is exact.
    source = (torch.arange(count, dtype=torch.float32, device=device) % 4096) + 4096 * rank
    output = torch.empty_like(source)
    work = source.clone()

    def alltoall():
        dist.all_to_all_single(output, source)

    def allreduce():
        dist.all_reduce(work)

    def check() -> str:
        if op == "alltoall":
            alltoall()
            chunk = count // world_size
            positions = torch.arange(count, device=device) % chunk + rank * chunk
            expected = (positions % 4096).double() + 4096 * (torch.arange(count, device=device)
                                                             // chunk).double()
            got = output.double()
        else:
            work.copy_(source)
            allreduce()
            expected = (source.double() - 4096 * rank) * world_size + 4096 * sum(
                range(world_size))
            got = work.double()
        if not torch.equal(got.cpu(), expected.cpu()):
            wrong = int((got.cpu() != expected.cpu()).sum())
            return f"{op} result differs from the exact float64 expectation at {wrong} values"
        return ""

    run = alltoall if op == "alltoall" else allreduce
    return run, check, count * 4


def time_collective(run, repetitions: int, device: torch.device) -> list[float]:
    """Seconds of each repetition on this rank (a barrier first, so ranks start together)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once():
        run()
        synchronize()

    for _ in range(2):  # warm-up: connection set-up and buffer registration
        once()
    dist.barrier()
    return time_each_call(once, repetitions)
