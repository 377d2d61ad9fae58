"""The membw probe: buffer sizing from the host's cache and the random-row gathers."""

from __future__ import annotations

import pytest
import torch

from bench.ops import ceilings
from bench.ops.common import INDEX_BYTES, relative_error
from bench.registry import BuildContext, impls
from workloads import presets

MIB = 1 << 20


def fake_cache(tmp_path, entries):
    """A sysfs-like cache directory: (type, size text) per index."""
    for number, (kind, size) in enumerate(entries):
        index = tmp_path / f"index{number}"
        index.mkdir()
        (index / "type").write_text(kind + "\n")
        (index / "size").write_text(size + "\n")
    return tmp_path


def test_last_level_cache_is_the_largest_data_or_unified_cache(tmp_path):
    directory = fake_cache(tmp_path, [("Data", "48K"), ("Instruction", "4096M"),
                                      ("Unified", "2048K"), ("Unified", "32768K")])
    assert ceilings.last_level_cache_bytes(directory) == 32 * MIB
    assert ceilings.last_level_cache_bytes(tmp_path / "absent") == 0


def test_dram_buffer_is_four_times_the_llc_within_memory():
    assert ceilings.beyond_cache_bytes(32 * MIB, 64 << 30) == 128 * MIB
    # Little memory: the bound wins over 4 x 480 MiB.
    assert ceilings.beyond_cache_bytes(480 * MIB, 4 << 30) == 512 * MIB
    # No sysfs cache sizes: 4 x the fallback, the old fixed 512 MiB.
    assert ceilings.beyond_cache_bytes(0, 64 << 30) == 512 * MIB


def test_variants_gather_from_the_largest_buffer(monkeypatch):
    monkeypatch.setattr(ceilings, "last_level_cache_bytes", lambda: 8 * MIB)
    monkeypatch.setattr(ceilings, "_available_memory_bytes", lambda: 64 << 30)
    variants = ceilings._membw_variants(presets.smoke(), {})
    streams = [variant["bytes"] for variant in variants if "row_bytes" not in variant]
    assert streams == [*ceilings.MEMBW_CACHE_SIZES, 32 * MIB]
    gathers = [variant for variant in variants if "row_bytes" in variant]
    assert [variant["row_bytes"] for variant in gathers] == list(ceilings.GATHER_ROW_BYTES)
    assert {variant["bytes"] for variant in gathers} == {32 * MIB}


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
