"""A worker frees what a finished configuration built; the planner counts what one holds."""

import gc
import weakref

import pytest
import torch

from bench import registry
from bench.ops import common, sls
from bench.records import STATUS_ERROR
from bench.run import sweep, worker
from bench.run.settings import WorkerSettings
from bench.run.tasks import Task
from conftest import FAST_POLICY, tiny_workload
from workloads import presets


@pytest.fixture
def tracked(monkeypatch):
    """Weak references to every PooledTable the sls builders make and to its stored table,
    unless that is the worker's shared fp32 table itself (read in place, kept by design)."""
    references = []

    class TracedTable(common.PooledTable):
        def __init__(self, weight, *args, **kwargs):
            super().__init__(weight, *args, **kwargs)
            references.append(weakref.ref(self))
            if self.weight is not weight:
                references.append(weakref.ref(self.weight))

    monkeypatch.setattr(sls, "PooledTable", TracedTable)
    yield references
    gc.unfreeze()  # release_task_memory froze this test process's objects: hand them back


@pytest.mark.parametrize("impl", ["embedding_bag", "huge_pages"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_finished_configuration_leaves_no_table_behind(tracked, impl, precision):
    task = Task(op="sls", impl=impl, workload=tiny_workload(), variant={"mode": "sum"},
                precision=precision, device="cpu", isa="native", threads=1, seed=0)
    row = worker.run_task(task, WorkerSettings("memory", FAST_POLICY))
    assert row.status != STATUS_ERROR, row.error
    assert tracked, "the builder made no table"
    worker.release_task_memory()
    # Only the worker's shared fp32 cache (bench.embeddings) and inputs may outlive it.
    assert [reference for reference in tracked if reference() is not None] == []


def test_a_pooled_table_is_freed_without_the_cycle_collector():
    # A table that referred to itself through a bound method waited for gc, which a worker
    # rarely runs between configurations: its copy of the table outlived it.
    gc.disable()  # the collector must not run by chance between the two lines
    try:
        table = common.PooledTable(common.table_weight(tiny_workload().tables[0], 0, 0),
                                   "fp32", torch.device("cpu"))
        weight = weakref.ref(table.weight)
        del table
        assert weight() is None
    finally:
        gc.enable()


def test_the_sls_estimate_covers_the_cache_a_copy_and_the_worker():
    workload = presets.kaggle()
    table_bytes = max(table.rows for table in workload.tables) * workload.dim * 4
    # The worker's shared fp32 weights, a build's clone (the TBE impl's; the torch impls read
    # the shared table), one impl's copy (huge pages, a TBE's own weights), and the worker
    # itself (torch and fbgemm imported, rotating inputs).
    held = 3 * table_bytes + sweep.WORKER_BASE_BYTES
    assert sweep.estimate_bytes(workload, ["sls"]) >= held
    assert registry.ops()["sls"].memory_factor >= 3


def test_ops_without_tables_need_no_table_memory():
    assert sweep.estimate_bytes(presets.kaggle(), ["fc", "interaction"]) == 0.0


def test_garbage_made_after_a_release_is_still_collected(tracked):
    # Frozen by one release, still collected by the next: the worker's lasting state is
    # frozen, what a later configuration builds (cycles included) is not.
    worker.release_task_memory()

    class Cycle:
        def __init__(self):
            self.me = self
            self.payload = torch.zeros(1000)

    gc.disable()  # only the release may collect it
    try:
        payload = weakref.ref(Cycle().payload)
        assert payload() is not None  # kept by the cycle until a collection
        worker.release_task_memory()
        assert payload() is None
    finally:
        gc.enable()


def test_a_gpu_workers_release_hands_cached_blocks_back(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    try:
        worker.release_task_memory()
    finally:
        gc.unfreeze()
    assert emptied == [True]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    try:
        worker.release_task_memory()  # a CPU worker never touches CUDA
    finally:
        gc.unfreeze()
    assert emptied == [True]
