"""Machine-ceiling probes: memory bandwidth by buffer size and GEMM peak by precision."""

from __future__ import annotations

import numpy as np
import torch

from bench.ops.common import BYTES_PER_VALUE, FLOAT_DTYPES
from bench.registry import BuildContext, Op, Prepared, Unsupported, impl, register_op

# Buffer sizes spanning L1, L2, the last-level cache and DRAM on the machines we know
# (48 KiB L1d, 2 MiB L2, an effective LLC of 64-80 MB): each level gets a size inside it.
MEMBW_SIZES = (16 << 10, 1 << 20, 16 << 20, 512 << 20)
# 1024^3 multiply-adds: near peak for MKL and oneDNN, and still affordable (about 7 s a call)
# at ISA levels where bf16 falls back to a scalar path (0.3 GFLOP/s at avx2 here).
GEMM_SIZE = 1024


def _membw_variants(workload, options) -> list[dict]:
    return [{"bytes": size} for size in (options.get("membw_sizes") or MEMBW_SIZES)]


register_op(Op("membw", "memory bandwidth probe (STREAM-style copy and read) by buffer size",
               _membw_variants, precision_agnostic=True))
register_op(Op("gemm_peak", "square matmul throughput probe per precision",
               lambda workload, options: [{"size": options.get("gemm_size") or GEMM_SIZE}]))


def _buffer(context: BuildContext) -> torch.Tensor:
    count = max(1, context.variant["bytes"] // 4)
    generator = torch.Generator().manual_seed(context.seed)
    return torch.rand(count, generator=generator).to(context.device)


@impl("membw", "copy", ("fp32",), baseline=True,
      description="dst.copy_(src): bytes read plus bytes written")
def build_copy(context: BuildContext) -> Prepared:
    """Copy one fp32 buffer into another."""
    source = _buffer(context)
    destination = torch.empty_like(source)
    size = source.numel() * 4
    return Prepared(
        run=lambda: destination.copy_(source),
        reference=lambda: source.double(),
        samples=1, flops=0.0, bytes_moved=2.0 * size,
        params={"bytes": size, "probe": "torch copy_, read+write bytes"},
    )


@impl("membw", "read", ("fp32",), description="src.sum(): bytes read")
def build_read(context: BuildContext) -> Prepared:
    """Sum one fp32 buffer (read-only traffic)."""
    source = _buffer(context)
    size = source.numel() * 4
    return Prepared(
        run=lambda: source.sum(),
        # numpy's float64 sum: not the torch reduction that is being timed.
        reference=lambda: torch.tensor(np.sum(source.cpu().numpy(), dtype=np.float64)),
        samples=1, flops=float(source.numel()), bytes_moved=float(size),
        # fp32 accumulation over millions of values drifts from the float64 sum.
        tolerance=1e-3,
        params={"bytes": size, "probe": "torch sum, read bytes"},
    )


@impl("gemm_peak", "matmul", ("fp32", "fp16", "bf16", "int8"), baseline=True,
      description="torch.mm (MKL fp32, oneDNN/AMX bf16 and fp16) and torch._int_mm for int8")
def build_matmul(context: BuildContext) -> Prepared:
    """C = A @ B for square matrices."""
    size = context.variant["size"]
    generator = torch.Generator().manual_seed(context.seed)
    if context.precision == "int8":
        if not hasattr(torch, "_int_mm"):
            raise Unsupported("this torch has no torch._int_mm for int8 GEMM")
        left = torch.randint(-64, 64, (size, size), generator=generator, dtype=torch.int8)
        right = torch.randint(-64, 64, (size, size), generator=generator, dtype=torch.int8)
        left_device, right_device = left.to(context.device), right.to(context.device)
        run = lambda: torch._int_mm(left_device, right_device)  # noqa: E731
    else:
        left = torch.randn(size, size, generator=generator)
        right = torch.randn(size, size, generator=generator)
        dtype = FLOAT_DTYPES[context.precision]
        left_device = left.to(context.device, dtype)
        right_device = right.to(context.device, dtype)
        run = lambda: torch.mm(left_device, right_device)  # noqa: E731
        # Rounding the inputs is part of the format, not an error of the kernel.
        left, right = left_device.float().cpu(), right_device.float().cpu()
    return Prepared(
        run=run,
        reference=lambda: left.double() @ right.double(),
        samples=1, flops=2.0 * size ** 3,
        bytes_moved=3.0 * size * size * BYTES_PER_VALUE[context.precision],
        params={"size": size},
    )
