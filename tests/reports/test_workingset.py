"""Tests of the working-set sweep: cliff detection, cache matching and the report section."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from bench.records import ResultRow
from conftest import write_run
from reports import canvas, plots, runs, workingset
from reports.build import build_report
from reports.workingset import Cliff, detect_cliffs

KIB, MIB = 1 << 10, 1 << 20
ENV = {"cpu_model": "Test CPU", "l1d_bytes": 32 * KIB, "l2_bytes": 1 * MIB,
       "l3_bytes": 16 * MIB}
# Footprints 8 KiB .. 256 MiB, one per power of four; bandwidth steps down past each cache.
SIZES = [8 * KIB * 4 ** step for step in range(8)]


def stepped_bandwidth(size: float, scale: float = 1.0) -> float:
    """A hand-made curve: 100 GB/s in L1, 60 in L2, 30 in L3, 10 from DRAM."""
    for limit, bandwidth in ((ENV["l1d_bytes"], 100.0), (ENV["l2_bytes"], 60.0),
                             (ENV["l3_bytes"], 30.0)):
        if size <= limit:
            return bandwidth * scale
    return 10.0 * scale


# ---------------------------------------------------------------- detect_cliffs

def test_flat_curve_has_no_cliff():
    assert detect_cliffs([1, 2, 4, 8], [50, 49, 51, 48]) == []


def test_stepped_curve_has_a_cliff_past_each_cache():
    bandwidths = [stepped_bandwidth(size) for size in SIZES]
    cliffs = detect_cliffs(SIZES, bandwidths)
    assert [cliff.footprint_bytes for cliff in cliffs] == [128 * KIB, 2 * MIB, 32 * MIB]
    assert [cliff.previous_bytes for cliff in cliffs] == [32 * KIB, 512 * KIB, 8 * MIB]
    assert [cliff.drop for cliff in cliffs] == pytest.approx([0.4, 0.5, 2 / 3])
    assert cliffs[0].centre_bytes == pytest.approx(64 * KIB)


def test_threshold_decides_what_a_cliff_is():
    sizes, bandwidths = [1, 2, 4, 8], [100.0, 90.0, 81.0, 40.0]
    assert [cliff.footprint_bytes for cliff in detect_cliffs(sizes, bandwidths)] == [8]
    assert len(detect_cliffs(sizes, bandwidths, threshold=0.05)) == 3
    assert detect_cliffs(sizes, bandwidths, threshold=0.6) == []


def test_rises_are_not_cliffs_and_order_does_not_matter():
    # Unsorted input; the rise from 4 to 8 (prefetching, noise) is no cliff.
    cliffs = detect_cliffs([8, 1, 4, 2], [80.0, 100.0, 40.0, 95.0])
    assert cliffs == [Cliff(2.0, 4.0, 95.0, 40.0)]


def test_bad_points_are_ignored_and_repeats_take_the_median():
    sizes = [1, 2, 2, 2, 4, 8, 0]
    bandwidths = [100.0, 90.0, 20.0, 95.0, math.nan, 30.0, 5.0]
    cliffs = detect_cliffs(sizes, bandwidths)
    assert [(cliff.previous_bytes, cliff.footprint_bytes) for cliff in cliffs] == [(2, 8)]
    assert cliffs[0].bandwidth_before == 90.0
    assert detect_cliffs([], []) == [] and detect_cliffs([5], [1.0]) == []


def test_detect_cliffs_rejects_bad_arguments():
    with pytest.raises(ValueError):
        detect_cliffs([1, 2], [1.0])
    with pytest.raises(ValueError):
        detect_cliffs([1, 2], [1.0, 0.5], threshold=1.5)


# ---------------------------------------------------------------- sweep rows and the table

def sls_row(size: int, precision: str = "fp32", isa: str = "native", threads: int = 1,
            distribution: str = "uniform", scale: float = 1.0) -> ResultRow:
    """A measured sls row of a footprint sweep (64-dim rows, 2048 bags of 32 lookups, cycling
    through 8 batches)."""
    row_bytes = {"fp32": 256, "int8": 72}[precision]
    gbps = stepped_bandwidth(size, scale)
    bytes_moved = 2048 * 32 * row_bytes
    median = bytes_moved / gbps / 1e9
    params = {"table": 0, "rows": size // row_bytes, "dim": 64, "pooling": "32",
              "distribution": distribution, "mode": "sum", "table_bytes": size,
              "rotation_batches": 8}
    return ResultRow(run_id="ws", op="sls", impl="embedding_bag", workload="synthetic",
                     params=json.dumps(params), device="cpu", isa=isa, threads=threads,
                     precision=precision, batch_size=2048, n_samples=5, median_s=median,
                     iqr_s=median * 0.02, samples_per_s=2048 / median, bytes_moved=bytes_moved,
                     gbps=gbps, samples_s=json.dumps([median] * 5),
                     timestamp="2025-03-01T00:00:00")


def sweep_run_rows() -> list[ResultRow]:
    """fp32 and int8 sweeps at the top configuration, plus rows that are no sweep."""
    rows = [sls_row(size) for size in SIZES]
    rows += [sls_row(size, "int8", scale=1.5) for size in SIZES]
    # Fewer threads and a lower ISA level: left out in favour of the top configuration.
    rows += [sls_row(size, threads=1, isa="avx2", scale=0.5) for size in SIZES[:4]]
    # Two sizes of a zipf line: too few for a sweep.
    rows += [sls_row(size, distribution="zipf:1.05") for size in SIZES[:2]]
    return rows


def sweep_frame() -> pd.DataFrame:
    """The sweep rows as the report reads them."""
    return runs.rows_to_frame(sweep_run_rows())


def test_sweep_rows_keep_only_sweeps_at_the_top_configuration():
    sweep = workingset.sweep_rows(sweep_frame())
    assert sorted(sweep["series"].unique()) == ["fp32 sum", "int8 sum"]
    assert set(sweep["isa"]) == {"native"} and len(sweep) == 2 * len(SIZES)
    # The loop cycles through 8 batches: it touches up to 8 batches' rows, not one batch's.
    assert sweep["loop_bytes"].iloc[0] == pytest.approx(2048 * 32 * 256 * 8)
    assert workingset.sweep_rows(runs.rows_to_frame([sls_row(8 * KIB)])).empty


def test_cliffs_table_matches_cliffs_to_the_sysfs_sizes():
    table = workingset.cliffs_table(workingset.sweep_rows(sweep_frame()), ENV)
    fp32 = table[table["series"] == "fp32 sum"].set_index("cache_level")
    assert list(fp32.index) == ["L1d", "L2", "L3"]
    assert fp32.loc["L1d", "cliff_between"] == "32 KiB - 128 KiB"
    assert fp32.loc["L2", "sysfs_size"] == "1 MiB"
    assert fp32.loc["L2", "drop"] == pytest.approx(0.5)
    assert fp32.loc["L3", "cliff_over_cache"] == pytest.approx(1.0)


def test_cliffs_table_lists_levels_without_a_cliff_and_cliffs_without_a_level():
    sweep = pd.DataFrame({"series": ["a"] * 4, "table_bytes": [1e3, 1e4, 1e9, 1e10],
                          "gbps": [50.0, 50.0, 10.0, 10.0]})
    table = workingset.cliffs_table(sweep, {"l1d_bytes": 32 * KIB})
    assert table["cache_level"].tolist() == ["L1d", "(none near)"]
    assert table["cliff_between"].iloc[0] == "no cliff detected"
    assert math.isnan(table["cliff_over_cache"].iloc[1])
    assert workingset.cliffs_table(sweep, {})["cache_level"].tolist() == ["(none near)"]


# ---------------------------------------------------------------- figures and the report

def test_report_renders_the_working_set_section(tmp_path):
    report = build_report([write_run(tmp_path / "run", sweep_run_rows(), ENV)])
    assert (report / "fig-working-set.png").read_bytes().startswith(b"\x89PNG")
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "Working set: bandwidth versus table footprint" in page
    assert "Figure failed" not in page
    markdown = (report / "summary.md").read_text(encoding="utf-8")
    assert "| fp32 sum | L2 | 1 MiB | 512 KiB - 2 MiB | 50.0% |" in markdown
    assert "together touch at most 36 MiB, 128 MiB of the table" in markdown
    assert "replays one batch" not in markdown


def test_report_without_a_sweep_says_so(tmp_path):
    report = build_report([write_run(tmp_path / "run", sweep_run_rows()[-2:], {})])
    markdown = (report / "summary.md").read_text(encoding="utf-8")
    assert "No sls footprint sweep in this run" in markdown
    assert not (report / "fig-working-set.png").exists()


def test_working_set_figure_without_cache_sizes_still_draws():
    sweep = workingset.sweep_rows(sweep_frame())
    figure = plots.working_set_figure(sweep, {}, workingset.series_cliffs(sweep))
    assert canvas.figure_to_png(figure).startswith(b"\x89PNG")
    with pytest.raises(plots.NoData):
        plots.working_set_figure(sweep.iloc[0:0], ENV, {})


def test_locality_figure_renders_and_needs_a_measurement():
    table = pd.DataFrame({"level": ["0", "0.5", "0.9"],
                          "predicted_hit_rate_llc": [0.0, 0.5, 0.9],
                          "steady_hit_rate_llc": [0.0, 0.7, 1.0], "gbps": [5.0, 9.0, 20.0]})
    assert canvas.figure_to_png(plots.locality_figure(table)).startswith(b"\x89PNG")
    with pytest.raises(plots.NoData):
        plots.locality_figure(table.assign(gbps=math.nan))
