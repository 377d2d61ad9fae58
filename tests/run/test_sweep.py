"""Sweeps: planning, the memory check, crash isolation of workers, and end-to-end runs."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT, run_cli

import bench.run.sweep
from bench import registry
from bench.ops.ceilings import GATHER_ROW_BYTES
from bench.records import (COLUMNS, STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, ResultsWriter,
                           read_rows, samples_from_row)
from bench.run.settings import WorkerSettings
from bench.run.sweep import (MACHINE_WORKLOAD, WORKER_BASE_BYTES, check_memory, estimate_bytes,
                              plan, run_tasks)
from bench.run.tasks import Task
from bench.run.timing import TimingPolicy
from workloads import presets
from workloads.specs import SpecError

SMOKE = presets.smoke()
GIB = 1 << 30


# ---------------------------------------------------------------- plan

def test_plan_is_the_cross_product():
    planned = plan(["sls", "fc"], [SMOKE], ["fp32", "int4"], ["cpu"], ["native"], [1], seed=0,
                   options={"sls_modes": ["sum", "mean"], "fc_layers": ["linear"]},
                   impl_filter={"embedding_bag", "torch_linear"})
    labels = [(item.task.op, item.task.variant.get("mode") or item.task.variant.get("layer"),
               item.task.precision) for item in planned]
    assert sorted(labels) == sorted([
        ("sls", "sum", "fp32"), ("sls", "sum", "int4"), ("sls", "mean", "fp32"),
        ("sls", "mean", "int4"), ("fc", "linear", "fp32"), ("fc", "linear", "int4")])
    # fc lists no int4 (no such Linear kernel): the planner skips it with a reason, not a build.
    reasons = {(item.task.op, item.task.precision): item.skip_reason for item in planned}
    assert "no int4 kernel" in reasons[("fc", "int4")]
    assert all(reason == "" for config, reason in reasons.items() if config != ("fc", "int4"))
    keys = [item.task.key() for item in planned]
    assert len(set(keys)) == len(keys)


def test_plan_skips_precisions_an_impl_lacks():
    planned = plan(["interaction"], [SMOKE], ["fp32", "int8"], ["cpu"], ["native"], [1], seed=0)
    by_precision = {}
    for item in planned:
        by_precision.setdefault(item.task.precision, []).append(item)
    assert all(not item.skip_reason for item in by_precision["fp32"])
    assert by_precision["int8"] and all("no int8 kernel" in item.skip_reason
                                        for item in by_precision["int8"])
    assert len(by_precision["fp32"]) == len(registry.impls("interaction"))


def test_plan_machine_ops_once_and_precision_agnostic_membw():
    kaggle = presets.kaggle()
    planned = plan(["membw", "gemm_peak"], [SMOKE, kaggle], ["fp32", "bf16"], ["cpu"],
                   ["native"], [1], seed=0, options={"membw_sizes": [4096, 8192],
                                                     "gemm_size": 64})
    membw = [item.task for item in planned if item.task.op == "membw"]
    gemm = [item.task for item in planned if item.task.op == "gemm_peak"]
    assert {task.workload.name for task in membw + gemm} == {MACHINE_WORKLOAD}
    assert {task.precision for task in membw} == {"fp32"}  # measured once, at fp32
    # Two stream sizes plus one random-row gather per row size from the largest buffer.
    gathers = [task for task in membw if "row_bytes" in task.variant]
    assert {task.variant["bytes"] for task in gathers} == {8192}
    assert len(membw) == (2 + len(GATHER_ROW_BYTES)) * len(registry.impls("membw"))
    # One square per precision for each gemm_peak impl (torch.mm and nn.Linear).
    assert sorted(task.precision for task in gemm) == (
        ["bf16"] * len(registry.impls("gemm_peak")) + ["fp32"] * len(registry.impls("gemm_peak")))
    assert all(task.workload.batch_size == 1 for task in membw + gemm)


def test_a_probe_runs_once_with_every_workloads_variants():
    # gemm_peak runs on the machine workload, yet the compute roof must include each model's
    # own layer shapes: kaggle's, although smoke (narrow layers) comes first.
    from bench.ops.ceilings import model_gemm_shapes

    kaggle = presets.kaggle()
    planned = plan(["gemm_peak"], [SMOKE, kaggle], ["fp32"], ["cpu"], ["native"], [1], seed=0,
                   options={})
    shapes = {(task.variant["m"], task.variant["k"], task.variant["n"])
              for task in (item.task for item in planned) if "m" in task.variant}
    assert model_gemm_shapes(kaggle) and shapes == set(model_gemm_shapes(kaggle))
    keys = [item.task.key() for item in planned]
    assert len(keys) == len(set(keys))  # each configuration once, not once per workload


def test_plan_groups_isa_levels_threads_and_filters_impls():
    planned = plan(["sls_multi"], [SMOKE], ["fp32"], ["cpu"], ["native", "avx2"], [1, 2],
                   seed=3, impl_filter={"batched"})
    assert {item.task.impl for item in planned} == {"batched"}
    assert sorted(item.task.group() for item in planned) == [
        ("cpu", "avx2", 1), ("cpu", "avx2", 2), ("cpu", "native", 1), ("cpu", "native", 2)]
    assert all(item.task.seed == 3 for item in planned)
    # A GPU device ignores ISA levels (they are CPU knobs) and runs once at native.
    gpu = plan(["sls_multi"], [SMOKE], ["fp32"], ["cuda:0"], ["native", "avx2"], [1], seed=0,
               impl_filter={"batched"})
    assert [item.task.isa for item in gpu] == ["native"]


def test_task_json_round_trip_and_key():
    workload = SMOKE.capped(600).with_batch_size(32)
    task = Task(op="sls", impl="embedding_bag", workload=workload, variant={"mode": "sum"},
                precision="int8", device="cpu", isa="avx2", threads=2, seed=5,
                options={"sls_modes": ["sum"]})
    back = Task.from_json(task.to_json())
    assert back == task
    assert back.key() == task.key() and len(task.key()) == 16
    import dataclasses

    for change in ({"precision": "int4"}, {"isa": "native"}, {"threads": 1}, {"seed": 6},
                   {"variant": {"mode": "mean"}}, {"impl": "other"},
                   {"workload": workload.with_batch_size(64)}, {"workload": SMOKE}):
        assert dataclasses.replace(task, **change).key() != task.key(), change


# ---------------------------------------------------------------- memory check

def test_check_memory_accepts_what_fits_and_refuses_what_does_not():
    kaggle = presets.kaggle()  # 33.76M rows x dim 16 x 4 B = 2.16 GB of fp32 tables
    check_memory([kaggle], ["dlrm_train"], 64 * GIB)
    check_memory([kaggle], ["fc", "interaction"], 1 << 20)  # no tables
    with pytest.raises(SpecError) as error:
        check_memory([kaggle], ["dlrm_train"], 4 * GIB)
    message = str(error.value)
    assert "kaggle" in message and "--max-rows" in message
    needed = float(re.search(r"needs about ([\d.]+) GiB", message).group(1))
    assert needed == pytest.approx((33_762_577 * 16 * 4 * 6 + WORKER_BASE_BYTES) / GIB,
                                   abs=0.05)


def test_check_memory_single_sls_counts_the_largest_table_only():
    kaggle = presets.kaggle()
    largest = 10_131_227 * 16 * 4  # one table, as sls looks up one
    needed = 3.0 * largest + WORKER_BASE_BYTES
    check_memory([kaggle], ["sls"], int(needed / 0.9) + 1)
    with pytest.raises(SpecError):
        check_memory([kaggle], ["sls"], int(needed / 0.9) - 1000)


def _hinted_rows(error: SpecError) -> int:
    return int(re.search(r"--max-rows ([\d,]+)", str(error)).group(1).replace(",", ""))


@pytest.mark.parametrize("name, ops, available", [
    ("terabyte", ["dlrm_train"], 22 * GIB),
    ("kaggle", ["sls_multi"], 1 * GIB),
    ("mlperf", ["dlrm_infer"], 8 * GIB),
])
def test_following_the_max_rows_hint_fits(name, ops, available):
    workload = presets.preset(name)
    with pytest.raises(SpecError) as error:
        check_memory([workload], ops, available)
    check_memory([workload.capped(_hinted_rows(error.value))], ops, available)


def test_table_free_ops_do_not_change_the_memory_estimate():
    kaggle = presets.kaggle()
    # sls holds the largest table, a copy, and (huge_pages) a copy in huge pages.
    largest_thrice = 3.0 * 10_131_227 * 16 * 4 + WORKER_BASE_BYTES  # and the worker itself
    assert estimate_bytes(kaggle, ["fc", "interaction", "membw", "gemm_peak"]) == 0.0
    assert estimate_bytes(kaggle, ["sls"]) == largest_thrice
    assert estimate_bytes(kaggle, ["sls", "fc", "interaction"]) == largest_thrice
    available = 3 * GIB  # the largest table x3 fits; all tables x4 (8.6 GB) do not
    check_memory([kaggle], ["sls", "fc"], available)
    with pytest.raises(SpecError, match="kaggle"):
        check_memory([kaggle], ["sls_multi", "fc"], available)


# ---------------------------------------------------------------- crash isolation (fake worker)

# A stand-in for `python -m bench.run.worker`: speaks the same event protocol without importing
# torch, and misbehaves on the tasks the test names (once each, so a restarted worker runs them).
FAKE_WORKER = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path
    from bench.run.tasks import Task

    arguments = sys.argv[1:]
    events = os.fdopen(int(arguments[arguments.index("--event-fd") + 1]), "w", buffering=1)
    run_id = json.loads(arguments[arguments.index("--settings") + 1])["run_id"]
    state = Path(os.environ["FAKE_WORKER_STATE"])
    actions = json.loads(os.environ["FAKE_WORKER_ACTIONS"])
    with open(arguments[0]) as handle:
        tasks = [Task.from_json(line) for line in handle if line.strip()]
    with open(state / "launches.jsonl", "a") as log:
        log.write(json.dumps([task.variant["n"] for task in tasks]) + "\\n")

    def send(**event):
        events.write(json.dumps(event) + "\\n")
        events.flush()

    def once(action):
        marker = state / action
        if marker.exists():
            return False
        marker.touch()
        return True

    if "exit_before_ready" in actions.values() and once("exit_before_ready"):
        os._exit(5)
    send(event="ready", isa_effective="fake")
    for index, task in enumerate(tasks):
        action = actions.get(str(task.variant["n"]), "ok")
        send(event="start", index=index)
        if action == "kill_during" and once(action):
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "hang" and once(action):
            time.sleep(120)
        row = {"run_id": run_id, "task_key": task.key(), "op": task.op, "impl": task.impl,
               "workload": task.workload.name, "precision": task.precision,
               "status": "ok", "n_samples": 1, "median_s": 0.001, "samples_s": "[0.001]",
               "timestamp": "2025-01-01T00:00:00+00:00"}
        send(event="row", index=index, row=row)
        if action == "exit_after_row" and once(action):
            os._exit(3)
    send(event="done")
''')


@pytest.fixture
def fake_worker(monkeypatch, tmp_path):
    """Route WorkerGroup's worker command to FAKE_WORKER; returns a runner of tasks."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    state = tmp_path / "state"
    state.mkdir()
    real_popen = subprocess.Popen

    def popen(command, *args, **kwargs):
        if list(command[1:3]) == ["-m", "bench.run.worker"]:
            command = [command[0], str(script), *command[3:]]
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(bench.run.sweep.subprocess, "Popen", popen)
    monkeypatch.setenv("FAKE_WORKER_STATE", str(state))

    def run(count: int, actions: dict, task_timeout_s: float = 60.0):
        monkeypatch.setenv("FAKE_WORKER_ACTIONS", json.dumps(actions))
        tasks = [Task(op="interaction", impl="dot", workload=SMOKE, variant={"n": n},
                      precision="fp32", device="cpu", isa="native", threads=1, seed=0)
                 for n in range(count)]
        results = tmp_path / "results.csv"
        with ResultsWriter(results) as writer:
            settings = WorkerSettings("fake-run", TimingPolicy(), log_path=tmp_path / "worker.log",
                                      task_timeout_s=task_timeout_s)
            rows = run_tasks(tasks, settings, writer)
        launches = [json.loads(line) for line in
                    (state / "launches.jsonl").read_text().splitlines()]
        return tasks, rows, read_rows(results), launches

    return run


def test_worker_settings_reach_the_worker_unchanged(tmp_path):
    from bench.run.callgrind import CountPolicy

    timed = WorkerSettings("r", TimingPolicy(min_run_time_s=0.3), log_path=tmp_path / "w.log",
                           task_timeout_s=12.5)
    counted = WorkerSettings("c", TimingPolicy(), CountPolicy(cache_sim=True),
                             {"metric": "instructions"})
    for settings in (timed, counted):
        assert WorkerSettings.from_json(settings.to_json()) == settings
    # A fingerprint records the counting facts of an instruction run, else the timing policy.
    assert timed.fingerprint_policy == timed.policy
    assert counted.fingerprint_policy == {"metric": "instructions"}


def _by_key(rows):
    return {row.task_key: row for row in rows}


def test_fake_worker_runs_every_task_once(fake_worker):
    tasks, rows, on_disk, launches = fake_worker(3, {})
    assert [row.task_key for row in rows] == [task.key() for task in tasks]
    assert [row.task_key for row in on_disk] == [task.key() for task in tasks]
    assert all(row.status == STATUS_OK for row in rows)
    assert launches == [[0, 1, 2]]


def test_killed_worker_becomes_an_error_row_and_the_rest_run(fake_worker):
    tasks, rows, on_disk, launches = fake_worker(4, {"1": "kill_during"})
    keys = [row.task_key for row in on_disk]
    assert sorted(keys) == sorted(task.key() for task in tasks)  # one row per task
    assert len(set(keys)) == len(keys)
    failed = _by_key(on_disk)[tasks[1].key()]
    assert failed.status == STATUS_ERROR and "SIGKILL" in failed.error
    assert failed.op == "interaction" and failed.impl == "dot"
    assert all(_by_key(on_disk)[task.key()].status == STATUS_OK
               for task in tasks if task != tasks[1])
    # A fresh worker took over the tasks after the crash, not the crashed one.
    assert launches == [[0, 1, 2, 3], [2, 3]]
    assert len(rows) == len(on_disk) == 4


def test_worker_exiting_before_ready_blames_the_first_task(fake_worker):
    tasks, rows, on_disk, launches = fake_worker(3, {"0": "exit_before_ready"})
    by_key = _by_key(on_disk)
    assert len(on_disk) == 3 and set(by_key) == {task.key() for task in tasks}
    assert by_key[tasks[0].key()].status == STATUS_ERROR
    assert "exited with code 5" in by_key[tasks[0].key()].error
    assert launches == [[0, 1, 2], [1, 2]]


def test_hung_task_times_out_into_an_error_row(fake_worker):
    tasks, rows, on_disk, launches = fake_worker(3, {"1": "hang"}, task_timeout_s=2.0)
    by_key = _by_key(on_disk)
    assert len(on_disk) == 3 and set(by_key) == {task.key() for task in tasks}
    assert by_key[tasks[1].key()].status == STATUS_ERROR
    assert "timed out" in by_key[tasks[1].key()].error
    assert by_key[tasks[2].key()].status == STATUS_OK
    assert launches == [[0, 1, 2], [2]]


def test_worker_dying_between_tasks_gives_no_duplicate_rows(fake_worker):
    tasks, rows, on_disk, launches = fake_worker(3, {"0": "exit_after_row"})
    keys = [row.task_key for row in on_disk]
    assert len(keys) == len(set(keys)) == 3
    assert _by_key(on_disk)[tasks[0].key()].status == STATUS_OK


# ---------------------------------------------------------------- end to end (real workers)

SWEEP_ARGUMENTS = ["--workload", "smoke", "--ops", "sls,fc",
                   "--impls", "embedding_bag,torch_linear", "--precision", "fp32,int4",
                   "--sls-modes", "sum", "--fc-layers", "linear", "--min-run-time", "0.02",
                   "--no-report"]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """One real small sweep, shared by the end-to-end tests."""
    out = tmp_path_factory.mktemp("sweep")
    result = run_cli(*SWEEP_ARGUMENTS, "--out", str(out), "--run-id", "e2e")
    return result, out / "e2e"


def test_sweep_end_to_end(sweep_run):
    result, run_dir = sweep_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    results = run_dir / "results.csv"
    with open(results, encoding="utf-8") as handle:
        header = handle.readline().strip().split(",")
    assert tuple(header) == COLUMNS
    rows = read_rows(results)
    planned = plan(["sls", "fc"], [SMOKE], ["fp32", "int4"], ["cpu"], ["native"], [1], seed=0,
                   options={"sls_modes": ["sum"], "fc_layers": ["linear"]},
                   impl_filter={"embedding_bag", "torch_linear"})
    assert sorted(row.task_key for row in rows) == sorted(item.task.key() for item in planned)
    assert len(rows) == 4
    by_config = {(row.op, row.precision): row for row in rows}
    skipped = by_config[("fc", "int4")]
    assert skipped.status == STATUS_SKIPPED and "int4" in skipped.error
    assert math.isnan(skipped.median_s) and skipped.n_samples == 0
    for config in (("sls", "fp32"), ("sls", "int4"), ("fc", "fp32")):
        row = by_config[config]
        assert row.status == STATUS_OK, row.error
        assert math.isfinite(row.median_s) and row.median_s > 0
        samples = samples_from_row(row)
        assert isinstance(samples, list) and len(samples) == row.n_samples >= 1
        assert all(value > 0 for value in samples)
        assert math.isfinite(row.rel_error)
        assert row.rel_error <= registry.TOLERANCE[row.precision]
        assert row.run_id == "e2e" and row.workload == "smoke" and row.device == "cpu"
        assert row.fingerprint and row.code_version and row.timestamp
    assert json.loads(by_config[("sls", "int4")].params)["mode"] == "sum"
    assert json.loads(by_config[("fc", "fp32")].params)["layer"] == "linear"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["cpu_model"] and env["torch_version"]
    args = json.loads((run_dir / "args.json").read_text())
    assert args["argv"][:len(SWEEP_ARGUMENTS)] == SWEEP_ARGUMENTS
    assert args["run_id"] == "e2e"
    assert "3 measured, 1 skipped, 0 errors" in result.stdout


def test_resume_completes_a_cut_run(sweep_run, tmp_path):
    result, run_dir = sweep_run
    assert result.returncode == 0, result.stderr
    resumed = tmp_path / "e2e"
    shutil.copytree(run_dir, resumed)
    results = resumed / "results.csv"
    original = read_rows(results)
    lines = results.read_text(encoding="utf-8").splitlines(keepends=True)
    results.write_text("".join(lines[:3]), encoding="utf-8")  # the header and two rows
    assert len(read_rows(results)) == 2
    resume = subprocess.run([sys.executable, "run_bench.py", "--resume", str(resumed)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr
    assert "2 of 4 configurations already recorded" in resume.stderr
    rows = read_rows(results)
    keys = [row.task_key for row in rows]
    assert len(keys) == len(set(keys)) == 4
    assert set(keys) == {row.task_key for row in original}
    # The first two rows were kept as they were, not re-measured.
    assert [row.median_s for row in rows[:2]] == [row.median_s for row in original[:2]]
    assert sum(row.status == STATUS_SKIPPED for row in rows) == 1
    assert sum(row.status == STATUS_OK for row in rows) == 3
