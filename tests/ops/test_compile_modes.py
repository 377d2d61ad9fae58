"""torch.compile modes of the compiled impls: one row per mode, the mode in its params, the
compile timed apart from the timed step; a bad --compile-mode is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

from bench.run.settings import WorkerSettings
from bench.ops.dlrm_compiled import COMPILE_MODES, compile_mode, compile_variants, warm_up
from bench.records import STATUS_OK
from bench.registry import BuildContext, Unsupported
from bench.run.sweep import plan
from bench.run.tasks import Task
from bench.run.worker import run_task
from conftest import FAST_POLICY, run_cli, tiny_workload

CPU = torch.device("cpu")
ALL_MODES = {"compile_modes": list(COMPILE_MODES)}


def _context(variant=None, time_calls=None) -> BuildContext:
    return BuildContext(workload=tiny_workload(), variant=variant or {}, precision="fp32",
                        device=CPU, seed=0, time_calls=time_calls)


def test_each_mode_is_a_variant_and_default_keeps_its_old_key():
    assert compile_variants({}) == [{}]
    assert compile_variants(ALL_MODES) == [{}, {"compile_mode": "max-autotune"},
                                           {"compile_mode": "reduce-overhead"}]
    assert compile_variants({"compile_modes": ["max-autotune"]}) == [
        {"compile_mode": "max-autotune"}]
    assert compile_mode(_context()) == "default"
    assert compile_mode(_context({"compile_mode": "reduce-overhead"})) == "reduce-overhead"
    with pytest.raises(Unsupported, match="unknown torch.compile mode 'fast'"):
        compile_mode(_context({"compile_mode": "fast"}))


def test_the_planner_gives_compiled_one_task_per_mode_and_other_impls_one():
    workload = tiny_workload()

    def tasks(options):
        planned = plan(["dlrm_infer", "dlrm_train"], [workload], ["fp32"], ["cpu"], ["native"],
                       [1], 0, options, {"compiled", "per_table"})
        return {(item.task.op, item.task.impl, json.dumps(item.task.variant)): item.task.key()
                for item in planned}

    before, after = tasks({}), tasks(ALL_MODES)
    for op in ("dlrm_infer", "dlrm_train"):
        modes = [json.loads(variant).get("compile_mode", "default")
                 for task_op, name, variant in after if (task_op, name) == (op, "compiled")]
        assert sorted(modes) == sorted(COMPILE_MODES)
        assert [name for task_op, name, _ in after if task_op == op].count("per_table") == 1
    # Rows of the default mode keep the task keys they had before --compile-mode existed.
    assert all(after[identity] == key for identity, key in before.items())
    assert len(set(after.values())) == len(after)


def test_warm_up_times_each_call_with_the_given_clock_and_only_then():
    ran = []
    calls = [lambda index=index: ran.append(index) for index in range(3)]
    seconds = iter([20.0, 4.0, 0.01])

    def fake_time_calls(fn, count):
        assert count == 1
        fn()
        return [next(seconds)]

    metrics = warm_up(_context(time_calls=fake_time_calls), calls)
    assert ran == [0, 1, 2]
    assert metrics == {"compile_s": 20.0, "warm_up_calls_s": [20.0, 4.0, 0.01]}
    assert warm_up(_context(), calls) == {} and ran == [0, 1, 2, 0, 1, 2]


def test_a_compiled_row_records_its_mode_and_compile_time_apart_from_the_step():
    """The worker hands builders its clock: compile_s is the first warm-up call, which
    compiles; the timed median is a compiled step, far shorter."""
    task = Task(op="dlrm_infer", impl="compiled", workload=tiny_workload(), variant={},
                precision="fp32", device="cpu", isa="native", threads=1, seed=0)
    row = run_task(task, WorkerSettings("compile-modes", FAST_POLICY))
    assert row.status == STATUS_OK, row.error
    params, metrics = json.loads(row.params), json.loads(row.metrics)
    assert params["compile_mode"] == "default"
    assert metrics["compile_s"] > 0 and len(metrics["warm_up_calls_s"]) == 3
    assert metrics["compile_s"] > row.median_s


def test_a_bad_compile_mode_is_refused_in_one_line_with_exit_2(tmp_path):
    out = tmp_path / "results"
    result = run_cli("--compile-mode", "default,fast", "--ops", "dlrm_infer", "--workload",
                     "smoke", "--out", str(out), "--no-report")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--compile-mode value 'fast'" in result.stderr and "max-autotune" in result.stderr
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_every_mode_compiles_and_checks_on_cuda(mode):
    variant = compile_variants({"compile_modes": [mode]})[0]
    task = Task(op="dlrm_infer", impl="compiled", workload=tiny_workload(), variant=variant,
                precision="fp32", device="cuda:0", isa="native", threads=1, seed=0)
    row = run_task(task, WorkerSettings("compile-modes", FAST_POLICY))
    assert row.status == STATUS_OK, row.error
    assert json.loads(row.params)["compile_mode"] == mode
    assert json.loads(row.metrics)["compile_s"] > 0
