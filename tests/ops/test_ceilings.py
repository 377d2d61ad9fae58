"""The membw probe: buffer sizing from the host's cache and the random-row gathers."""

from __future__ import annotations

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
