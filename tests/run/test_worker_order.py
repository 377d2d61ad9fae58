"""A worker runs each workload's configurations back to back, and drops its inputs after."""

from __future__ import annotations

import itertools
import random

from bench import embeddings
from bench.ops import common
from bench.run.sweep import MACHINE_WORKLOAD, plan
from bench.run.tasks import Task, worker_order
from workloads import presets

SMOKE = presets.smoke()
KAGGLE = presets.kaggle()


def _runs(values) -> list:
    """The values with consecutive repeats merged: [a, a, b, a] -> [a, b, a]."""
    return [value for value, _ in itertools.groupby(values)]


def test_the_plan_runs_each_workload_of_a_worker_back_to_back():
    planned = plan(["sls", "tt_sls", "membw", "fc"], [SMOKE, KAGGLE], ["fp32", "bf16"],
                   ["cpu"], ["native", "avx2"], [1], seed=0,
                   options={"sls_modes": ["sum"], "membw_sizes": [4096]})
    groups = _runs(item.task.group() for item in planned)
    assert len(groups) == len(set(groups)) == 2  # one worker after the other
    for group in groups:
        tasks = [item.task for item in planned if item.task.group() == group]
        workloads = _runs(task.workload.name for task in tasks)
        assert workloads == ["smoke", "kaggle", MACHINE_WORKLOAD]  # each once, first seen first
        # Within a workload the ops keep the order they were asked in.
        for name in ("smoke", "kaggle"):
            ops = _runs(task.op for task in tasks if task.workload.name == name)
            assert ops == ["sls", "tt_sls", "fc"]


def test_worker_order_keeps_every_task_and_the_order_within_a_workload():
    tasks = [Task(op=op, impl="impl", workload=workload, variant={"index": index},
                  precision="fp32", device="cpu", isa=isa, threads=1, seed=0)
             for index, (op, workload, isa) in enumerate(itertools.product(
                 ["a", "b", "c"], [SMOKE, KAGGLE], ["native", "avx2"]))]
    random.Random(4).shuffle(tasks)
    ordered = worker_order(tasks)
    assert sorted(task.key() for task in ordered) == sorted(task.key() for task in tasks)
    keys = [(task.group(), task.workload.name) for task in ordered]
    assert len(_runs(keys)) == len(set(keys)) == 4
    for key in set(keys):
        mine = [task for task in tasks if (task.group(), task.workload.name) == key]
        assert [task for task in ordered if (task.group(), task.workload.name) == key] == mine
    assert worker_order(ordered) == ordered  # already in worker order: unchanged


def test_clearing_shared_inputs_empties_every_input_memo():
    largest = SMOKE.largest_table()
    common.shared_rotation(SMOKE, largest, 0, 2, common.torch.device("cpu"))
    common.shared_table_weight(SMOKE.tables[largest], 0, largest)
    assert common.SHARED_ROTATIONS.entries
    common.clear_shared_inputs()
    assert all(not memo.entries for memo in common._INPUT_MEMOS)
    assert embeddings._cached_weight.cache_info().currsize == 0
