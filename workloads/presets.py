"""Named workloads with the exact shapes of the public DLRM, MLPerf and DeepRecSys configs."""

from __future__ import annotations

from typing import Callable, Sequence

from workloads.specs import (IndexDistribution, PoolingDistribution, SpecError, TableSpec,
                             WorkloadSpec)

# Criteo Kaggle (Display Advertising Challenge) table cardinalities, C1..C26.
KAGGLE_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
# Criteo Terabyte, rows capped at 40M (MLPerf DLRM v1).
TERABYTE_ROWS = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)
# Criteo Terabyte, rows capped at 10M (the DLRM reference's sub-sampled variant; TT-Rec uses it).
TERABYTE_10M_ROWS = (
    9980333, 36084, 17217, 7378, 20134, 3, 7112, 1442, 61, 9758201, 1333352, 313829, 10, 2208,
    11156, 122, 4, 970, 14, 9994222, 7267859, 9946608, 415421, 12420, 101, 36,
)
# MLPerf DLRMv2 (DCNv2, multi-hot) table sizes and lookups per table (214 per sample).
MLPERF_V2_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)
MLPERF_V2_POOLING = (
    3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1,
)


def _tables(rows: Sequence[int], dim: int, pooling: Sequence[int] | int) -> tuple[TableSpec, ...]:
    poolings = [pooling] * len(rows) if isinstance(pooling, int) else list(pooling)
    return tuple(
        TableSpec(rows=count, dim=dim, pooling=PoolingDistribution("fixed", float(lookups)))
        for count, lookups in zip(rows, poolings)
    )


def kaggle() -> WorkloadSpec:
    """DLRM's Criteo Kaggle config (one-hot, dim 16)."""
    return WorkloadSpec(
        name="kaggle", tables=_tables(KAGGLE_ROWS, 16, 1), num_dense=13,
        bottom_mlp=(512, 256, 64, 16), top_mlp=(512, 256, 1), interaction="dot",
        batch_size=2048, description="Criteo Kaggle, 26 tables (33.76M rows), dim 16",
        source="DLRM reference Kaggle config (bottom 13-512-256-64-16, top 512-256-1)",
    )


def terabyte() -> WorkloadSpec:
    """MLPerf DLRM v1 on Criteo Terabyte (rows capped at 40M, dim 128)."""
    return WorkloadSpec(
        name="terabyte", tables=_tables(TERABYTE_ROWS, 128, 1), num_dense=13,
        bottom_mlp=(512, 256, 128), top_mlp=(1024, 1024, 512, 256, 1), interaction="dot",
        batch_size=2048, description="Criteo Terabyte 40M-capped, 26 tables, dim 128",
        source="MLPerf DLRM v1 (bottom 13-512-256-128, top 479-1024-1024-512-256-1)",
    )


def terabyte_10m() -> WorkloadSpec:
    """The DLRM reference's 10M-capped Terabyte config (dim 64), as TT-Rec uses."""
    return WorkloadSpec(
        name="terabyte-10m", tables=_tables(TERABYTE_10M_ROWS, 64, 1), num_dense=13,
        bottom_mlp=(512, 256, 64), top_mlp=(512, 512, 256, 1), interaction="dot",
        batch_size=2048, description="Criteo Terabyte 10M-capped, 26 tables, dim 64",
        source="DLRM reference Terabyte config (bottom 13-512-256-64, top 415-512-512-256-1)",
    )


def mlperf() -> WorkloadSpec:
    """MLPerf DLRMv2: multi-hot Criteo, DCNv2 interaction, dim 128."""
    return WorkloadSpec(
        name="mlperf", tables=_tables(MLPERF_V2_ROWS, 128, MLPERF_V2_POOLING), num_dense=13,
        bottom_mlp=(512, 256, 128), top_mlp=(1024, 1024, 512, 256, 1), interaction="dcn",
        batch_size=2048, description="MLPerf DLRMv2 multi-hot, 26 tables, 214 lookups/sample",
        source="MLPerf DLRMv2 (DCNv2: 3 low-rank cross layers, rank 512)",
    )


def dlrm_default() -> WorkloadSpec:
    """The DLRM reference benchmark script's synthetic config."""
    return WorkloadSpec(
        name="dlrm-default", tables=_tables((1_000_000,) * 8, 64, 100), num_dense=512,
        bottom_mlp=(512, 64), top_mlp=(1024, 1024, 1024, 1), interaction="dot",
        batch_size=2048, description="8 tables x 1M rows, dim 64, 100 lookups per bag",
        source="DLRM reference bench script (bottom 512-512-64, top 1024-1024-1024-1)",
    )


def rm1() -> WorkloadSpec:
    """DeepRecSys RM1."""
    return WorkloadSpec(
        name="rm1", tables=_tables((4_000_000,) * 8, 32, 80), num_dense=128,
        bottom_mlp=(64, 32), top_mlp=(256, 64, 1), interaction="dot", batch_size=2048,
        description="8 tables x 4M rows, dim 32, 80 lookups", source="DeepRecSys RM1",
    )


def rm2() -> WorkloadSpec:
    """DeepRecSys RM2."""
    return WorkloadSpec(
        name="rm2", tables=_tables((500_000,) * 32, 64, 120), num_dense=256,
        bottom_mlp=(128, 64), top_mlp=(128, 64, 1), interaction="dot", batch_size=2048,
        description="32 tables x 500K rows, dim 64, 120 lookups", source="DeepRecSys RM2",
    )


def rm3() -> WorkloadSpec:
    """DeepRecSys RM3."""
    return WorkloadSpec(
        name="rm3", tables=_tables((2_000_000,) * 10, 32, 20), num_dense=2560,
        bottom_mlp=(1024, 256, 32), top_mlp=(512, 256, 1), interaction="dot", batch_size=2048,
        description="10 tables x 2M rows, dim 32, 20 lookups", source="DeepRecSys RM3",
    )


def smoke() -> WorkloadSpec:
    """A tiny workload that runs every op in well under a second."""
    return WorkloadSpec(
        name="smoke", tables=_tables((1000, 500, 2000), 8, 4), num_dense=4,
        bottom_mlp=(16, 8), top_mlp=(16, 1), interaction="dot", batch_size=64,
        description="3 small tables, dim 8, 4 lookups", source="dlrm-bench",
    )


PRESETS: dict[str, Callable[[], WorkloadSpec]] = {
    "smoke": smoke,
    "kaggle": kaggle,
    "terabyte": terabyte,
    "terabyte-10m": terabyte_10m,
    "mlperf": mlperf,
    "dlrm-default": dlrm_default,
    "rm1": rm1,
    "rm2": rm2,
    "rm3": rm3,
}


def synthetic(rows: int, dim: int, pooling: PoolingDistribution, num_tables: int,
              distribution: IndexDistribution) -> WorkloadSpec:
    """A free-form workload: num_tables equal tables and a small MLP around them."""
    if num_tables < 1:
        raise SpecError(f"--num-tables must be >= 1, got {num_tables}")
    tables = tuple(
        TableSpec(rows=rows, dim=dim, pooling=pooling, distribution=distribution)
        for _ in range(num_tables)
    )
    return WorkloadSpec(
        name="synthetic", tables=tables, num_dense=13, bottom_mlp=(256, dim),
        top_mlp=(256, 1), interaction="dot", batch_size=2048,
        description=f"{num_tables} x {rows} rows, dim {dim}, pooling {pooling.label()}",
        source="--rows/--dim/--pooling/--num-tables/--dist",
    )


# The batch a GPU is measured at when --batch-size is not given. At the presets' 2048 an H200
# runs a few kernel launches per step and idles (../shared/notes/gpu-facts.md: dlrm_train
# kaggle 3.9 ms a step, 0.2% of the bf16 peak), so a GPU gets the batches GPU training uses:
# - 65,536 for Kaggle shapes: the global batch of the DLRM GPU runs (the MLPerf reference's
#   torchrec_dlrm README, 8 GPUs x 8192, and NVIDIA DeepLearningExamples' DLRM).
# - 55,296 for mlperf: MLPerf Training v4.0's DLRMv2 run on 8x H200 (HugeCTR), the run whose
#   1.88M samples/s per GPU the issue compares against: mlcommons/training_results_v4.0,
#   NVIDIA/benchmarks/dlrm_dcnv2/implementations/merlin_hugectr/config_DGXH200_1x8x6912.sh
#   (BATCHSIZE=55296, 1 node x 8 GPUs x 6,912). The reference's own README example uses 65,536.
# Other presets keep their batch on every device (smoke stays tiny; the rest are CPU studies).
GPU_BATCH_SIZES = {"kaggle": 65_536, "mlperf": 55_296}


def device_batch_size(spec: WorkloadSpec, device: str) -> int:
    """The batch a workload is measured at on a device kind (cpu or cuda[:N]) without
    --batch-size: the preset's own, or on a GPU the GPU batch of GPU_BATCH_SIZES."""
    if device.startswith("cuda"):
        return GPU_BATCH_SIZES.get(spec.name, spec.batch_size)
    return spec.batch_size


def preset(name: str) -> WorkloadSpec:
    """The named preset; an unknown name raises SpecError listing the valid ones."""
    if name not in PRESETS:
        raise SpecError(
            f"unknown workload {name!r}; choose from {', '.join(PRESETS)}, synthetic, criteo:PATH")
    return PRESETS[name]()
