"""Machine-ceiling probes: memory bandwidth (streams by size, random-row gathers), GEMM peak."""

from __future__ import annotations

import functools

import numpy as np
import torch

from bench.ops.common import BYTES_PER_VALUE, FLOAT_DTYPES, INDEX_BYTES, beyond_cache_bytes, cycling
from bench.registry import BuildContext, Op, Prepared, Unsupported, impl, register_op

# In-cache buffer sizes: one inside L1 (48 KiB here), L2 (2 MiB) and any last-level cache seen;
# the DRAM size comes from this host's LLC (common.beyond_cache_bytes: at least 4x it), since a
# fixed 512 MiB was only 1.07x a 480 MiB L3.
MEMBW_CACHE_SIZES = (16 << 10, 1 << 20, 16 << 20)
# Random-row gathers: row sizes spanning the lookups' rows (dim 16..128 fp32 is 64..512 B).
GATHER_ROW_BYTES = (64, 128, 256, 512)
# Rows gathered per call: 1 MiB of them, so `read`'s destination block stays in L2 and only
# the random rows come from DRAM; index_select over thousands of rows keeps many loads in flight.
GATHER_CALL_BYTES = 1 << 20
MAX_GATHER_INDEX_BYTES = 128 << 20  # bounds the rotating random indices
CHECK_VALUES = 1 << 20  # values a big buffer's check compares (a strided sample)
# 1024^3 multiply-adds: near peak for MKL and oneDNN, and still affordable (about 7 s a call)
# at ISA levels where bf16 falls back to a scalar path (0.3 GFLOP/s at avx2 here).
GEMM_SIZE = 1024


def _membw_variants(workload, options) -> list[dict]:
    """Streams at every size, then random-row gathers from the largest buffer."""
    sizes = list(options.get("membw_sizes") or ())
    if not sizes:
        # Copy holds a source and a destination buffer of the largest size.
        sizes = list(MEMBW_CACHE_SIZES) + [beyond_cache_bytes(buffers=2)]
    largest = max(sizes)
    row_sizes = options.get("membw_gather_row_bytes") or GATHER_ROW_BYTES
    return ([{"bytes": size} for size in sizes]
            + [{"bytes": largest, "row_bytes": row_bytes} for row_bytes in row_sizes
               if row_bytes <= largest])


register_op(Op("membw", "memory bandwidth probe by buffer size: STREAM-style copy and read, and "
                        "random-row gathers (rows of 64-512 B) from a buffer beyond the LLC",
               _membw_variants, precision_agnostic=True, probe=True, report_order=0))
register_op(Op("gemm_peak", "square matmul throughput probe per precision",
               lambda workload, options: [{"size": options.get("gemm_size") or GEMM_SIZE}],
               probe=True, report_order=1))


def _buffer(context: BuildContext) -> torch.Tensor:
    count = max(1, context.variant["bytes"] // 4)
    generator = torch.Generator().manual_seed(context.seed)
    return torch.rand(count, generator=generator).to(context.device)


def _sample_stride(count: int) -> int:
    # A strided sample keeps the float64 check of a multi-GiB buffer within memory.
    return max(1, count // CHECK_VALUES)


class _Gather:
    """Random rows of one buffer, drawn with replacement, split into per-call blocks."""

    def __init__(self, context: BuildContext):
        self.row_bytes = int(context.variant["row_bytes"])
        if self.row_bytes % 4 or self.row_bytes <= 0:
            raise Unsupported(f"gather rows of {self.row_bytes} B are not whole fp32 values")
        values = self.row_bytes // 4
        source = _buffer(context)
        rows = source.numel() // values
        if rows < 1:
            raise Unsupported(f"a {context.variant['bytes']} B buffer holds no "
                              f"{self.row_bytes} B row")
        self.table = source[:rows * values].view(rows, values)
        self.block_rows = max(1, min(rows, GATHER_CALL_BYTES // self.row_bytes))
        # One rotation of blocks draws about as many rows as the buffer holds (bounded), so the
        # rows of a block are gone from the cache when the rotation comes back to it.
        draws = min(rows, MAX_GATHER_INDEX_BYTES // INDEX_BYTES)
        blocks = max(1, draws // self.block_rows)
        generator = torch.Generator().manual_seed(context.seed + 1)
        indices = torch.randint(rows, (blocks * self.block_rows,), generator=generator)
        self.blocks = list(indices.to(context.device).split(self.block_rows))

    def reference(self) -> torch.Tensor:
        """The first block's rows in float64."""
        return self.table[self.blocks[0]].to("cpu", torch.float64)

    def params(self, probe: str) -> dict:
        """What the row records about the gather."""
        return {"bytes": int(self.table.numel() * 4), "row_bytes": self.row_bytes,
                "rows_per_call": self.block_rows, "rotation_blocks": len(self.blocks),
                "pattern": "random rows", "probe": probe}


def _gather_copy(context: BuildContext) -> Prepared:
    gather = _Gather(context)
    destination = torch.empty(len(gather.blocks) * gather.block_rows, gather.table.shape[1],
                              device=context.device)
    outputs = destination.split(gather.block_rows)
    calls = [functools.partial(torch.index_select, gather.table, 0, block, out=output)
             for block, output in zip(gather.blocks, outputs)]
    return Prepared(
        run=cycling(calls), check=calls[0], reference=gather.reference,
        samples=1, flops=0.0,
        bytes_moved=float(gather.block_rows * (2 * gather.row_bytes + INDEX_BYTES)),
        params=gather.params("torch index_select of random rows into a buffer as large as "
                             "the rows: rows read + rows written + int64 indices"),
    )


def _gather_read(context: BuildContext) -> Prepared:
    gather = _Gather(context)
    block = torch.empty(gather.block_rows, gather.table.shape[1], device=context.device)
    calls = [functools.partial(torch.index_select, gather.table, 0, indices, out=block)
             for indices in gather.blocks]
    return Prepared(
        run=cycling(calls), check=calls[0], reference=gather.reference,
        samples=1, flops=0.0,
        bytes_moved=float(gather.block_rows * (gather.row_bytes + INDEX_BYTES)),
        params=gather.params("torch index_select of random rows into one in-cache block: "
                             "rows read + int64 indices"),
    )


@impl("membw", "copy", ("fp32",), baseline=True,
      description="dst.copy_(src): bytes read plus bytes written; for gathers, random rows "
                  "copied out")
def build_copy(context: BuildContext) -> Prepared:
    """Copy one fp32 buffer into another (or gather random rows into a second buffer)."""
    if "row_bytes" in context.variant:
        return _gather_copy(context)
    source = _buffer(context)
    destination = torch.empty_like(source)
    size = source.numel() * 4
    stride = _sample_stride(source.numel())

    def check():
        destination.copy_(source)
        return destination[::stride]

    return Prepared(
        run=lambda: destination.copy_(source),
        check=check,
        reference=lambda: source[::stride].to("cpu", torch.float64),
        samples=1, flops=0.0, bytes_moved=2.0 * size,
        params={"bytes": size, "pattern": "stream", "probe": "torch copy_, read+write bytes"},
    )


@impl("membw", "read", ("fp32",),
      description="src.sum(): bytes read; for gathers, random rows read into an in-cache block")
def build_read(context: BuildContext) -> Prepared:
    """Sum one fp32 buffer (read-only traffic), or gather random rows into a cached block."""
    if "row_bytes" in context.variant:
        return _gather_read(context)
    source = _buffer(context)
    size = source.numel() * 4

    def reference():
        # numpy's float64 sum, not the torch reduction being timed; chunks keep the float64
        # copy small for a multi-GiB buffer.
        return torch.tensor(sum(float(np.sum(chunk.cpu().numpy(), dtype=np.float64))
                                for chunk in source.split(1 << 24)), dtype=torch.float64)

    return Prepared(
        run=lambda: source.sum(),
        reference=reference,
        samples=1, flops=float(source.numel()), bytes_moved=float(size),
        # fp32 accumulation over millions of values drifts from the float64 sum.
        tolerance=1e-3,
        params={"bytes": size, "pattern": "stream", "probe": "torch sum, read bytes"},
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
