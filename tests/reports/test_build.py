"""Tests of the report builder: tables, figures, self-contained HTML and markdown."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.records import STATUS_ERROR, STATUS_SKIPPED, ResultRow, ResultsWriter, SchemaError
from reports import comparison, headline, plots, roofs, runs, tables
from reports.roofline import (ABOVE_ROOF_NOTE, WITHIN_SPREAD_NOTE, classification_table,
                              roofline_table)
from reports.build import build_report
from conftest import FIXTURES_DIR, REPO_ROOT, write_run

FIXTURES = FIXTURES_DIR / "reports"
REPOSITORY = REPO_ROOT
CHROMIUM = Path("/usr/bin/chromium")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_SOURCE = re.compile(r"<img\b[^>]*?\bsrc=\"([^\"]*)\"", re.IGNORECASE)

# The generated "realistic" run: a CPU swept over ISA levels and threads, plus a GPU.
ISA_SPEED = {"avx2": 1.0, "avx512": 1.5, "native": 1.7}
PRECISION_SPEED = {"fp32": 1.0, "fp16": 1.6, "bf16": 1.8, "int8": 2.5, "int4": 3.2}
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}
PRECISION_ERROR = {"fp32": 1e-7, "fp16": 5e-4, "bf16": 2e-3, "int8": 6e-3, "int4": 2e-2}
PRECISION_AUC = {"fp32": 0.800, "bf16": 0.7995, "int8": 0.798}
OP_PRECISIONS = {
    "sls": ("fp32", "fp16", "int8", "int4"),
    "fc": ("fp32", "bf16", "int8"),
    "dlrm_infer": ("fp32", "bf16", "int8"),
    "dlrm_train": ("fp32", "bf16"),
}
# fp32 seconds at avx2, one thread; flops and fp32 bytes per call by formula.
OP_COST = {
    "sls": (4e-3, 2.0e6, 8.0e6),
    "fc": (8e-2, 4.0e9, 8.0e7),
    "dlrm_infer": (2e-1, 6.0e9, 4.0e8),
    "dlrm_train": (8e-1, 1.8e10, 1.2e9),
}
BATCH_SIZE = 512


def timed_row(op: str, precision: str, isa: str, threads: int, device: str = "cpu",
              **fields) -> ResultRow:
    """A measured row whose time follows the precision, ISA and thread speed-ups."""
    base_seconds, flops, fp32_bytes = OP_COST[op]
    median = base_seconds / (PRECISION_SPEED[precision] * ISA_SPEED[isa] * threads ** 0.9)
    if device != "cpu":
        median /= 20
    bytes_moved = fp32_bytes * PRECISION_BYTES[precision] / 4
    samples = [median * (1 + 0.01 * step) for step in (-2, -1, 0, 0, 1, 3, 6)]
    row = ResultRow(
        run_id="realistic", op=op, impl="torch", is_baseline=precision == "fp32",
        code_version="v1", workload=f"{op}-medium", params='{"tables": 8, "dim": 64}',
        device=device, isa=isa, isa_effective=isa, threads=threads, precision=precision,
        batch_size=BATCH_SIZE, n_samples=len(samples), median_s=median,
        p90_s=median * 1.04, p99_s=median * 1.06, iqr_s=median * 0.02, min_s=median * 0.98,
        samples_per_s=BATCH_SIZE / median, flops=flops, bytes_moved=bytes_moved,
        gbps=bytes_moved / median / 1e9, gflops=flops / median / 1e9,
        rel_error=PRECISION_ERROR[precision], samples_s=str(samples),
        timestamp="2025-02-01T00:00:00",
    )
    if op == "dlrm_infer":
        row.auc = PRECISION_AUC[precision]
    for name, value in fields.items():
        setattr(row, name, value)
    return row


def ceiling_rows(device: str, isa: str, scale: float, with_membw: bool) -> list[ResultRow]:
    """membw and gemm_peak probe rows of one (device, isa) group."""
    rows = []
    if with_membw:
        for size, read_gbps in ((32 << 10, 300.0), (1 << 20, 200.0), (1 << 30, 40.0)):
            for impl, factor in (("read", 1.0), ("copy", 0.75)):
                rows.append(ResultRow(
                    op="membw", impl=impl, workload="probe", params=f'{{"bytes": {size}}}',
                    device=device, isa=isa, threads=4, precision="fp32", median_s=1e-3,
                    gbps=read_gbps * factor * scale, timestamp="2025-02-01T00:00:00"))
    for precision, peak in (("fp32", 400.0), ("bf16", 1600.0), ("int8", 3200.0)):
        rows.append(ResultRow(
            op="gemm_peak", impl="matmul", workload="probe", params='{"n": 4096}',
            device=device, isa=isa, threads=4, precision=precision, median_s=1e-2,
            gflops=peak * ISA_SPEED.get(isa, 1.0) * scale, timestamp="2025-02-01T00:00:00"))
    return rows


def realistic_rows() -> list[ResultRow]:
    """A sweep over ops, precisions, ISA levels and threads with ceilings and failures."""
    rows = []
    for isa in ISA_SPEED:
        rows += ceiling_rows("cpu", isa, 1.0, with_membw=isa == "native")
    rows += ceiling_rows("cuda:0", "native", 10.0, with_membw=True)
    for op, precisions in OP_PRECISIONS.items():
        for precision in precisions:
            if op == "sls" and precision == "int4":
                rows.append(ResultRow(op=op, impl="torch", workload=f"{op}-medium",
                                      device="cpu", isa="avx2", threads=4, precision=precision,
                                      status=STATUS_SKIPPED, error="int4 needs avx512",
                                      timestamp="2025-02-01T00:00:00"))
            for isa in ISA_SPEED:
                if not (op == "sls" and precision == "int4" and isa == "avx2"):
                    rows.append(timed_row(op, precision, isa, 4))
            rows += [timed_row(op, precision, "native", threads) for threads in (1, 2)]
    rows += [timed_row("sls", precision, "native", 1, device="cuda:0")
             for precision in ("fp32", "fp16")]
    rows.append(ResultRow(op="dlrm_train", impl="ipex", workload="dlrm_train-medium",
                          device="cpu", isa="native", threads=4, precision="bf16",
                          status=STATUS_ERROR, error="RuntimeError: ipex is not installed",
                          timestamp="2025-02-01T00:00:00"))
    return rows


ALL_OPS = {"ops": "all"}  # the args.json of a run of every op


def copy_fixture(name: str, destination: Path) -> Path:
    """A writable copy of a hand-written fixture run."""
    return Path(shutil.copytree(FIXTURES / name, destination / name))


@pytest.fixture(scope="module")
def handmade_report(tmp_path_factory) -> Path:
    """Report of the hand-written run with ceilings, skipped and error rows."""
    base = tmp_path_factory.mktemp("handmade")
    return build_report([copy_fixture("handmade", base)])


@pytest.fixture(scope="module")
def realistic_run(tmp_path_factory) -> Path:
    """The generated realistic run directory."""
    env = {"cpu_model": "Test CPU", "l3_bytes": 33554432, "fingerprint": "realistic"}
    return write_run(tmp_path_factory.mktemp("realistic") / "run", realistic_rows(), env,
                     ALL_OPS)


@pytest.fixture(scope="module")
def realistic_report(realistic_run, tmp_path_factory) -> Path:
    """Report of the realistic run."""
    return build_report([realistic_run], tmp_path_factory.mktemp("realistic_report"))


@pytest.fixture(scope="module")
def comparison_report(tmp_path_factory) -> Path:
    """Report comparing the two hand-written comparison runs."""
    base = tmp_path_factory.mktemp("comparison")
    return build_report([copy_fixture("compare_a", base), copy_fixture("compare_b", base)])


def assert_self_contained(page: str) -> int:
    """No external reference of any kind; every image an inline PNG. Returns the image count."""
    lowered = page.lower()
    for forbidden in ("http://", "https://", "<script src", "<link", "@import", "url("):
        assert forbidden not in lowered, forbidden
    sources = IMAGE_SOURCE.findall(page)
    assert len(sources) == lowered.count("<img")
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    return len(sources)


def markdown_row(markdown: str, *cells: str) -> str:
    """The one markdown table line that starts with these cells."""
    prefix = "| " + " | ".join(cells) + " |"
    matches = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(matches) == 1, (prefix, matches)
    return matches[0]


def test_handmade_report_writes_every_output(handmade_report):
    names = {path.name for path in handmade_report.iterdir()}
    assert handmade_report.name == "report"
    assert {"index.html", "summary.md", "fig-roofline-cpu-native.png", "fig-throughput.png",
            "fig-latency.png", "fig-precision.png"} <= names
    assert not [name for name in names if name.endswith(".tmp")]
    for name in names:
        if name.endswith(".png"):
            assert (handmade_report / name).read_bytes().startswith(PNG_SIGNATURE)
    page = (handmade_report / "index.html").read_text(encoding="utf-8")
    assert assert_self_contained(page) == 4
    assert "more than one ISA level" in page and "more than one thread count" in page


def test_handmade_ceilings_pick_largest_buffer_and_cache_roof():
    run = runs.load_run(FIXTURES / "handmade")
    ceilings = roofs.group_ceilings(run.frame, run.env)[("cpu", "native")]
    assert ceilings.memory_gbps == 20.0  # best of copy/read at the 256 MiB buffer
    assert ceilings.memory_buffer_bytes == 268435456
    assert ceilings.cache_gbps == 100.0  # 1 MiB fits the 8 MiB L3
    assert ceilings.compute_gflops == {"fp32": 200.0, "int8": 800.0}
    assert ceilings.ridge_point("fp32") == pytest.approx(10.0)
    assert ceilings.peak_gflops("bf16") == (800.0, "int8")  # no bf16 peak: highest one


def test_handmade_efficiency_and_bound():
    run = runs.load_run(FIXTURES / "handmade")
    roofline = roofline_table(run.frame, roofs.group_ceilings(run.frame, run.env))
    by_config = roofline.set_index(["op", "precision"])
    # sls fp32: its 25.6 MB table is beyond the 8 MiB L3 but below the 256 MiB probe buffer:
    # partly cached, bounded by the 100 GB/s in-cache roof (25 GFLOP/s at 0.25 FLOP/B);
    # sls int8's 7.2 MB table fits the L3: the same in-cache roof.
    expected = {("sls", "fp32"): (0.25, 25.0, 0.04, "memory"),
                ("sls", "int8"): (1.0, 100.0, 0.02, "memory"),
                ("fc", "fp32"): (20.0, 200.0, 0.5, "compute"),
                ("fc", "bf16"): (50.0, 800.0, 0.25, "compute"),
                ("fc", "int8"): (80.0, 800.0, 0.5, "compute")}
    for key, (intensity, attainable, efficiency, bound) in expected.items():
        row = by_config.loc[key]
        assert row["intensity"] == pytest.approx(intensity)
        assert row["attainable_gflops"] == pytest.approx(attainable)
        assert row["efficiency"] == pytest.approx(efficiency)
        assert row["bound"] == bound
    assert by_config.loc[("sls", "fp32"), "roof"] == roofs.PARTLY_CACHED_ROOF
    assert by_config.loc[("sls", "int8"), "roof"] == roofs.IN_CACHE_ROOF
    interaction = by_config.loc[("interaction", "fp32")]
    assert math.isnan(interaction["intensity"])  # no flops by formula: bandwidth only
    # The 8 MB it moves per call is touched again by the next call and fits the 8 MiB L3.
    assert interaction["roof"] == roofs.IN_CACHE_ROOF
    assert interaction["efficiency"] == pytest.approx(8.0 / 100.0)
    assert interaction["bound"] == "memory"
    classes = classification_table(roofline, {}).set_index(["op", "precision"])["bound"]
    assert classes.to_dict() == {("sls", "fp32"): "memory", ("sls", "int8"): "memory",
                                 ("interaction", "fp32"): "memory", ("fc", "fp32"): "compute",
                                 ("fc", "bf16"): "compute", ("fc", "int8"): "compute"}


def test_handmade_summary_has_best_rows(handmade_report):
    run = runs.load_run(FIXTURES / "handmade")
    roofline = roofline_table(run.frame, roofs.group_ceilings(run.frame, run.env))
    summary = tables.summary_table(run.frame, roofline, run.op_order).set_index("op")
    assert summary.loc["sls", ["impl", "precision"]].tolist() == ["fbgemm", "int8"]
    assert summary.loc["sls", "throughput"] == pytest.approx(2e6)
    assert summary.loc["sls", "efficiency"] == pytest.approx(0.02)
    assert summary.loc["sls", "roof"] == roofs.IN_CACHE_ROOF
    assert summary.loc["sls", "noise"] == pytest.approx(0.1)
    assert summary.loc["fc", ["impl", "precision", "unit"]].tolist() == [
        "fbgemm", "int8", "samples/s"]
    assert summary.loc["fc", "noise"] == pytest.approx(0.04)
    markdown = (handmade_report / "summary.md").read_text(encoding="utf-8")
    line = markdown_row(markdown, "sls", "small", "cpu", "fbgemm", "int8")
    assert "2,000,000 | samples/s" in line and "2.0% | in-cache" in line
    assert "50.0%" in markdown_row(markdown, "fc", "mlp", "cpu", "fbgemm", "int8")
    assert "compute" in markdown_row(markdown, "cpu", "native", "fc", "fp32",
                                     roofs.PARTLY_CACHED_ROOF, "20")


def test_skipped_and_error_rows_are_listed_with_reasons(handmade_report):
    run = runs.load_run(FIXTURES / "handmade")
    problems = tables.problem_rows_table(run.frame)
    reasons = dict(zip(problems["status"], problems["reason"]))
    assert reasons["error"].startswith("RuntimeError: out of memory")
    assert reasons["skipped"].startswith("int4 kernels need fbgemm_gpu")
    page = (handmade_report / "index.html").read_text(encoding="utf-8")
    assert "RuntimeError: out of memory" in page
    assert "example.org/int4" in page  # the quoted URL is shown but defanged
    markdown = (handmade_report / "summary.md").read_text(encoding="utf-8")
    assert markdown_row(markdown, "skipped", "fc", "fbgemm", "int4")


def test_single_row_run_skips_what_it_cannot_draw(tmp_path):
    report = build_report([copy_fixture("single", tmp_path)])
    assert report == tmp_path / "single" / "report"
    names = {path.name for path in report.iterdir()}
    assert {"fig-throughput.png", "fig-latency.png", "index.html", "summary.md"} <= names
    assert not {"fig-isa-speedup.png", "fig-thread-scaling.png", "fig-precision.png"} & names
    page = (report / "index.html").read_text(encoding="utf-8")
    assert assert_self_contained(page) == 2
    assert "No machine-ceiling rows" in page
    assert "Only one run given" in page
    assert "No skipped or failed rows" in page
    assert markdown_row((report / "summary.md").read_text(encoding="utf-8"), "fc", "mlp")


def test_comparison_matches_rows_across_runs(comparison_report, tmp_path):
    first = runs.load_run(FIXTURES / "compare_a")
    second = runs.load_run(FIXTURES / "compare_b")
    matched, only_first, only_second = comparison.compare_runs(first, second, {})
    by_op = matched.set_index("op")
    # Matched by task key, so the params' key order does not matter; the checker's verdicts.
    assert by_op["ratio"].to_dict() == pytest.approx({"sls": 2.0, "fc": 0.5})
    assert by_op["verdict"].to_dict() == {"sls": "REGRESSED", "fc": "IMPROVED"}
    assert (only_first, only_second) == (1, 1)
    assert by_op["code_changed"].to_dict() == {"sls": False, "fc": True}
    summary = comparison.comparison_summary(matched, {}).set_index("op")
    assert summary.loc["sls", "regressed"] == 1 and summary.loc["fc", "improved"] == 1
    names = {path.name for path in comparison_report.iterdir()}
    assert "fig-compare-compare-b.png" in names
    page = (comparison_report / "index.html").read_text(encoding="utf-8")
    assert_self_contained(page)
    assert "different host fingerprints" in page and "code_changed" in page
    markdown = (comparison_report / "summary.md").read_text(encoding="utf-8")
    assert "| 2 |" in markdown_row(markdown, "sls", "torch", "small")


def test_realistic_report_draws_every_figure(realistic_report):
    names = {path.name for path in realistic_report.iterdir()}
    expected = {"fig-roofline-cpu-avx2.png", "fig-roofline-cpu-avx512.png",
                "fig-roofline-cpu-native.png", "fig-roofline-cuda-0-native.png",
                "fig-throughput.png", "fig-isa-speedup.png", "fig-latency.png",
                "fig-thread-scaling.png", "fig-precision.png"}
    assert expected <= names
    page = (realistic_report / "index.html").read_text(encoding="utf-8")
    assert assert_self_contained(page) == len(expected)
    assert "Figure skipped" not in page and "Figure failed" not in page
    assert "no probes at these ISA levels: their rows use the membw of isa native" in page


def test_realistic_tables(realistic_run):
    run = runs.load_run(realistic_run)
    ceilings = roofs.group_ceilings(run.frame, run.env)
    assert ceilings[("cpu", "avx2")].memory_gbps == 40.0  # borrowed from isa native
    assert ceilings[("cpu", "native")].cache_gbps == 300.0
    roofline = roofline_table(run.frame, ceilings)
    bounds = classification_table(roofline, {}).set_index(["device", "isa", "op",
                                                              "precision"])["bound"]
    assert bounds[("cpu", "native", "sls", "fp32")] == "memory"
    assert bounds[("cpu", "native", "fc", "fp32")] == "compute"
    summary = tables.summary_table(run.frame, roofline, run.op_order).set_index(["op", "device"])
    best = summary.loc[("sls", "cpu")]
    assert (best["precision"], best["isa"], best["threads"]) == ("int4", "native", 4)
    tradeoffs = tables.precision_tradeoffs(run.frame, run.op_order)
    infer = tradeoffs[(tradeoffs["op"] == "dlrm_infer") & (tradeoffs["isa"] == "native")
                      & (tradeoffs["threads"] == 4)].set_index("precision")
    assert infer.loc["int8", "speedup_vs_fp32"] == pytest.approx(2.5)
    assert infer.loc["int8", "auc_delta"] == pytest.approx(-0.002)


def test_isa_speedup_is_relative_to_lowest_level(realistic_run):
    rows = runs.load_run(realistic_run).frame
    fc = rows[(rows["op"] == "fc") & (rows["threads"] == 4) & (rows["device"] == "cpu")]
    speedups = plots.isa_speedups(plots.add_series_columns(fc))
    fp32 = speedups[speedups["precision"] == "fp32"].set_index("isa")["speedup"]
    assert fp32.to_dict() == pytest.approx({"avx2": 1.0, "avx512": 1.5, "native": 1.7})


def test_a_broken_figure_becomes_a_note(tmp_path, monkeypatch):
    def broken(frame, op_order):
        raise RuntimeError("drawing exploded")

    monkeypatch.setattr(plots, "latency_figure", broken)
    report = build_report([copy_fixture("single", tmp_path)])
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "Figure failed (Per-sample time distribution per op" in page
    assert "RuntimeError: drawing exploded" in page
    assert not (report / "fig-latency.png").exists()


def test_rebuild_removes_stale_figures(realistic_report, tmp_path):
    out = Path(shutil.copytree(realistic_report, tmp_path / "out"))
    assert (out / "fig-isa-speedup.png").exists()
    build_report([copy_fixture("single", tmp_path)], out)
    assert not (out / "fig-isa-speedup.png").exists()
    assert (out / "fig-throughput.png").exists()
    assert not list(out.glob(".*.tmp"))


def test_run_without_rows_gives_notes_not_a_crash(tmp_path):
    report = build_report([write_run(tmp_path / "empty", [], args=ALL_OPS)])
    assert sorted(path.name for path in report.iterdir()) == ["index.html", "summary.md"]
    page = (report / "index.html").read_text(encoding="utf-8")
    assert page.count("Figure skipped") == 5
    assert assert_self_contained(page) == 0


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError):
        build_report([])
    with pytest.raises(SchemaError):
        build_report([tmp_path])


def test_no_reports_module_imports_torch():
    # Each module in a fresh interpreter: one that imports torch (directly or through a bench
    # module) leaves it in sys.modules. reports.check is run as `run_bench.py check`.
    modules = sorted(f"reports.{path.stem}" for path in (REPOSITORY / "reports").glob("*.py")
                     if path.stem != "__init__")
    assert {"reports.build", "reports.check", "reports.merge", "reports.tables",
            "reports.runs", "reports.roofs"} <= set(modules)
    probe = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
             "sys.exit(3 if 'torch' in sys.modules else 0)")
    for module in modules:
        result = subprocess.run([sys.executable, "-c", probe, module], cwd=REPOSITORY,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (module, result.returncode, result.stderr[-500:])


def test_torch_import_check_can_fail(tmp_path):
    # The planted fault: a module that imports bench.run.timing (which imports torch) is caught.
    (tmp_path / "planted.py").write_text("import bench.run.timing\n", encoding="utf-8")
    probe = ("import sys; sys.path[:0] = [sys.argv[2], sys.argv[3]]; import planted; "
             "sys.exit(3 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", probe, "planted", str(tmp_path),
                             str(REPOSITORY)], cwd=REPOSITORY, capture_output=True, timeout=120)
    assert result.returncode == 3


CHECKER = """<script>
window.reportErrors = [];
window.addEventListener('error', function (event) {
  window.reportErrors.push(String(event.message || (event.target && event.target.tagName)));
}, true);
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (image) {
    return !image.complete || image.naturalWidth === 0;
  });
  var root = document.documentElement;
  root.setAttribute('data-images', images.length);
  root.setAttribute('data-broken', broken.length);
  root.setAttribute('data-errors', window.reportErrors.length);
});
</script>"""


def test_report_renders_in_headless_chromium(realistic_report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    page = (realistic_report / "index.html").read_text(encoding="utf-8")
    # The report itself has no script: the test adds one that marks broken images and errors.
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + CHECKER, 1), encoding="utf-8")
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
               "--enable-logging=stderr", "--v=0", "--run-all-compositor-stages-before-draw",
               "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    images = page.lower().count("<img")
    assert f'data-images="{images}"' in dom, dom[:500]
    assert 'data-broken="0"' in dom and 'data-errors="0"' in dom
    assert "<h2>Summary</h2>" in dom and "<h2>Thread scaling</h2>" in dom
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console


# ---------------------------------------------------------------- roof choice by working set

LLC = 32 << 20
ROOF_ENV = {"l1d_bytes": 48 << 10, "l2_bytes": 2 << 20, "l3_bytes": LLC}


def probe_row(gbps: float, size: int, row_bytes: int = 0, impl: str = "read",
              isa: str = "native") -> ResultRow:
    """A membw row: a stream of one buffer size, or a random-row gather when row_bytes > 0."""
    params = {"bytes": size, **({"row_bytes": row_bytes} if row_bytes else {})}
    return ResultRow(op="membw", impl=impl, workload="machine", params=json.dumps(params),
                     device="cpu", isa=isa, threads=1, precision="fp32", median_s=1e-3,
                     gbps=gbps, timestamp="2025-03-01T00:00:00")


def lookup_row(gbps: float, table_bytes: float, rows: int, precision: str = "fp32",
               rotation_batches: int = 64, isa: str = "native") -> ResultRow:
    """An sls row whose bytes by formula move at gbps (no flops, so efficiency is GB/s)."""
    params = {"rows": rows, "dim": 64, "table_bytes": table_bytes, "pooling": "32",
              "rotation_batches": rotation_batches}
    bytes_moved = 2048 * 32 * (table_bytes / rows + 8)
    return ResultRow(op="sls", impl="embedding_bag", workload="synthetic",
                     params=json.dumps(params), device="cpu", isa=isa, threads=1,
                     precision=precision, batch_size=2048, median_s=bytes_moved / gbps / 1e9,
                     bytes_moved=bytes_moved, gbps=gbps, timestamp="2025-03-01T00:00:01")


def dense_row(gbps: float, bytes_moved: float, op: str = "interaction") -> ResultRow:
    """An op without table lookups whose every call touches bytes_moved."""
    return ResultRow(op=op, impl="dot", workload="kaggle", params='{"dim": 16}', device="cpu",
                     isa="native", threads=1, precision="fp32", batch_size=2048,
                     median_s=bytes_moved / gbps / 1e9, bytes_moved=bytes_moved, gbps=gbps,
                     timestamp="2025-03-01T00:00:02")


def roof_probes() -> list[ResultRow]:
    """In-cache 120 GB/s, DRAM stream 16 GB/s, random gathers 2/3/4.5/6 GB/s beyond the LLC."""
    rows = [probe_row(120.0, 1 << 20), probe_row(60.0, 16 << 20), probe_row(16.0, 4 * LLC),
            probe_row(25.0, 4 * LLC, impl="copy")]
    rows += [probe_row(gbps, 4 * LLC, row_bytes)
             for row_bytes, gbps in ((64, 2.0), (128, 3.0), (256, 4.5), (512, 6.0))]
    return rows


def roofline_of(rows: list[ResultRow], env: dict = ROOF_ENV) -> tuple[dict, pd.DataFrame]:
    frame = runs.rows_to_frame(rows)
    ceilings = roofs.group_ceilings(frame, env)
    return ceilings, roofline_table(frame, ceilings)


def test_gather_rows_make_their_own_roofs_not_the_stream_roof():
    ceilings, _ = roofline_of(roof_probes())
    native = ceilings[("cpu", "native")]
    assert native.memory_gbps == 25.0  # best stream at the largest buffer (copy)
    assert native.cache_gbps == 120.0
    assert native.gather_gbps == {64: 2.0, 128: 3.0, 256: 4.5, 512: 6.0}
    assert native.cache_bytes == LLC


@pytest.mark.parametrize("row, roof, roof_gbps", [
    # A small table sits in the LLC: the in-cache roof, not the DRAM one.
    (lookup_row(20.0, 4 << 20, 16384), roofs.IN_CACHE_ROOF, 120.0),
    # A 5 GiB table of 256 B rows: random rows, so the 256 B gather roof.
    (lookup_row(4.0, 5 << 30, 20_000_000), f"{roofs.GATHER_ROOF} 256 B rows", 4.5),
    # 72 B int8 rows take the nearest probe row size (64 B).
    (lookup_row(1.5, 1.44e9, 20_000_000, "int8"), f"{roofs.GATHER_ROOF} 64 B rows", 2.0),
    # The kaggle interaction case: 1.5 MB per call, touched again by the next call.
    (dense_row(27.0, 1.5e6), roofs.IN_CACHE_ROOF, 120.0),
    # An op whose one call streams 200 MB: beyond the LLC, no random rows: DRAM stream.
    (dense_row(12.0, 2e8, op="fc"), roofs.DRAM_ROOF, 25.0),
])
def test_each_row_gets_the_roof_its_working_set_meets(row, roof, roof_gbps):
    _, roofline = roofline_of(roof_probes() + [row])
    placed = roofline.iloc[0]
    assert (placed["roof"], placed["roof_gbps"]) == (roof, roof_gbps)
    assert placed["efficiency"] == pytest.approx(row.gbps / roof_gbps)
    assert placed["efficiency"] <= 1.0 and placed["note"] == ""


def test_the_old_single_dram_roof_would_have_shown_above_100_percent():
    # The planted fault: the kaggle figures under one DRAM roof exceed 100%.
    interaction = dense_row(27.1, 1.5e6)
    _, roofline = roofline_of([probe_row(15.8, 512 << 20), interaction])
    assert roofline.iloc[0]["roof"] == "DRAM stream (no in-cache probe)"
    assert roofline.iloc[0]["efficiency"] > 1.0
    assert roofline.iloc[0]["note"] == ABOVE_ROOF_NOTE
    _, fixed = roofline_of([probe_row(15.8, 512 << 20), probe_row(60.0, 1 << 20), interaction])
    assert fixed.iloc[0]["roof"] == roofs.IN_CACHE_ROOF and fixed.iloc[0]["efficiency"] < 1.0


def test_a_lookup_table_touched_only_in_part_is_sized_by_its_batches():
    # 64 rotating batches of 2048 x 32 rows touch ~1 GiB at most of a 5 GiB table; 1 rotation
    # batch touches 17 MB, which the 32 MiB LLC holds: the in-cache roof.
    _, roofline = roofline_of(roof_probes() + [lookup_row(4.0, 5 << 30, 20_000_000,
                                                          rotation_batches=1)])
    assert roofline.iloc[0]["roof"] == roofs.IN_CACHE_ROOF


def test_a_kernel_beating_its_probe_is_labelled_in_the_report(tmp_path):
    rows = roof_probes() + [lookup_row(4.47, 5 << 30, 20_000_000, rotation_batches=64)]
    rows[-3] = probe_row(3.5, 4 * LLC, 256)  # a weaker 256 B gather probe than the kernel
    _, roofline = roofline_of(rows)
    assert roofline.iloc[0]["efficiency"] == pytest.approx(4.47 / 3.5)
    assert roofline.iloc[0]["note"] == ABOVE_ROOF_NOTE
    report = build_report([write_run(tmp_path / "run", rows, ROOF_ENV, ALL_OPS)])
    markdown = (report / "summary.md").read_text(encoding="utf-8")
    assert "1 row(s) exceed their roof by more than the probe's own spread (sls)" in markdown
    assert ABOVE_ROOF_NOTE in markdown
    assert f"{roofs.GATHER_ROOF} 256 B rows" in markdown


def test_a_row_above_the_probes_median_but_not_its_fastest_sample_is_at_its_roof(tmp_path):
    rows = roof_probes() + [lookup_row(4.7, 5 << 30, 20_000_000), dense_row(130.0, 1.5e6),
                            dense_row(140.0, 1.5e6, op="fc")]
    rows[6].min_s = rows[6].median_s / 1.1  # the 256 B gather probe's fastest sample: +10%
    rows[0].min_s = rows[0].median_s / 1.1  # the in-cache probe (120 GB/s): +10%
    ceilings, roofline = roofline_of(rows)
    native = ceilings[("cpu", "native")]
    assert native.spreads[roofs.gather_key(256)] == pytest.approx(1.1)
    assert native.spreads[roofs.CACHE_KEY] == pytest.approx(1.1)
    assert math.isnan(native.spreads[roofs.STREAM_KEY])  # no min_s recorded: unknown
    notes = roofline.set_index("op")["note"]
    # 4.7 / 4.5 = 104% and 130 / 120 = 108%: inside the probes' 10%; 140 / 120 = 117% is not.
    assert notes["sls"] == notes["interaction"] == WITHIN_SPREAD_NOTE
    assert notes["fc"] == ABOVE_ROOF_NOTE
    assert roofline.set_index("op")["probe_spread"]["sls"] == pytest.approx(1.1)
    report = build_report([write_run(tmp_path / "run", rows, ROOF_ENV, ALL_OPS)])
    markdown = (report / "summary.md").read_text(encoding="utf-8")
    assert "2 row(s) sit above their roof's median but within the probe's own spread" in markdown
    assert "1 row(s) exceed their roof by more than the probe's own spread (fc)" in markdown
    assert "probe's fastest sample 1.100x its median" in markdown


def test_a_compute_limited_row_is_held_to_the_gemm_probes_spread():
    gemm = ResultRow(op="gemm_peak", impl="matmul", workload="machine", params='{"size": 1024}',
                     device="cpu", isa="native", threads=1, precision="fp32", median_s=1e-2,
                     min_s=1e-2 / 1.05, flops=2 * 1024 ** 3, gflops=100.0,
                     timestamp="2025-03-01T00:00:03")
    fc = ResultRow(op="fc", impl="linear", workload="kaggle", params='{"dim": 16}',
                   device="cpu", isa="native", threads=1, precision="fp32", batch_size=2048,
                   median_s=1e-3, flops=1.03e8, bytes_moved=1e6, gflops=103.0, gbps=1.0,
                   timestamp="2025-03-01T00:00:04")
    _, roofline = roofline_of(roof_probes() + [gemm, fc])
    placed = roofline.set_index("op").loc["fc"]
    assert placed["limit"] == "compute" and placed["efficiency"] == pytest.approx(1.03)
    assert placed["probe_spread"] == pytest.approx(1.05)
    assert placed["note"] == WITHIN_SPREAD_NOTE
    fc.gflops = 106.0
    _, roofline = roofline_of(roof_probes() + [gemm, fc])
    assert roofline.set_index("op").loc["fc"]["note"] == ABOVE_ROOF_NOTE


def test_gather_probes_within_the_llc_are_no_roof():
    rows = [probe_row(16.0, 4 * LLC), probe_row(60.0, 1 << 20), probe_row(9.0, 16 << 20, 256),
            lookup_row(4.0, 5 << 30, 20_000_000)]
    ceilings, roofline = roofline_of(rows)
    native = ceilings[("cpu", "native")]
    assert native.gather_gbps == {}
    assert any("fits in the 32 MiB last-level cache: not a roof" in note for note in native.notes)
    assert roofline.iloc[0]["roof"] == "DRAM stream (no random-gather probe)"


# ---------------------------------------------------------------- ceilings table, latency label

def test_ceilings_table_shows_each_measured_set_once(realistic_run):
    run = runs.load_run(realistic_run)
    table = roofs.ceilings_table(roofs.group_ceilings(run.frame, run.env))
    cpu = table[table["device"] == "cpu"]
    # membw ran only at native: its numbers appear once, never under avx2 or avx512.
    memory = cpu[cpu["unit"] == "GB/s"]
    assert set(memory["isa"]) == {"native"} and len(memory) == len(set(memory["roof"]))
    # gemm_peak ran at every ISA level: one compute set per level, each its own numbers.
    compute = cpu[cpu["roof"] == "compute fp32"].set_index("isa")["value"]
    assert compute.to_dict() == pytest.approx({"avx2": 400.0, "avx512": 600.0, "native": 680.0})
    notes = cpu[cpu["roof"] == "note"]["detail"].tolist()
    assert notes == ["no probes at these ISA levels: their rows use the membw of isa native "
                     "(not repeated here)"]
    assert cpu[cpu["roof"] == "note"]["isa"].tolist() == ["avx2, avx512"]
    assert set(table[table["device"] == "cuda:0"]["isa"]) == {"native"}


def test_latency_table_says_what_a_sample_is(tmp_path):
    rows = [dense_row(10.0, 1e6), dense_row(10.0, 2e8, op="fc")]
    rows[0].calls_per_sample, rows[1].calls_per_sample = 64, 1
    rows[0].p99_s = rows[1].p99_s = 1e-3
    report = build_report([write_run(tmp_path / "run", rows, args=ALL_OPS)])
    markdown = (report / "summary.md").read_text(encoding="utf-8")
    assert "64-call block means" in markdown_row(markdown, "interaction", "dot", "fp32")
    assert "single calls" in markdown_row(markdown, "fc", "dot", "fp32")
    assert "mean of calls_per_sample calls" in markdown


def test_a_working_set_between_the_llc_and_the_probe_buffer_is_bounded_by_the_cache_roof():
    # 51 MiB of tables (the kaggle sls_multi case) against a 32 MiB LLC and 128 MiB probes:
    # part of it stays cached, so only the in-cache roof bounds it.
    _, roofline = roofline_of(roof_probes() + [lookup_row(8.5, 51 << 20, 800_000)])
    assert roofline.iloc[0]["roof"] == roofs.PARTLY_CACHED_ROOF
    assert roofline.iloc[0]["roof_gbps"] == 120.0 and roofline.iloc[0]["efficiency"] < 1.0
    _, streaming = roofline_of(roof_probes() + [dense_row(12.0, 64 << 20, op="fc")])
    assert streaming.iloc[0]["roof"] == roofs.PARTLY_CACHED_ROOF


# ---------------------------------------------------------------- the headline table

def headline_row(op: str, impl: str, precision: str, median_s: float, baseline: bool = False,
                 params: dict | None = None, workload: str = "kaggle") -> ResultRow:
    """A measured row of a headline op, by hand."""
    return ResultRow(op=op, impl=impl, precision=precision, median_s=median_s, iqr_s=0.1 * median_s,
                     is_baseline=baseline, workload=workload, device="cpu", isa="native",
                     threads=1, batch_size=2048, samples_per_s=2048 / median_s,
                     params=json.dumps(params or {}), status="ok",
                     task_key=f"{op}{impl}{precision}")


def test_headline_table_speedups_over_baseline_and_reference():
    rows = [
        headline_row("dlrm_train", "per_table", "fp32", 0.080, baseline=True,
                     params={"layout": "per_table", "autocast": "none"}),
        headline_row("dlrm_train", "per_table", "bf16", 0.050, baseline=True,
                     params={"layout": "per_table", "autocast": "bf16"}),
        headline_row("dlrm_train", "fused_sgd", "fp32", 0.040, params={"layout": "fused_sgd"}),
        headline_row("dlrm_train", "fused_sgd", "bf16", 0.025, params={"layout": "fused_sgd"}),
        headline_row("dlrm_train", "dlrm_reference", "fp32", 0.100,
                     params={"run_mode": "train", "script": "dlrm_s_pytorch.py"}),
        headline_row("sls_multi", "per_table", "fp32", 0.002, baseline=True,
                     params={"mode": "sum", "rotation_batches": 4}),
        headline_row("sls_multi", "batched", "fp32", 0.001,
                     params={"mode": "sum", "table_bytes": 10}),
        headline_row("sls_multi", "batched", "fp32", 0.004, params={"mode": "mean"}),
        headline_row("fc", "linear", "fp32", 0.001, baseline=True),  # not a headline op
    ]
    table = headline.headline_table(runs.rows_to_frame(rows), {})
    assert set(table["op"]) == {"dlrm_train", "sls_multi"}
    by_key = {(row.op, row.impl, row.precision, row.variant): row
              for row in table.itertuples()}
    fused_bf16 = by_key[("dlrm_train", "fused_sgd", "bf16", "{}")]
    assert fused_bf16.vs_baseline == pytest.approx(0.050 / 0.025)  # baseline at its precision
    assert fused_bf16.vs_reference == pytest.approx(0.100 / 0.025)  # the fp32 reference
    assert by_key[("dlrm_train", "fused_sgd", "fp32", "{}")].vs_reference == pytest.approx(2.5)
    assert by_key[("dlrm_train", "dlrm_reference", "fp32", "{}")].vs_baseline == pytest.approx(0.8)
    assert by_key[("dlrm_train", "per_table", "fp32", "{}")].baseline == "per_table"
    summed = by_key[("sls_multi", "batched", "fp32", '{"mode":"sum"}')]
    assert summed.vs_baseline == pytest.approx(2.0)
    assert math.isnan(summed.vs_reference)  # no reference for sls_multi
    # Another variant (mean) has no baseline row: not compared with the sum baseline.
    assert math.isnan(by_key[("sls_multi", "batched", "fp32", '{"mode":"mean"}')].vs_baseline)
    # Ordered by workload, op, variant, precision, then fastest first.
    train = table[table["op"] == "dlrm_train"]
    assert list(train["precision"]) == ["fp32", "fp32", "fp32", "bf16", "bf16"]
    assert list(train["impl"])[:3] == ["fused_sgd", "per_table", "dlrm_reference"]


def test_headline_table_keeps_workloads_apart_and_is_empty_without_headline_ops():
    rows = [headline_row("dlrm_infer", "per_table", "fp32", 0.02, baseline=True),
            headline_row("dlrm_infer", "dlrm_reference", "fp32", 0.04, workload="smoke"),
            headline_row("dlrm_infer", "per_table", "fp32", 0.001, baseline=True,
                         workload="smoke")]
    table = headline.headline_table(runs.rows_to_frame(rows), {})
    kaggle = table[table["workload"] == "kaggle"].iloc[0]
    assert math.isnan(kaggle["vs_reference"])  # the smoke reference is another workload
    smoke = table[(table["workload"] == "smoke") & (table["impl"] == "per_table")].iloc[0]
    assert smoke["vs_reference"] == pytest.approx(40.0)
    empty = headline.headline_table(runs.rows_to_frame([headline_row("fc", "x", "fp32", 1.0)]), {})
    assert empty.empty and list(empty.columns) == headline.HEADLINE_COLUMNS


def test_report_has_the_headline_section(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with ResultsWriter(run / "results.csv") as writer:
        writer.write(headline_row("dlrm_train", "per_table", "fp32", 0.08, baseline=True))
        writer.write(headline_row("dlrm_train", "dlrm_reference", "fp32", 0.1))
    report = build_report([run])
    summary = (report / "summary.md").read_text(encoding="utf-8")
    assert "## Headline" in summary and "dlrm_reference" in summary and "| 1.25 |" in summary
