"""`run_bench.py reference`: the DLRM reference's rows beside ours, with a stand-in script."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from bench.commands import main as run_bench
from bench.commands import reference, reference_run
from bench.records import STATUS_ERROR, STATUS_OK, read_rows, samples_from_row
from bench.run import devices
from workloads import presets
from conftest import FIXTURES_DIR

STAND_IN = FIXTURES_DIR / "reference"

# Lines as dlrm_s_pytorch.py prints them (with --print-time --print-freq=1; the last one with
# --print-wall-time), among its other output.
REAL_OUTPUT = """\
Unable to import onnx.  No module named 'onnx'
time/loss/accuracy (if enabled):
Finished training it 1/3 of epoch 0, 76.43 ms/it, loss 0.693147
Finished training it 2/3 of epoch 0, 1302.07 ms/it, loss 0.250001
Finished training it 3/3 of epoch 0, 5.00 ms/it, loss 0.249000 (12:34)
"""


def test_parses_the_reference_iteration_lines():
    assert reference_run.parse_iteration_times(REAL_OUTPUT) == pytest.approx(
        [0.07643, 1.30207, 0.005])


def test_missing_print_time_is_an_error_not_a_time():
    with pytest.raises(reference_run.ReferenceError, match="print-time"):
        reference_run.parse_iteration_times("Finished training it 1/1 of epoch 0, -1.00 ms/it, "
                                        "loss 0.5\n")


def test_flags_for_kaggle_capped_are_config_a():
    spec = presets.kaggle().capped(100_000)
    flags = reference_run.reference_arguments(spec, 60, 0)
    assert "--arch-mlp-bot=13-512-256-64-16" in flags
    assert "--arch-mlp-top=512-256-1" in flags
    assert "--arch-sparse-feature-size=16" in flags
    assert ("--arch-embedding-size=1460-583-100000-100000-305-24-12517-633-3-93145-5683-100000-"
            "3194-27-14992-100000-10-5652-2173-4-100000-18-15-100000-105-100000") in flags
    assert "--num-indices-per-lookup=1" in flags and "--mini-batch-size=2048" in flags
    assert "--num-batches=60" in flags and "--loss-function=bce" in flags
    sizes = reference_run.model_arguments(spec)
    assert sizes["ln_top"] == [27 * 26 // 2 + 16, 512, 256, 1]
    dlrm_default = reference_run.model_arguments(presets.dlrm_default())
    assert dlrm_default["ln_bot"] == [512, 512, 64] and dlrm_default["lookups"] == 100


@pytest.mark.parametrize("argv, message", [
    (["--dlrm-repo", "/nonexistent/dlrm"], "no such directory"),
    (["--dlrm-repo", "."], "has no dlrm_s_pytorch.py"),
    (["--dlrm-repo", str(STAND_IN), "--workload", "mlperf"], "dcn"),
    (["--dlrm-repo", str(STAND_IN), "--mode", "serve"], "--mode"),
    (["--dlrm-repo", str(STAND_IN), "--rounds", "0"], "--rounds"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    code = run_bench(["reference", *argv, "--out", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and message in error
    assert not list(tmp_path.iterdir())  # refused before any work


def test_rows_of_the_reference_and_ours_in_one_results_csv(tmp_path):
    code = run_bench(["reference", "--dlrm-repo", str(STAND_IN), "--workload", "smoke",
                      "--mode", "train,infer", "--rounds", "2", "--iterations", "3",
                      "--warmup", "1", "--impls", "per_table", "--precision", "fp32",
                      "--min-run-time", "0.02", "--out", str(tmp_path), "--run-id", "side",
                      "--no-report"])
    assert code == 0
    run = tmp_path / "side"
    rows = read_rows(run / "results.csv")
    ours = {row.op: row for row in rows if row.impl == "per_table"}
    theirs = {row.op: row for row in rows if row.impl == reference_run.REFERENCE_IMPL}
    assert set(ours) == set(theirs) == {"dlrm_train", "dlrm_infer"}
    spec = presets.smoke()
    for op, row in theirs.items():
        assert row.status == STATUS_OK, row.error
        # The same identity fields as our rows, and the key a Task of impl dlrm_reference has.
        for field in ("workload", "device", "isa", "threads", "precision", "batch_size",
                      "fingerprint", "device_name"):
            assert getattr(row, field) == getattr(ours[op], field), field
        assert row.task_key == reference_run.reference_task(spec, op, 1, 0).key()
        assert row.task_key != ours[op].task_key and not row.is_baseline
        assert row.fingerprint == devices.fingerprint(
            "cpu", "native", 1, reference.timing_policy(0.02))
        assert math.isfinite(row.median_s) and row.median_s > 0
        assert row.samples_per_s == pytest.approx(spec.batch_size / row.median_s)
        params = json.loads(row.params)
        assert params["script"] == "dlrm_s_pytorch.py" and "timing" in params
        assert json.loads(row.metrics)["merged_runs"] == 2  # pooled over the rounds
    train = theirs["dlrm_train"]
    samples = samples_from_row(train)
    assert train.n_samples == len(samples) == 2 * 3  # warm-up dropped, two rounds pooled
    assert all(0.002 < value < 0.5 for value in samples)  # the stand-in sleeps 3 ms
    assert "its --inference-only prints no time" in json.loads(theirs["dlrm_infer"].params)[
        "timing"]
    recorded = json.loads((run / "args.json").read_text())
    # Interleaved: reference, ours, reference, ours.
    assert recorded["rounds"] == ["rounds/reference-1", "rounds/ours-1", "rounds/reference-2",
                                  "rounds/ours-2"]
    assert (run / "env.json").exists()


def _options(**changes) -> argparse.Namespace:
    options = reference.build_parser().parse_args(["--dlrm-repo", str(STAND_IN)])
    options.warmup, options.iterations = 1, 2
    for name, value in changes.items():
        setattr(options, name, value)
    return options


def test_a_reference_that_prints_no_time_is_an_error_row(tmp_path):
    # Planted fault: a checkout whose script prints the line without --print-time (-1 ms/it).
    (tmp_path / "dlrm_s_pytorch.py").write_text(
        "print('Finished training it 1/3 of epoch 0, -1.00 ms/it, loss 0.5')\n")
    row = reference_run.reference_row(presets.smoke(), "train", _options(), reference.timing_policy(
        0.02), "r", tmp_path, "")
    assert row.status == STATUS_ERROR and "print-time" in row.error


def test_a_reference_with_too_few_iterations_is_an_error_row(tmp_path):
    # Planted fault: one iteration line short (a crashed or truncated loop must not pass).
    (tmp_path / "dlrm_s_pytorch.py").write_text(
        "print('Finished training it 1/3 of epoch 0, 5.00 ms/it, loss 0.5')\n"
        "print('Finished training it 2/3 of epoch 0, 5.00 ms/it, loss 0.5')\n")
    row = reference_run.reference_row(presets.smoke(), "train", _options(), reference.timing_policy(
        0.02), "r", tmp_path, "")
    assert row.status == STATUS_ERROR and "expected 3" in row.error


def test_a_crashing_reference_is_an_error_row_with_its_last_line(tmp_path):
    (tmp_path / "dlrm_s_pytorch.py").write_text("import sklearn_missing_here\n")
    row = reference_run.reference_row(presets.smoke(), "train", _options(), reference.timing_policy(
        0.02), "r", tmp_path, "")
    assert row.status == STATUS_ERROR and "ModuleNotFoundError" in row.error


def test_the_stand_in_inference_is_timed_through_its_model(tmp_path):
    row = reference_run.reference_row(presets.smoke(), "infer", _options(infer_batches=2),
                                  reference.timing_policy(0.02), "r", STAND_IN, "")
    assert row.status == STATUS_OK, row.error
    # The stand-in's forward sleeps 1 ms and raises on inputs of the wrong shapes.
    assert 0.0009 < row.median_s < 0.5


# ---------------------------------------------------------------- --device

@pytest.fixture
def gpus(monkeypatch):
    """Fake the visible GPUs (count and name): validation and the row's identity pass here."""
    def fake(count: int) -> None:
        monkeypatch.setattr(devices, "cuda_device_count", lambda: count)
        real_name = devices.device_name
        monkeypatch.setattr(devices, "device_name", lambda device: "Stand-in GPU"
                            if device.startswith("cuda") else real_name(device))

    return fake


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """The stand-in's runs: argv and CUDA_VISIBLE_DEVICES of each, read back after the run."""
    path = tmp_path / "stand-in-runs.jsonl"
    monkeypatch.setenv("STAND_IN_RECORD", str(path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return lambda: [json.loads(line) for line in path.read_text().splitlines()]


def _train_row(options):
    return reference_run.reference_row(presets.smoke(), "train", options,
                                       reference.timing_policy(0.02), "r", STAND_IN, "")


def test_the_reference_gets_use_gpu_on_cuda_only(gpus, recorded, monkeypatch):
    gpus(2)
    monkeypatch.setenv("STAND_IN_FAKE_GPU", "1")  # the stand-in says it found the GPU
    row = _train_row(_options(device="cuda:1"))
    assert row.status == STATUS_OK, row.error
    assert (row.device, row.device_name) == ("cuda:1", "Stand-in GPU")
    assert row.task_key == reference_run.reference_task(presets.smoke(), "dlrm_train", 1, 0,
                                                        "cuda:1").key()
    assert row.fingerprint == devices.fingerprint("cuda:1", "native", 1,
                                                  reference.timing_policy(0.02))
    assert "--use-gpu" in json.loads(row.params)["arguments"]
    cpu_row = _train_row(_options())
    assert cpu_row.status == STATUS_OK and cpu_row.device == "cpu"
    assert "--use-gpu" not in json.loads(cpu_row.params)["arguments"]
    on_gpu, on_cpu = recorded()
    # It sees the one GPU it was given alone: with several it would spread its tables.
    assert "--use-gpu" in on_gpu["argv"] and on_gpu["cuda_visible_devices"] == "1"
    assert "--use-gpu" not in on_cpu["argv"] and on_cpu["cuda_visible_devices"] is None


def test_the_gpu_is_picked_from_the_inherited_visible_list():
    assert reference_run.visible_gpu("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,5"}) == "5"
    assert reference_run.visible_gpu("cuda:0", {"CUDA_VISIBLE_DEVICES": "GPU-ab12"}) == "GPU-ab12"
    assert reference_run.visible_gpu("cuda:2", {}) == "2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in would find the GPU")
def test_a_reference_that_fell_back_to_the_cpu_is_an_error_row(gpus, recorded, monkeypatch):
    # Its run() quietly uses the CPU when torch sees no GPU; that time is not a GPU time.
    gpus(1)
    monkeypatch.setenv("STAND_IN_FAKE_GPU", "0")
    row = _train_row(_options(device="cuda:0"))
    assert row.status == STATUS_ERROR and "ran on the CPU, asked for cuda:0" in row.error


def test_our_side_runs_on_the_same_device(gpus, tmp_path, monkeypatch):
    gpus(1)
    seen = []

    class Stop(Exception):
        pass

    def first_round(workloads, modes, options, *rest):
        seen.append(options.device)
        raise Stop

    monkeypatch.setattr(reference, "run_reference_round", first_round)
    with pytest.raises(Stop):
        run_bench(["reference", "--dlrm-repo", str(STAND_IN), "--workload", "smoke",
                   "--device", "cuda", "--out", str(tmp_path), "--no-report"])
    assert seen == ["cuda:0"]  # normalized, as our sweep's rows name it
    options = _options(device="cuda:0")
    argv = reference.ours_argv(options, ["dlrm_train"], tmp_path, "ours-1")
    assert argv[argv.index("--device") + 1] == "cuda:0"
    assert "--device" not in reference.ours_argv(_options(), ["dlrm_train"], tmp_path, "o")


@pytest.mark.parametrize("count, device, message", [
    (0, "cuda", "no CUDA GPU is visible"),
    (1, "cuda:3", "only 1 GPU"),
    (2, "gpu", "unknown device"),
])
def test_bad_devices_are_one_line_and_exit_2(gpus, count, device, message, capsys, tmp_path):
    gpus(count)
    code = run_bench(["reference", "--dlrm-repo", str(STAND_IN), "--device", device,
                      "--out", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and message in error
    assert not list(tmp_path.iterdir())
