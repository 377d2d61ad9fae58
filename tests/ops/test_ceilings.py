"""The membw probe: buffer sizing from the host's cache and the random-row gathers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.ops import ceilings, common
from bench.ops.common import INDEX_BYTES, relative_error
from bench.registry import BuildContext, impls
from workloads import presets

MIB = 1 << 20


def test_variants_gather_from_the_largest_buffer(monkeypatch):
    # Host sizing itself (4 x the LLC, within memory) is tested in tests/ops/test_formulas.py.
    monkeypatch.setattr(common, "last_level_cache", lambda: (256 * MIB, "sysfs L3"))
    monkeypatch.setattr(common, "available_memory_bytes", lambda: 64 << 30)
    variants = ceilings._membw_variants(presets.smoke(), {})
    streams = [variant["bytes"] for variant in variants if "row_bytes" not in variant]
    assert streams == [*ceilings.MEMBW_CACHE_SIZES, 1024 * MIB]
    gathers = [variant for variant in variants if "row_bytes" in variant]
    assert [variant["row_bytes"] for variant in gathers] == list(ceilings.GATHER_ROW_BYTES)
    assert {variant["bytes"] for variant in gathers} == {1024 * MIB}


def _gather(impl_name: str, row_bytes: int, size: int = 4 * MIB):
    context = BuildContext(workload=presets.smoke(), variant={"bytes": size,
                                                              "row_bytes": row_bytes},
                           precision="fp32", device=torch.device("cpu"), seed=0)
    return impls("membw")[impl_name].build(context)


@pytest.mark.parametrize("row_bytes", ceilings.GATHER_ROW_BYTES)
def test_gather_probes_count_rows_and_indices(row_bytes):
    rows_per_call = ceilings.GATHER_CALL_BYTES // row_bytes
    read = _gather("read", row_bytes)
    assert read.bytes_moved == rows_per_call * (row_bytes + INDEX_BYTES)
    copy = _gather("copy", row_bytes)
    assert copy.bytes_moved == rows_per_call * (2 * row_bytes + INDEX_BYTES)
    for prepared in (read, copy):
        assert relative_error(prepared.check(), prepared.reference()) == 0.0
        assert prepared.params["row_bytes"] == row_bytes
        assert prepared.params["rotation_blocks"] >= 2  # calls cycle through fresh rows


def test_a_wrong_gather_is_caught_by_its_check():
    # The planted fault: rows read one row off their index fail the float64 comparison.
    prepared = _gather("read", 256)
    wrong = torch.roll(prepared.check(), 1, dims=0)
    assert relative_error(wrong, prepared.reference()) > 0.1


def test_a_big_stream_copy_is_checked_on_a_sample():
    context = BuildContext(workload=presets.smoke(), variant={"bytes": 16 * MIB},
                           precision="fp32", device=torch.device("cpu"), seed=0)
    prepared = impls("membw")["copy"].build(context)
    sample = prepared.check()
    assert sample.numel() <= ceilings.CHECK_VALUES
    assert relative_error(sample, prepared.reference()) == 0.0
    assert relative_error(sample * 0, prepared.reference()) == pytest.approx(1.0)


# --- probe sizing from a device's cache and memory -------------------------------------------

GIB = 1 << 30


def test_gpu_probes_are_sized_from_its_l2_not_the_host():
    sizing = ceilings.probe_sizing(60 * MIB, 140 * GIB, "cuda")  # an H200's L2 and memory
    assert sizing.cache_bytes == 60 * MIB
    assert sizing.buffer_bytes >= 4 * 60 * MIB  # several times the L2
    assert sizing.buffer_bytes & (sizing.buffer_bytes - 1) == 0  # a power of two
    assert set(sizing.rows_per_call) == set(ceilings.GATHER_ROW_BYTES)
    assert all(rows >= 1_000_000 for rows in sizing.rows_per_call.values())  # millions in flight
    assert all(rows % ceilings.GPU_GATHER_BAG_ROWS == 0 for rows in sizing.rows_per_call.values())
    assert max(sizing.gemm_sizes) >= 8192 and sizing.pooled_read
    # A bigger L2 gives bigger buffers: the size follows the cache, not a constant.
    assert ceilings.probe_sizing(512 * MIB, 140 * GIB, "cuda").buffer_bytes >= 4 * 512 * MIB


def test_cpu_probes_keep_their_sizes():
    sizing = ceilings.probe_sizing(256 * MIB, 64 * GIB, "cpu")
    assert sizing.buffer_bytes == 1024 * MIB
    assert sizing.rows_per_call == {size: ceilings.GATHER_CALL_BYTES // size
                                    for size in ceilings.GATHER_ROW_BYTES}
    assert max(sizing.gemm_sizes) == 1024 and not sizing.pooled_read


def test_probe_buffers_stay_within_the_memory_share():
    sizing = ceilings.probe_sizing(60 * MIB, 1 * GIB, "cuda")
    assert 2 * sizing.buffer_bytes <= common.MAX_MEMORY_FRACTION * GIB
    for row_bytes, rows in sizing.rows_per_call.items():
        assert rows * (row_bytes + INDEX_BYTES) <= common.MAX_MEMORY_FRACTION * GIB


# --- the compute roof: a size sweep plus the model's own GEMM shapes -------------------------

def test_gemm_sweep_holds_squares_and_the_models_layer_shapes():
    from bench.models.dlrm import top_input_width

    workload = presets.kaggle()
    variants = ceilings._gemm_variants(workload, {})
    squares = [variant["size"] for variant in variants if "size" in variant]
    assert set(ceilings.CPU_GEMM_SIZES) | set(ceilings.GPU_GEMM_SIZES) == set(squares)
    shapes = {(v["m"], v["k"], v["n"]) for v in variants if "size" not in v}
    # fc's `linear` row (the top MLP's first layer) and the bottom MLP's 512 -> 256 layer.
    assert (ceilings.MODEL_GEMM_ROWS, top_input_width(workload), workload.top_mlp[0]) in shapes
    assert (ceilings.MODEL_GEMM_ROWS, 512, 256) in shapes
    assert all(min(k, n) >= ceilings.MIN_MODEL_GEMM_WIDTH for _, k, n in shapes)
    assert len(shapes) == len([v for v in variants if "size" not in v])  # no repeats


def _gemm(variant: dict, precision: str = "fp32"):
    context = BuildContext(workload=presets.smoke(), variant=variant, precision=precision,
                           device=torch.device("cpu"), seed=0)
    return impls("gemm_peak")["matmul"].build(context)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_model_shape_gemm_runs_in_the_linear_layout_and_is_checked(precision):
    prepared = _gemm({"m": 300, "k": 96, "n": 80, "layer": "model"}, precision)
    assert prepared.run().shape == (300, 80)
    assert prepared.flops == 2.0 * 300 * 96 * 80
    assert relative_error(prepared.check(), prepared.reference()) < 1e-2
    assert relative_error(prepared.check() * 1.5, prepared.reference()) > 0.1  # caught
    assert prepared.check().shape[0] == ceilings.CHECK_ROWS  # a slice: big cubes stay cheap


def test_a_cpu_skips_the_squares_sized_for_a_gpu():
    from bench.registry import Unsupported

    with pytest.raises(Unsupported, match="GPU"):
        _gemm({"size": 2048})
    assert _gemm({"size": 256}).flops == 2.0 * 256 ** 3


def test_nominal_peaks_follow_from_sm_count_and_clock():
    # 132 SMs at 1830 MHz on compute capability 9.0: NVIDIA's 989 TFLOP/s dense bf16 (H100 SXM).
    peaks = ceilings.nominal_peaks(132, 1830, (9, 0))
    assert peaks["bf16"] == pytest.approx(989_400, rel=1e-3)
    assert peaks["fp32"] == pytest.approx(peaks["bf16"] / 16)
    assert ceilings.nominal_peaks(132, 1830, (7, 5)) == {}  # no known per-SM rate: none claimed
    assert ceilings.nominal_peaks(132, 0, (9, 0)) == {}  # no clock: none claimed
    assert ceilings.device_nominal_peak(torch.device("cpu"), "fp32") == {}


# --- the GPU's pooled gather read, run on the CPU with a GPU's sizing ------------------------

def test_the_gpu_gather_read_pools_bags_and_is_checked(monkeypatch):
    sizing = ceilings.probe_sizing(60 * MIB, 140 * GIB, "cuda")
    context = BuildContext(workload=presets.smoke(), variant={"bytes": 4 * MIB, "row_bytes": 64},
                           precision="fp32", device=torch.device("cpu"), seed=0)
    # On a GPU the buffer grows to several times its L2; a small one keeps the test quick.
    sizing_small = dataclasses.replace(sizing, buffer_bytes=8 * MIB)
    monkeypatch.setattr(ceilings, "device_sizing", lambda device: (sizing_small, "given"))
    prepared = impls("membw")["read"].build(context)
    bag = ceilings.GPU_GATHER_BAG_ROWS
    rows = prepared.params["rows_per_call"]
    assert prepared.params["bytes"] == 8 * MIB and prepared.params["bag_rows"] == bag
    assert rows == (8 * MIB // 64) // bag * bag  # every row of the buffer's worth, whole bags
    assert prepared.bytes_moved == rows * (64 + INDEX_BYTES) + rows // bag * (INDEX_BYTES + 64)
    assert relative_error(prepared.check(), prepared.reference()) < 1e-6
    wrong = torch.roll(prepared.check(), 1, dims=0)
    assert relative_error(wrong, prepared.reference()) > 1e-3
