"""The command line: --list, and bad input as one stderr line with exit 2 and nothing written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from bench import commands
from bench.run import devices
from workloads import presets

# name -> (arguments, words the single error line must contain)
ERROR_CASES = {
    "unknown-op": (["--ops", "sls,bogus"],
                   ["'bogus'", "sls", "sls_multi", "fc", "interaction", "dlrm_infer",
                    "dlrm_train", "membw", "gemm_peak"]),
    "unknown-precision": (["--precision", "fp32,fp64"],
                          ["'fp64'", "fp32", "fp16", "bf16", "int8", "int4"]),
    "unknown-workload": (["--workload", "smoke,kagle"],
                         ["'kagle'", *presets.PRESETS, "synthetic", "criteo:PATH"]),
    "unknown-device": (["--device", "tpu"], ["'tpu'", "cpu", "cuda"]),
    "unknown-isa": (["--isa", "avx9000"], ["'avx9000'", *devices.ISA_LEVELS]),
    "cuda-without-gpu": (["--device", "cuda"], ["cuda", "no CUDA GPU", "--device cpu"]),
    "too-big": (["--workload", "terabyte", "--ops", "dlrm_train"],
                ["terabyte", "GiB", "--max-rows"]),
    "criteo-missing": (["--workload", "criteo:/nonexistent.tsv"], ["/nonexistent.tsv"]),
}


# Run through the real entry point as separate processes. Each imports torch (seconds of CPU on
# a shared 2-core machine), so only these go through subprocesses; every case of ERROR_CASES
# also runs in-process below through bench.commands.sweep.main, which is all run_bench.py calls.
SUBPROCESS_CASES = ("too-big",)


def _launch(arguments: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_bench.py", *arguments, "--out", str(out),
                             "--no-report"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """--list and a few error cases, run as processes started together."""
    base = tmp_path_factory.mktemp("cli")
    processes = {name: (_launch(ERROR_CASES[name][0], base / name), base / name)
                 for name in SUBPROCESS_CASES}
    processes["list"] = (_launch(["--list"], base / "list"), base / "list")
    results = {}
    for name, (process, out) in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stdout, stderr, out)
    return results


# terabyte + dlrm_train needs about 540 GiB; a host with that much free would accept it.
HUGE_HOST = devices.available_memory_bytes() > 600 * (1 << 30)


def _skip_unless_refusable(name: str) -> None:
    if name == "too-big" and HUGE_HOST:
        pytest.skip("this host has memory for terabyte training")
    if name == "cuda-without-gpu" and devices.cuda_device_count() > 0:
        pytest.skip("a GPU is visible here")


def _check_one_line_error(code: int, stderr: str, out: Path, words) -> None:
    assert code == 2, stderr
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, stderr
    assert lines[0].startswith("run_bench.py: error: ")
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists(), "no run directory may be created for refused input"


def test_list_names_ops_workloads_precisions(cli_results):
    code, stdout, stderr, out = cli_results["list"]
    assert code == 0, stderr
    for op in ("sls", "sls_multi", "fc", "interaction", "dlrm_infer", "dlrm_train", "membw",
               "gemm_peak"):
        assert re.search(rf"^\s+{op}\s", stdout, re.MULTILINE), op
    for workload in presets.PRESETS:
        assert re.search(rf"^\s+{re.escape(workload)}\s", stdout, re.MULTILINE), workload
    assert "synthetic" in stdout and "criteo:PATH" in stdout
    assert "fp32, fp16, bf16, int8, int4" in stdout
    assert "embedding_bag*" in stdout  # the baseline impl is marked
    assert "cpu" in stdout and "native" in stdout
    assert not out.exists()


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_through_run_bench_py(cli_results, name):
    _skip_unless_refusable(name)
    code, _, stderr, out = cli_results[name]
    _check_one_line_error(code, stderr, out, ERROR_CASES[name][1])


def test_too_big_workload_gives_size_and_a_hint(cli_results):
    _skip_unless_refusable("too-big")
    code, _, stderr, _ = cli_results["too-big"]
    assert code == 2
    size = re.search(r"needs about ([\d.]+) GiB", stderr)
    assert size and float(size.group(1)) > 100  # 188M rows x 128 x 4 B x working copies
    hint = re.search(r"--max-rows ([\d,]+)", stderr)
    assert hint and int(hint.group(1).replace(",", "")) >= 1000


# ---------------------------------------------------------------- in-process checks

def _main(capsys, *arguments: str) -> tuple[int, str]:
    code = commands.main(list(arguments))
    return code, capsys.readouterr().err


@pytest.fixture
def no_sweep(monkeypatch):
    """Make reaching the sweep itself (or any table allocation) fail the test."""
    import bench.embeddings
    import bench.run.execute
    import bench.run.sweep

    def forbidden(*args, **kwargs):
        raise AssertionError("refused input reached the sweep or allocated tables")

    monkeypatch.setattr(bench.run.execute, "execute", forbidden)
    monkeypatch.setattr(bench.run.sweep, "run_tasks", forbidden)
    monkeypatch.setattr(bench.embeddings, "_cached_weight", forbidden)


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_is_one_line_exit_two(capsys, no_sweep, tmp_path, name):
    _skip_unless_refusable(name)
    out = tmp_path / "out"
    code = commands.main([*ERROR_CASES[name][0], "--out", str(out), "--no-report"])
    captured = capsys.readouterr()
    _check_one_line_error(code, captured.err, out, ERROR_CASES[name][1])


def test_memory_refusal_happens_before_planning_or_allocating(capsys, monkeypatch, no_sweep,
                                                              tmp_path):
    _skip_unless_refusable("too-big")
    import bench.run.sweep

    monkeypatch.setattr(bench.run.sweep, "plan", lambda *args, **kwargs: pytest.fail("planned"))
    code, err = _main(capsys, "--workload", "terabyte", "--ops", "dlrm_train", "--out",
                      str(tmp_path / "out"))
    assert code == 2 and "--max-rows" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments, words", [
    (["--threads", "0"], ["--threads", "0"]),
    (["--threads", "two"], ["--threads", "two"]),
    (["--threads", "1,999"], ["--threads 999", "usable CPUs"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--batch-size", "abc"], ["--batch-size", "abc"]),
    (["--max-rows", "0"], ["--max-rows"]),
    (["--dist", "zipf:x"], ["zipf:ALPHA"]),
    (["--workload", "synthetic", "--pooling", "lognormal:abc"], ["--pooling"]),
    (["--workload", "synthetic", "--num-tables", "0"], ["--num-tables"]),
    (["--resume", "/nonexistent/run"], ["args.json"]),
    (["--ops", "sls", "--impls", "no_such_impl"], ["nothing to run"]),
])
def test_more_bad_input_in_process(capsys, no_sweep, tmp_path, arguments, words):
    workload = [] if "--workload" in arguments else ["--workload", "smoke"]
    code, err = _main(capsys, *arguments, *workload, "--out", str(tmp_path / "out"))
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("run_bench.py: error: ")
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists()


def test_non_numeric_membw_sizes_is_a_usage_error(capsys, no_sweep, tmp_path):
    code, err = _main(capsys, "--workload", "smoke", "--ops", "membw", "--membw-sizes", "1k",
                      "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "--membw-sizes" in err


@pytest.mark.parametrize("arguments, valid", [
    (["--ops", "fc", "--fc-layers", "bogus"], ["linear", "bottom_mlp", "top_mlp"]),
    (["--ops", "sls", "--sls-modes", "bogus"], ["sum", "mean", "weighted"]),
])
def test_unknown_variant_choices_are_usage_errors(capsys, no_sweep, tmp_path, arguments, valid):
    code, err = _main(capsys, "--workload", "smoke", "--precision", "fp32", *arguments,
                      "--out", str(tmp_path / "o"))
    assert code == 2
    assert all(word in err for word in valid)


def test_resume_with_corrupt_results_is_a_usage_error(capsys, monkeypatch, tmp_path):
    import json

    import bench.run.sweep
    from bench.records import COLUMNS, SCHEMA_VERSION

    monkeypatch.setattr(bench.run.sweep, "run_tasks",
                        lambda *args, **kwargs: pytest.fail("ran tasks despite a corrupt file"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps(
        {"argv": ["--workload", "smoke", "--ops", "fc", "--precision", "fp32", "--no-report"]}))
    values = {name: "" for name in COLUMNS}
    values.update(schema_version=str(SCHEMA_VERSION), op="fc", median_s="fast",
                  timestamp="2025-01-01")
    (run / "results.csv").write_text(",".join(COLUMNS) + "\n"
                                     + ",".join(values[name] for name in COLUMNS) + "\n")
    code, err = _main(capsys, "--resume", str(run))
    assert code == 2 and err.count("\n") == 1 and "results.csv" in err
