"""A GPU run's report: its own roofline and nominal peaks, J/sample beside time, GPU rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.records import ResultRow
from reports import cells, device_roofs, device_runs, glance, headline, roofline_plot, roofs, runs
from reports.build import build_report
from reports.energy import NOT_MEASURED
from reports.roofline import roofline_table
from reports.summary import render_summary
from conftest import run_cli, write_run

GPU = "cuda:0"
GPU_NAME = "NVIDIA H200"
HOST_LLC = 32 << 20  # the host's L3, which must never size the GPU's roofs
GPU_L2 = 60 << 20  # what torch.cuda reports as the H200's L2_cache_size
GIB = 1 << 30
STAMP = "2026-12-04T12:00:00"
# The nominal peaks bench/ops/ceilings.py derives for 132 SMs x 1980 MHz at capability 9.0.
NOMINAL = {"fp32": 66908.2, "bf16": 1070530.6}
HOST_ENV = {"cpu_model": "Host CPU", "l1d_bytes": 48 << 10, "l2_bytes": 1 << 20,
            "l3_bytes": HOST_LLC, "torch_version": "2.11.0+cu130",
            "gpu": {"available": True, "driver": "580.159.04",
                    "gpus": [{"index": 0, "name": GPU_NAME, "memory_total_bytes": 150754820096,
                              "max_sm_clock_mhz": 1980, "max_memory_clock_mhz": 3201}]}}


def probe(op: str, impl: str, params: dict, device: str = GPU, precision: str = "fp32",
          **fields) -> ResultRow:
    """A ceiling probe row shaped as bench/ops/ceilings.py writes it."""
    return ResultRow(op=op, impl=impl, workload="machine", params=json.dumps(params),
                     device=device, device_name=GPU_NAME if device == GPU else "Host CPU",
                     isa="native", threads=1, precision=precision, median_s=1e-3,
                     status="ok", timestamp=STAMP,
                     task_key=f"{op}-{impl}-{device}-{precision}-{json.dumps(params)}", **fields)


def stream(gbps: float, size: int, impl: str = "read", device: str = GPU) -> ResultRow:
    """A membw stream row of one buffer size."""
    return probe("membw", impl, {"bytes": size, "pattern": "stream", "probe": "torch"},
                 device, gbps=gbps)


def gather(gbps: float, row_bytes: int, impl: str = "read") -> ResultRow:
    """A GPU membw gather row: millions of random rows from a buffer beyond the L2."""
    params = {"bytes": 256 << 20, "row_bytes": row_bytes, "rows_per_call": 1 << 21,
              "rotation_blocks": 8, "cache_bytes": GPU_L2,
              "cache_source": "torch.cuda L2_cache_size", "pattern": "random rows",
              "probe": "torch embedding_bag sums of 64 random rows", "bag_rows": 64}
    return probe("membw", impl, params, gbps=gbps)


def gemm(precision: str, gflops: float, size: int = 0, shape: tuple = (),
         device: str = GPU, nominal: bool = True) -> ResultRow:
    """A gemm_peak row (a square, or a model layer m x k x n) with the nominal peak it records."""
    params = ({"size": size} if size else
              {"m": shape[0], "k": shape[1], "n": shape[2], "layer": "model"})
    metrics = {}
    if device == GPU and nominal:
        metrics = {"nominal_peak": {"sm_count": 132, "max_sm_clock_mhz": 1980.0,
                                    "compute_capability": "9.0",
                                    "gflops": NOMINAL[precision],
                                    "kind": "nominal: derived from SMs x clock x per-SM rate, "
                                            "not measured"}}
    return probe("gemm_peak", "matmul", params, device, precision, gflops=gflops,
                 metrics=json.dumps(metrics))


def gpu_probes() -> list[ResultRow]:
    """The GPU's roofs: HBM 4.45 TB/s at 2 GiB, the L2 at 48 MiB (beyond the host's LLC),
    gathers of 64-512 B rows, and a gemm_peak sweep per precision."""
    rows = [stream(5.0, 16 << 10), stream(300.0, 1 << 20), stream(7000.0, 16 << 20),
            stream(8000.0, 48 << 20), stream(4450.0, 2 * GIB), stream(4240.0, 2 * GIB, "copy")]
    rows += [gather(gbps, size) for size, gbps in ((64, 1500.0), (128, 2300.0), (256, 2900.0),
                                                    (512, 3300.0))]
    rows += [gemm("fp32", gflops, size) for size, gflops in
             ((1024, 37e3), (2048, 45e3), (4096, 50e3), (8192, 51e3))]
    rows += [gemm("bf16", gflops, size) for size, gflops in
             ((1024, 107e3), (2048, 400e3), (4096, 770e3), (8192, 790e3))]
    rows.append(gemm("bf16", 60e3, shape=(2048, 512, 256)))
    return rows


def cpu_probes() -> list[ResultRow]:
    """The host CPU's own roofs (never mixed with the GPU's)."""
    return [stream(100.0, 1 << 20, device="cpu"), stream(20.0, 4 * HOST_LLC, device="cpu"),
            gemm("fp32", 1000.0, 1024, device="cpu")]


def sls(device: str, table_bytes: int, rows: int, gbps: float, batch: int = 65536,
        power_w: float = math.nan) -> ResultRow:
    """An sls row of one fp32 dim-64 table, 32 lookups a bag, with its energy where given."""
    lookups = batch * 32
    bytes_moved = lookups * (table_bytes / rows + 8) + batch * 64 * 4
    median = bytes_moved / gbps / 1e9
    params = {"table": 0, "rows": rows, "dim": 64, "pooling": "32", "mode": "sum",
              "table_bytes": table_bytes, "rotation_batches": 16}
    return ResultRow(op="sls", impl="embedding_bag", is_baseline=True, workload="synthetic",
                     params=json.dumps(params), device=device,
                     device_name=GPU_NAME if device == GPU else "Host CPU", isa="native",
                     threads=1, precision="fp32", batch_size=batch, median_s=median,
                     iqr_s=0.02 * median, samples_per_s=batch / median, flops=lookups * 64,
                     bytes_moved=bytes_moved, gbps=gbps, gflops=lookups * 64 / median / 1e9,
                     avg_power_w=power_w, energy_j=power_w * 2.0,
                     joules_per_sample=power_w * median / batch, status="ok", timestamp=STAMP,
                     task_key=f"sls-{device}-{table_bytes}")


def train(device: str, impl: str, median: float, baseline: bool = False,
          power_w: float = math.nan, joules: float | None = None) -> ResultRow:
    """A dlrm_train kaggle row at batch 2048 (GPU figures from gpu-facts.md)."""
    return ResultRow(op="dlrm_train", impl=impl, is_baseline=baseline, workload="kaggle",
                     params=json.dumps({"layout": impl, "optimizer": "SGD"}), device=device,
                     device_name=GPU_NAME if device == GPU else "Host CPU", isa="native",
                     threads=1, precision="fp32", batch_size=2048, median_s=median,
                     iqr_s=0.01 * median, samples_per_s=2048 / median, avg_power_w=power_w,
                     energy_j=power_w * 1.5,
                     joules_per_sample=power_w * median / 2048 if joules is None else joules,
                     metrics=json.dumps({"energy_source": "nvml energy counter over the timed "
                                                          "repetitions"}),
                     status="ok", timestamp=STAMP, task_key=f"train-{device}-{impl}")


BIG_TABLE = 20_000_000 * 256  # 20M x 64 fp32: far beyond any cache
L2_TABLE = 48 << 20  # fits the GPU's 60 MiB L2, not the host's 32 MiB LLC


def gpu_op_rows() -> list[ResultRow]:
    """sls on the GPU (one table beyond every cache, one in its L2) and dlrm_train with NVML
    energy, one row (fused_sgd) without an energy figure."""
    return [sls(GPU, BIG_TABLE, 20_000_000, 1730.0, power_w=450.0),
            sls(GPU, L2_TABLE, L2_TABLE // 256, 6000.0, power_w=300.0),
            train(GPU, "batched", 3.93e-3, baseline=True, power_w=350.0),
            train(GPU, "fused_sgd", 4.14e-3),
            train(GPU, "per_table", 5.17e-3, power_w=330.0, joules=0.0)]


def cpu_op_rows() -> list[ResultRow]:
    """The host's sls and dlrm_train rows (no RAPL here: no energy figures)."""
    return [sls("cpu", BIG_TABLE, 20_000_000, 6.0, batch=2048),
            train("cpu", "batched", 0.08, baseline=True)]


def sweep_run(directory: Path, rows: list[ResultRow], env: dict) -> Path:
    """A run directory of a sweep over the host and the GPU."""
    return write_run(directory, rows, env, {"device": ["cpu", GPU]})


def mixed_frame():
    """One run of both devices (run_bench.py --device cpu,cuda)."""
    return runs.rows_to_frame(cpu_probes() + gpu_probes() + cpu_op_rows() + gpu_op_rows())


def markdown_line(markdown: str, *cells_text: str) -> str:
    """The one markdown table line starting with these cells."""
    prefix = "| " + " | ".join(cells_text) + " |"
    matches = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(matches) == 1, (prefix, matches)
    return matches[0]


# ---------------------------------------------------------------- the GPU's roofs

def test_gpu_roofs_come_from_the_gpu_rows_and_its_l2_not_the_host_llc():
    ceilings = roofs.group_ceilings(mixed_frame(), HOST_ENV)
    gpu, cpu = ceilings[(GPU, "native")], ceilings[("cpu", "native")]
    assert gpu.cache_bytes == GPU_L2 and cpu.cache_bytes == HOST_LLC
    assert "torch.cuda L2_cache_size" in gpu.cache_source
    assert (gpu.memory_gbps, gpu.memory_buffer_bytes) == (4450.0, 2 * GIB)
    # The 48 MiB buffer fits the GPU's L2 (not the host's 32 MiB LLC): it is the L2 roof.
    assert gpu.cache_gbps == 8000.0
    assert gpu.gather_gbps == {64: 1500.0, 128: 2300.0, 256: 2900.0, 512: 3300.0}
    assert gpu.gather_rows_per_call[256] == 1 << 21  # shown: rows in flight make it a roof
    assert gpu.compute_gflops == {"fp32": 51e3, "bf16": 790e3}  # the plateau of the sweep
    assert "square 8192" in gpu.compute_detail["bf16"]
    assert (gpu.stream_roof, gpu.cache_roof) == ("HBM stream", "L2")
    # The CPU's roofs are its own rows only, and keep the CPU's names.
    assert (cpu.memory_gbps, cpu.cache_gbps, cpu.compute_gflops) == (20.0, 100.0,
                                                                      {"fp32": 1000.0})
    assert (cpu.stream_roof, cpu.cache_roof) == (roofs.DRAM_ROOF, roofs.IN_CACHE_ROOF)
    assert cpu.nominal_gflops == {} and not cpu.gather_gbps


def test_the_env_l2_size_wins_and_an_unknown_l2_never_borrows_the_host_llc():
    env = json.loads(json.dumps(HOST_ENV))
    env["gpu"]["gpus"][0]["l2_cache_bytes"] = 40 << 20
    recorded = roofs.group_ceilings(mixed_frame(), env)[(GPU, "native")]
    assert (recorded.cache_bytes, recorded.cache_source) == (40 << 20, "env.json gpu facts")
    assert recorded.cache_gbps == 7000.0  # the 48 MiB buffer no longer fits
    # No gather probe and no env entry: the L2 is unknown, and the host's LLC is not used.
    streams = [row for row in gpu_probes() if "row_bytes" not in row.params]
    frame = runs.rows_to_frame(streams + [sls(GPU, L2_TABLE, L2_TABLE // 256, 6000.0)])
    unknown = roofs.group_ceilings(frame, HOST_ENV)[(GPU, "native")]
    assert math.isnan(unknown.cache_bytes)
    assert "records this GPU's L2 size" in unknown.cache_source
    placed = roofline_table(frame, {(GPU, "native"): unknown}).iloc[0]
    assert placed["roof"] == "HBM stream (working set or cache size unknown)"


def test_the_nominal_peaks_are_shown_beside_the_measured_ones_labelled_nominal():
    ceilings = roofs.group_ceilings(mixed_frame(), HOST_ENV)
    assert ceilings[(GPU, "native")].nominal_gflops == NOMINAL
    table = roofs.ceilings_table(ceilings)
    gpu = table[table["device"] == GPU].set_index("roof")
    assert gpu.loc["compute bf16", "value"] == 790e3  # the measured roof stays the roof
    assert gpu.loc["nominal bf16", "value"] == NOMINAL["bf16"]
    detail = gpu.loc["nominal bf16", "detail"]
    assert detail.startswith("NOMINAL, not measured: 132 SMs x 1980 MHz max SM clock")
    assert f"{790e3 / NOMINAL['bf16'] * 100:.1f}% of it" in detail
    assert set(gpu.index) >= {"HBM stream", "L2", "random gather 256 B rows", "nominal fp32"}
    assert gpu.loc["random gather 256 B rows", "detail"].startswith(
        "random 256 B rows, 2,097,152 a call, from a 256 MiB buffer")
    assert "nominal fp32" not in set(table[table["device"] == "cpu"]["roof"])
    # Nominal peaks never become the roof a row is judged against.
    assert ceilings[(GPU, "native")].peak_gflops("bf16") == (790e3, "bf16")


def test_a_device_without_a_nominal_rate_says_why():
    rows = [gemm("bf16", 5e3, 1024), gemm("bf16", 6e3, 2048)]
    for row in rows:
        row.metrics = json.dumps({"nominal_peak": {
            "sm_count": 80, "max_sm_clock_mhz": None, "compute_capability": "7.0",
            "gflops": None, "why_none": "no NVML clock, or no per-SM rate known"}})
    table = roofs.ceilings_table(roofs.group_ceilings(runs.rows_to_frame(rows), {}))
    notes = table[table["roof"] == "note"]["detail"].tolist()
    assert any(note.startswith("nominal bf16: no nominal peak: no NVML clock") for note in notes)
    assert not any(roof.startswith("nominal") for roof in table["roof"])


def test_a_sweep_still_rising_at_its_largest_square_is_flagged():
    rows = [gemm("bf16", gflops, size) for size, gflops in ((2048, 400e3), (4096, 600e3),
                                                              (8192, 790e3))]
    notes = roofs.group_ceilings(runs.rows_to_frame(rows), {})[(GPU, "native")].notes
    assert notes == ["bf16 compute peak still rising at the largest square (8192: 600,000 -> "
                     "790,000 GFLOP/s): the plateau may lie beyond the sweep"]
    plateaued = roofs.group_ceilings(mixed_frame(), HOST_ENV)[(GPU, "native")]
    assert not [note for note in plateaued.notes if "still rising" in note]


def test_cuda_op_rows_are_placed_against_the_gpu_roofs():
    frame = mixed_frame()
    placed = roofline_table(frame, roofs.group_ceilings(frame, HOST_ENV))
    by_key = placed[placed["op"] == "sls"].set_index(["device", "working_set"])
    big = by_key.loc[(GPU, "4.768 GiB")]
    assert (big["roof"], big["roof_gbps"]) == ("random gather 256 B rows", 2900.0)
    assert big["efficiency"] == pytest.approx(1730.0 / 2900.0)
    assert big["ridge"] == pytest.approx(51e3 / 2900.0)
    in_l2 = by_key.loc[(GPU, "48 MiB")]
    assert (in_l2["roof"], in_l2["roof_gbps"]) == ("L2", 8000.0)
    assert in_l2["efficiency"] == pytest.approx(6000.0 / 8000.0) and in_l2["note"] == ""
    host = by_key.loc["cpu"].iloc[0]
    assert host["roof"].startswith(roofs.DRAM_ROOF) and host["roof_gbps"] == 20.0


def test_the_gpu_roofline_draws_its_own_roofs_and_the_nominal_peaks():
    frame = mixed_frame()
    ceilings = roofs.group_ceilings(frame, HOST_ENV)
    points = roofline_table(frame, ceilings)
    figure = roofline_plot.roofline_figure(ceilings[(GPU, "native")],
                                           points[points["device"] == GPU], {})
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert "HBM stream roof 4450 GB/s" in labels and "L2 roof 8000 GB/s" in labels
    assert "random gather 256 B roof 2900 GB/s" in labels
    assert "bf16 peak 7.9e+05 GFLOP/s" in labels
    assert "bf16 nominal 1.071e+06 GFLOP/s" in labels
    assert not [label for label in labels if "DRAM" in label or label.startswith("fp32 peak 1000")]


# ---------------------------------------------------------------- energy beside time

def test_energy_cells_say_not_measured_never_zero_or_blank():
    assert cells.format_cell(math.nan, "joules_per_sample") == NOT_MEASURED
    assert cells.format_cell(0.0, "joules_per_sample") == NOT_MEASURED
    assert cells.format_cell(math.nan, "avg_power_w") == NOT_MEASURED
    assert cells.format_cell(2.3e-4, "joules_per_sample") == "0.00023"
    assert cells.format_cell(math.nan, "median_s") == ""  # other columns keep their blank


def test_headline_has_the_gpu_rows_beside_the_cpu_rows_with_energy():
    table = headline.headline_table(mixed_frame(), {})
    train = table[table["op"] == "dlrm_train"]
    # Same workload, op, variant and precision: the GPU and CPU rows are one block.
    assert list(zip(train["device"], train["impl"])) == [
        (GPU, "batched"), (GPU, "fused_sgd"), (GPU, "per_table"), ("cpu", "batched")]
    by_key = train.set_index(["device", "impl"])
    assert by_key.loc[(GPU, "batched"), "joules_per_sample"] == pytest.approx(
        350.0 * 3.93e-3 / 2048)
    assert by_key.loc[(GPU, "batched"), "avg_power_w"] == 350.0
    assert math.isnan(by_key.loc[(GPU, "fused_sgd"), "joules_per_sample"])
    assert math.isnan(by_key.loc[(GPU, "per_table"), "joules_per_sample"])  # 0 J is no figure
    assert math.isnan(by_key.loc[("cpu", "batched"), "joules_per_sample"])
    # Each device against its own baseline, never the other device's.
    assert by_key.loc[(GPU, "fused_sgd"), "vs_baseline"] == pytest.approx(3.93 / 4.14)
    assert by_key.loc[("cpu", "batched"), "vs_baseline"] == pytest.approx(1.0)
    models = glance.best_model_table(mixed_frame(), {})
    assert sorted(models["device"]) == ["cpu", GPU]  # the GPU's best never hides the CPU's


def test_report_of_a_fabricated_gpu_run_end_to_end(tmp_path):
    run = sweep_run(tmp_path / "gpu-run", cpu_probes() + gpu_probes() + cpu_op_rows()
                    + gpu_op_rows(), HOST_ENV)
    result = run_cli("report", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    report = run / "report"
    assert result.stdout.strip() == f"report: {report / 'index.html'}"
    assert {"fig-roofline-cpu-native.png", "fig-roofline-cuda-0-native.png"} <= {
        path.name for path in report.iterdir()}
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "Figure failed" not in page
    assert "Machine ceilings, device cuda:0" in page and "Machine ceilings, device cpu" in page
    markdown = (report / "summary.md").read_text(encoding="utf-8")
    assert f"Devices: cpu (Host CPU), {GPU} ({GPU_NAME})" in markdown
    assert "NOMINAL, not measured" in markdown and "| nominal bf16 |" in markdown
    assert "(torch.cuda L2_cache_size, as the membw gather probes recorded it)" in markdown
    assert "60 MiB (torch.cuda L2_cache_size" in markdown  # the GPU roofline note
    joules = f"{350.0 * 3.93e-3 / 2048:.4g}"
    gpu_line = markdown_line(markdown, "kaggle", "dlrm_train", "{}", "fp32", GPU, "batched")
    assert f"| {joules} | 350 |" in gpu_line
    for impl in ("fused_sgd", "per_table"):
        line = markdown_line(markdown, "kaggle", "dlrm_train", "{}", "fp32", GPU, impl)
        assert f"| {NOT_MEASURED} | " in line
    cpu_line = markdown_line(markdown, "kaggle", "dlrm_train", "{}", "fp32", "cpu", "batched")
    assert f"| {NOT_MEASURED} | {NOT_MEASURED} |" in cpu_line
    # The summary table (best per op and device) carries J/sample beside samples/s too.
    summary = markdown_line(markdown, "sls", "synthetic", GPU, "embedding_bag")
    assert "samples/s | " in summary and NOT_MEASURED not in summary


def test_a_cpu_run_and_a_gpu_run_read_side_by_side(tmp_path):
    env = json.loads(json.dumps(HOST_ENV))
    cpu_run = sweep_run(tmp_path / "cpu", cpu_probes() + cpu_op_rows(),
                        {**env, "l3_bytes": HOST_LLC})
    gpu_env = {**env, "cpu_model": "GPU host CPU", "l3_bytes": 256 << 20}
    gpu_env["gpu"]["gpus"][0]["l2_cache_bytes"] = GPU_L2
    gpu_run = sweep_run(tmp_path / "gpu", gpu_probes() + gpu_op_rows(), gpu_env)
    loaded = [runs.load_run(cpu_run), runs.load_run(gpu_run)]
    analysis = device_runs.analysed_rows(loaded)
    assert sorted(set(analysis.frame["device"])) == ["cpu", GPU]
    assert analysis.frame["row_id"].is_unique
    assert analysis.added == [f"{GPU} from run gpu"]
    ceilings = roofs.group_ceilings(analysis.frame, loaded[0].env, analysis.device_envs)
    assert ceilings[(GPU, "native")].cache_source == "env.json gpu facts"
    assert ceilings[("cpu", "native")].cache_bytes == HOST_LLC  # the CPU run's own host
    report = build_report([cpu_run, gpu_run], tmp_path / "report")
    markdown = (report / "summary.md").read_text(encoding="utf-8")
    assert markdown_line(markdown, "kaggle", "dlrm_train", "{}", "fp32", GPU, "batched")
    assert markdown_line(markdown, "kaggle", "dlrm_train", "{}", "fp32", "cpu", "batched")
    assert f"Rows of {GPU} from run gpu join this analysis" in markdown
    assert (report / "fig-roofline-cuda-0-native.png").exists()


def test_a_run_of_one_cpu_gets_no_device_line():
    frame = runs.rows_to_frame(cpu_probes() + cpu_op_rows())
    assert device_runs.device_line(frame, []) == ""
    assert device_roofs.is_gpu("cuda") and device_roofs.is_gpu(GPU)
    assert not device_roofs.is_gpu("cpu") and device_roofs.gpu_index("cuda:3") == 3


def test_the_sweep_summary_names_devices_and_prints_j_per_sample_where_measured():
    text = render_summary(gpu_op_rows() + cpu_op_rows())
    header, *lines = text.splitlines()
    assert "device" in header and "J/sample" in header
    gpu_batched = [line for line in lines if "batched*" in line and GPU in line]
    assert len(gpu_batched) == 1 and f"{350.0 * 3.93e-3 / 2048:.4g}" in gpu_batched[0]
    assert NOT_MEASURED in [line for line in lines if "fused_sgd" in line][0]
    # A run without any energy figure, on one device, prints as before: neither column.
    cpu_only = render_summary(cpu_op_rows()).splitlines()[0]
    assert "J/sample" not in cpu_only and "device" not in cpu_only
