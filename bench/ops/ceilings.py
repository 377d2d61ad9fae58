"""Machine-ceiling probes: memory bandwidth (streams by size, random-row gathers), GEMM peak."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch

from bench.models.dlrm import top_input_width
from bench.ops.common import (FLOAT_DTYPES, INDEX_BYTES, MAX_MEMORY_FRACTION,
                              MIN_ROTATION_TARGET_BYTES, ROTATION_LLC_MULTIPLE, InputMemo,
                              available_memory_bytes, beyond_cache_bytes, cycling, last_level_cache)
from bench.precisions import BYTES_PER_VALUE
from bench.registry import BuildContext, Op, Prepared, Unsupported, impl, register_op

# In-cache buffer sizes, 4x apart from inside L1 to a last-level cache: the in-cache roof is the
# plateau of this sweep, not one size (with 16 KiB, 1 MiB and 16 MiB only, a Zen 3's roof read
# 52 GB/s while a 4 MiB read reached 71 and kaggle's interaction ran at 107% of the "roof").
# The DRAM size comes from this host's LLC (common.beyond_cache_bytes: at least 4x it), since a
# fixed 512 MiB was only 1.07x a 480 MiB L3.
MEMBW_CACHE_SIZES = (16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)
# Random-row gathers: row sizes spanning the lookups' rows (dim 16..128 fp32 is 64..512 B).
GATHER_ROW_BYTES = (64, 128, 256, 512)
# Rows gathered per call: 1 MiB of them, so `read`'s destination block stays in L2 and only
# the random rows come from DRAM; index_select over thousands of rows keeps many loads in flight.
GATHER_CALL_BYTES = 1 << 20
MAX_GATHER_INDEX_BYTES = 128 << 20  # bounds the rotating random indices
CHECK_VALUES = 1 << 20  # values a big buffer's check compares (a strided sample)
# A GPU keeps a gather's rows in flight only with millions of rows per call: at 1 MiB a call
# (16K rows of 64 B) an H200 spent the call launching, 40-125 GB/s of a 4.45 TB/s memory.
GPU_GATHER_ROWS = 1 << 21
# The GPU's gather read pools bags of this many rows (an SLS), so its output (1/64 of the rows)
# stays in L2 the way the CPU's 1 MiB block does, and rows read are the traffic that counts.
GPU_GATHER_BAG_ROWS = 64
CHECK_ROWS = 256  # output rows a GEMM or gather check compares in float64
# The compute roof is the best of a size sweep: square GEMMs, plus the model's own layer shapes
# (below). A CPU stops at 1024: 2048 cubes take a minute a call where bf16 falls back to a
# scalar path (0.3 GFLOP/s at avx2); a GPU needs 8192 to reach its plateau (107 TFLOP/s bf16 at
# 1024 on an H200 that does about 790 at 8192).
CPU_GEMM_SIZES = (256, 512, 1024)
GPU_GEMM_SIZES = (256, 512, 1024, 2048, 4096, 8192)
GEMM_SIZE = 1024  # kept for callers sizing a single square
# The model's GEMMs are probed at the presets' batch: the probe's machine workload has none.
MODEL_GEMM_ROWS = 2048
# Layers narrower than this are a GEMV-like sliver no fc row runs near peak: not worth a row.
MIN_MODEL_GEMM_WIDTH = 64
# Dense FLOP per SM per clock by compute capability, from NVIDIA's A100/H100 whitepapers' per-SM
# rates (tensor cores for 16-bit and int8, CUDA cores for fp32): nominal, never measured here.
FLOP_PER_SM_CLOCK = {
    (8, 0): {"fp32": 128, "fp16": 2048, "bf16": 2048, "int8": 4096},
    (9, 0): {"fp32": 256, "fp16": 4096, "bf16": 4096, "int8": 8192},
}


@dataclasses.dataclass(frozen=True)
class ProbeSizing:
    """How large the probes of one device are, from its last cache level and memory."""

    cache_bytes: int  # the device's last-level cache (a GPU's L2, a host's LLC)
    buffer_bytes: int  # a probe buffer no cache of the device holds
    rows_per_call: dict  # gather rows per call, by row size in bytes
    gemm_sizes: tuple  # square GEMM sizes the compute roof sweeps
    pooled_read: bool  # the gather read sums bags (GPU) instead of filling a block (CPU)


def _power_of_two_at_least(value: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(value, 1.0))))


def _power_of_two_at_most(value: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(value, 1.0))))


def probe_sizing(cache_bytes: int, memory_bytes: int, kind: str, buffers: int = 2) -> ProbeSizing:
    """Probe sizes for a device of this kind ("cpu" or "cuda"): buffers the power of two at or
    above ROTATION_LLC_MULTIPLE x its cache (at least MIN_ROTATION_TARGET_BYTES), unless
    `buffers` of them pass MAX_MEMORY_FRACTION of its memory; gather rows per call of 1 MiB on
    a CPU (the block stays in L2) and millions on a GPU (enough in flight to see memory)."""
    wanted = _power_of_two_at_least(max(ROTATION_LLC_MULTIPLE * cache_bytes,
                                        MIN_ROTATION_TARGET_BYTES))
    affordable = memory_bytes * MAX_MEMORY_FRACTION / max(buffers, 1)
    buffer_bytes = wanted if wanted <= affordable else _power_of_two_at_most(affordable)
    if kind == "cuda":
        # Rows gathered plus their indices and the copy's destination fit the same share.
        rows = {size: _whole_bags(min(GPU_GATHER_ROWS, affordable // (size + INDEX_BYTES)))
                for size in GATHER_ROW_BYTES}
        sizes = GPU_GEMM_SIZES
    else:
        rows = {size: max(1, GATHER_CALL_BYTES // size) for size in GATHER_ROW_BYTES}
        sizes = CPU_GEMM_SIZES
    return ProbeSizing(int(cache_bytes), int(buffer_bytes), rows, tuple(sizes), kind == "cuda")


def _whole_bags(rows: float) -> int:
    return int(max(1, rows // GPU_GATHER_BAG_ROWS)) * GPU_GATHER_BAG_ROWS


def device_sizing(device: torch.device) -> tuple[ProbeSizing, str]:
    """The probe sizing of a device and where its cache size came from."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return (probe_sizing(properties.L2_cache_size, free_bytes, "cuda"),
                "torch.cuda L2_cache_size")
    cache_bytes, source = last_level_cache()
    return probe_sizing(cache_bytes, available_memory_bytes(), "cpu"), source


def nominal_peaks(sm_count: int, sm_clock_mhz: float, capability: tuple) -> dict:
    """Dense GFLOP/s per precision that SM count x max SM clock x the capability's per-SM rate
    give (derived, not measured); empty for a capability without a known rate."""
    rates = FLOP_PER_SM_CLOCK.get(tuple(capability))
    if not rates or sm_count <= 0 or sm_clock_mhz <= 0:
        return {}
    return {precision: sm_count * sm_clock_mhz * 1e6 * rate / 1e9
            for precision, rate in rates.items()}


def _max_sm_clock_mhz(index: int) -> float:
    """The GPU's maximum SM clock from NVML; 0 where NVML cannot tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or driver: nothing to derive from
        return 0.0
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return float(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))
    except Exception:
        return 0.0
    finally:
        pynvml.nvmlShutdown()


def device_nominal_peak(device: torch.device, precision: str) -> dict:
    """What the row records beside its measured rate: the device's nominal peak at this
    precision and what it follows from (GPUs only; a CPU does not report its FMA width)."""
    if device.type != "cuda":
        return {}
    properties = torch.cuda.get_device_properties(device)
    capability = (properties.major, properties.minor)
    clock = _max_sm_clock_mhz(device.index or 0)
    peaks = nominal_peaks(properties.multi_processor_count, clock, capability)
    facts = {"sm_count": properties.multi_processor_count, "max_sm_clock_mhz": clock or None,
             "compute_capability": f"{capability[0]}.{capability[1]}"}
    if precision not in peaks:
        return {"nominal_peak": {**facts, "gflops": None,
                                 "why_none": "no NVML clock, or no per-SM rate known for "
                                             "this compute capability"}}
    return {"nominal_peak": {**facts, "gflops": round(peaks[precision], 1),
                             "kind": "nominal: derived from SMs x clock x per-SM rate, "
                                     "not measured"}}

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
def model_gemm_shapes(workload) -> list[tuple[int, int, int]]:
    """(rows, inputs, outputs) of the workload's MLP layers at MODEL_GEMM_ROWS rows, widest
    first, without repeats or slivers narrower than MIN_MODEL_GEMM_WIDTH."""
    shapes = []
    for width_in, widths in ((workload.num_dense, workload.bottom_mlp),
                             (top_input_width(workload), workload.top_mlp)):
        for width_out in widths:
            if min(width_in, width_out) >= MIN_MODEL_GEMM_WIDTH:
                shapes.append((MODEL_GEMM_ROWS, int(width_in), int(width_out)))
            width_in = width_out
    return sorted(set(shapes), key=lambda shape: (-shape[1] * shape[2], shape))


def _gemm_variants(workload, options) -> list[dict]:
    """Squares of every device's sweep (each device skips those sized for another), then the
    model's own layer shapes: the compute roof is the best of them."""
    if options.get("gemm_size"):
        return [{"size": options["gemm_size"]}]
    squares = sorted(set(CPU_GEMM_SIZES) | set(GPU_GEMM_SIZES))
    return ([{"size": size} for size in squares]
            + [{"m": m, "k": k, "n": n, "layer": "model"} for m, k, n in
               model_gemm_shapes(workload)])


register_op(Op("gemm_peak", "matmul throughput probe per precision: the best of a size sweep "
                            "and the model's own layer shapes",
               _gemm_variants, probe=True, report_order=1))


# The copy and read probes of a size, and every random-row gather (all from the largest
# buffer), read the same seeded buffer: drawn once per worker, the latest size only (a GiB
# buffer costs about a second to draw). No probe writes to it: copy writes its destination.
PROBE_BUFFERS = InputMemo(max_entries=1)
# Gathers of one row size (copy, then read) draw the same random rows.
GATHER_INDICES = InputMemo(max_entries=1)


def _buffer(context: BuildContext, size: int = 0) -> torch.Tensor:
    """The seeded fp32 probe buffer of a size on the device, shared per worker: read-only."""
    count = max(1, (size or context.variant["bytes"]) // 4)

    def draw() -> torch.Tensor:
        generator = torch.Generator().manual_seed(context.seed)
        return torch.rand(count, generator=generator).to(context.device)

    return PROBE_BUFFERS.get(context.workload, (count, context.seed, str(context.device)), draw)


def _sample_stride(count: int) -> int:
    # A strided sample keeps the float64 check of a multi-GiB buffer within memory.
    return max(1, count // CHECK_VALUES)


class _Gather:
    """Random rows of one buffer, drawn with replacement, split into per-call blocks."""

    def __init__(self, context: BuildContext):
        self.row_bytes = int(context.variant["row_bytes"])
        if self.row_bytes % 4 or self.row_bytes <= 0:
            raise Unsupported(f"gather rows of {self.row_bytes} B are not whole fp32 values")
        self.sizing, self.cache_source = device_sizing(context.device)
        values = self.row_bytes // 4
        # The variant's size follows the host's LLC; a GPU's buffer also passes its own L2.
        size = int(context.variant["bytes"])
        if self.sizing.pooled_read:
            size = max(size, self.sizing.buffer_bytes)
        source = _buffer(context, size)
        rows = source.numel() // values
        if rows < 1:
            raise Unsupported(f"a {context.variant['bytes']} B buffer holds no "
                              f"{self.row_bytes} B row")
        self.table = source[:rows * values].view(rows, values)
        per_call = self.sizing.rows_per_call.get(self.row_bytes,
                                                 GATHER_CALL_BYTES // self.row_bytes)
        self.block_rows = max(1, min(rows, per_call))
        # One rotation of blocks draws about as many rows as the buffer holds (bounded), so the
        # rows of a block are gone from the cache when the rotation comes back to it.
        draws = min(rows, MAX_GATHER_INDEX_BYTES // INDEX_BYTES)
        blocks = max(1, draws // self.block_rows)


        def draw() -> torch.Tensor:
            generator = torch.Generator().manual_seed(context.seed + 1)
            indices = torch.randint(rows, (blocks * self.block_rows,), generator=generator)
            return indices.to(context.device)

        key = (rows, blocks * self.block_rows, context.seed, str(context.device))
        indices = GATHER_INDICES.get(context.workload, key, draw)
        self.blocks = list(indices.split(self.block_rows))

    def reference(self) -> torch.Tensor:
        """The first block's first rows in float64."""
        return self.table[self.blocks[0][:CHECK_ROWS]].to("cpu", torch.float64)

    def params(self, probe: str) -> dict:
        """What the row records about the gather."""
        return {"bytes": int(self.table.numel() * 4), "row_bytes": self.row_bytes,
                "rows_per_call": self.block_rows, "rotation_blocks": len(self.blocks),
                "cache_bytes": self.sizing.cache_bytes, "cache_source": self.cache_source,
                "pattern": "random rows", "probe": probe}


def _gather_copy(context: BuildContext) -> Prepared:
    gather = _Gather(context)
    destination = torch.empty(len(gather.blocks) * gather.block_rows, gather.table.shape[1],
                              device=context.device)
    outputs = destination.split(gather.block_rows)
    calls = [functools.partial(torch.index_select, gather.table, 0, block, out=output)
             for block, output in zip(gather.blocks, outputs)]
    return Prepared(
        run=cycling(calls), check=lambda: calls[0]()[:CHECK_ROWS], reference=gather.reference,
        samples=1, flops=0.0,
        bytes_moved=float(gather.block_rows * (2 * gather.row_bytes + INDEX_BYTES)),
        params=gather.params("torch index_select of random rows into a buffer as large as "
                             "the rows: rows read + rows written + int64 indices"),
    )


def _gather_read(context: BuildContext) -> Prepared:
    gather = _Gather(context)
    if gather.sizing.pooled_read:
        return _gather_pooled_read(context, gather)
    block = torch.empty(gather.block_rows, gather.table.shape[1], device=context.device)
    calls = [functools.partial(torch.index_select, gather.table, 0, indices, out=block)
             for indices in gather.blocks]
    return Prepared(
        run=cycling(calls), check=lambda: calls[0]()[:CHECK_ROWS], reference=gather.reference,
        samples=1, flops=0.0,
        bytes_moved=float(gather.block_rows * (gather.row_bytes + INDEX_BYTES)),
        params=gather.params("torch index_select of random rows into one in-cache block: "
                             "rows read + int64 indices"),
    )


def _gather_pooled_read(context: BuildContext, gather: _Gather) -> Prepared:
    """Millions of random rows a call, summed in bags so the output stays in the GPU's L2."""
    bag = min(GPU_GATHER_BAG_ROWS, gather.block_rows)
    bags = gather.block_rows // bag
    offsets = torch.arange(0, bags * bag, bag, device=context.device)
    calls = [functools.partial(torch.nn.functional.embedding_bag, indices[:bags * bag],
                               gather.table, offsets, mode="sum") for indices in gather.blocks]
    checked = min(bags, CHECK_ROWS)

    def reference() -> torch.Tensor:
        rows = gather.table[gather.blocks[0][:checked * bag]].to("cpu", torch.float64)
        return rows.view(checked, bag, -1).sum(1)

    return Prepared(
        run=cycling(calls), check=lambda: calls[0]()[:checked], reference=reference,
        samples=1, flops=float(bags * bag * gather.table.shape[1]),
        bytes_moved=float(bags * bag * (gather.row_bytes + INDEX_BYTES)
                          + bags * (INDEX_BYTES + gather.row_bytes)),
        params={**gather.params(f"torch embedding_bag sums of {bag} random rows: rows read + "
                                "int64 indices + offsets + pooled rows written"),
                "rows_per_call": bags * bag, "bag_rows": bag},
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


def square_fits(variant: dict, device: str, options: dict) -> str:
    """Plan-time: a square above the device's sweep is sized for another device's plateau
    (probe_sizing takes the sizes by device kind); '' when it fits or --gemm-size chose it."""
    sizes = GPU_GEMM_SIZES if device.startswith("cuda") else CPU_GEMM_SIZES
    if "size" not in variant or variant["size"] <= max(sizes) or options.get("gemm_size"):
        return ""
    return (f"squares above {max(sizes)} are sized for a GPU's plateau; this "
            f"{device.split(':')[0]} sweeps squares up to {max(sizes)} (and the model's "
            "layer shapes)")


@impl("gemm_peak", "matmul", ("fp32", "fp16", "bf16", "int8"), baseline=True, pairs=square_fits,
      description="torch.mm (MKL fp32, oneDNN/AMX bf16 and fp16) and torch._int_mm for int8; "
                  "model shapes in nn.Linear's layout (input @ weight.T)")
def build_matmul(context: BuildContext) -> Prepared:
    """C = A @ B for square matrices, or a model layer's input @ weight.T."""
    variant = context.variant
    if "size" in variant:
        size = int(variant["size"])
        reason = square_fits(variant, str(context.device), context.options)
        if reason:
            raise Unsupported(reason)
        rows, inner, columns, linear = size, size, size, False
        params = {"size": size}
    else:
        rows, inner, columns, linear = int(variant["m"]), int(variant["k"]), int(variant["n"]), True
        params = {"m": rows, "k": inner, "n": columns, "layer": "model"}
    generator = torch.Generator().manual_seed(context.seed)
    # A Linear's weight is (outputs, inputs); its forward multiplies by the transpose.
    right_shape = (columns, inner) if linear else (inner, columns)
    if context.precision == "int8":
        if not hasattr(torch, "_int_mm"):
            raise Unsupported("this torch has no torch._int_mm for int8 GEMM")
        left = torch.randint(-64, 64, (rows, inner), generator=generator, dtype=torch.int8)
        right = torch.randint(-64, 64, right_shape, generator=generator, dtype=torch.int8)
        left_device, right_device = left.to(context.device), right.to(context.device)
        multiply = torch._int_mm
    else:
        left = torch.randn(rows, inner, generator=generator)
        right = torch.randn(*right_shape, generator=generator)
        dtype = FLOAT_DTYPES[context.precision]
        left_device = left.to(context.device, dtype)
        right_device = right.to(context.device, dtype)
        multiply = torch.mm
        # Rounding the inputs is part of the format, not an error of the kernel.
        left, right = left_device.float().cpu(), right_device.float().cpu()
    if linear:
        right_device, right = right_device.t(), right.t()
    run = functools.partial(multiply, left_device, right_device)
    checked = min(rows, CHECK_ROWS)  # a float64 8192-cube would take the host minutes
    return Prepared(
        run=run,
        check=lambda: run()[:checked],
        reference=lambda: left[:checked].double() @ right.double(),
        samples=1, flops=2.0 * rows * inner * columns,
        bytes_moved=(rows * inner + inner * columns + rows * columns)
        * BYTES_PER_VALUE[context.precision],
        params=params, metrics=device_nominal_peak(context.device, context.precision),
    )
