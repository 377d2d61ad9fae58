"""The DLRM on our Triton TBE through Triton's interpreter on the CPU: dlrm_infer and dlrm_train
pass the worker's float64 check at every precision, planted faults (a dropped table, mean
pooling, the fused step at twice the learning rate) fail, a step updates only the looked-up
rows, and a CPU sweep without the interpreter leaves both impls out of its plan."""

from __future__ import annotations


import pytest
from conftest import triton_interpreter

# As tests/models/test_triton_tbe.py: triton.jit picks the interpreter when it decorates, so
# the variable is on while the kernel module is imported, then put back (the fixture below
# sets it per test, so CLI subprocesses of other test modules never inherit it).
with triton_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")
    from bench.models import triton_tbe, triton_tbe_kernels  # noqa: E402

import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
from conftest import FAST_POLICY, tiny_workload  # noqa: E402

from bench import registry  # noqa: E402
from bench.models import teacher  # noqa: E402
from bench.models.dlrm import batch_tensors, build_dlrm  # noqa: E402
from bench.ops import common, dlrm, dlrm_triton  # noqa: E402
from bench.ops.dlrm import LEARNING_RATE, train_step  # noqa: E402
from bench.ops.sls_triton import CPU_SKIP  # noqa: E402
from bench.records import ResultRow  # noqa: E402
from bench.registry import BuildContext, Prepared, Unsupported  # noqa: E402
from bench.run import worker  # noqa: E402
from bench.run.settings import WorkerSettings  # noqa: E402
from bench.run.sweep import LeftOut, Named, plan  # noqa: E402
from bench.run.tasks import Task  # noqa: E402
from workloads.generators import make_batch  # noqa: E402

CPU = torch.device("cpu")
WORKLOAD = tiny_workload()  # 3 tables, dim 8, 3 lookups a bag, batch 16
OPS = ("dlrm_infer", "dlrm_train")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 while a test runs: the impls build on the CPU only with it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _context(precision: str, workload=WORKLOAD, variant=None) -> BuildContext:
    return BuildContext(workload=workload, variant=variant or {}, precision=precision,
                        device=CPU, seed=0, options={})


def _build(op: str, precision: str, workload=WORKLOAD) -> Prepared:
    return registry.impls(op)["triton_tbe"].build(_context(precision, workload))


def _check(prepared: Prepared, precision: str) -> str:
    return worker.check(prepared, ResultRow(), precision)


def _cases():
    return [pytest.param(op, precision, id=f"{op}-{precision}")
            for op in OPS for precision in registry.impls(op)["triton_tbe"].precisions]


def test_kernels_were_built_for_the_interpreter():
    assert triton_tbe_kernels.INTERPRETED


@pytest.mark.parametrize("op, precision", _cases())
def test_impl_passes_the_worker_check(op, precision):
    prepared = _build(op, precision)
    row = ResultRow()
    assert worker.check(prepared, row, precision) == ""
    assert math.isfinite(row.rel_error)
    assert prepared.params["layout"] == "triton_tbe"
    assert prepared.params["triton_interpreter"] is True
    assert prepared.bytes_moved > 0 and prepared.flops > 0
    prepared.run()
    prepared.run()  # the timed closure cycles through the rotating batches


def test_infer_tables_are_at_the_precision_and_int_tables_beside_fp32_mlps():
    bf16 = _build("dlrm_infer", "bf16")
    int4 = _build("dlrm_infer", "int4")
    assert (bf16.params["mlp"], bf16.params["tables"]) == ("bf16", "bf16 triton_tbe")
    assert (int4.params["mlp"], int4.params["tables"]) == ("fp32", "int4 row-wise triton_tbe")
    # Packed int4 rows (dim / 2 bytes and an fp16 scale and bias) against fp32 rows.
    assert int4.params["row_bytes"] == WORKLOAD.dim / 2 + 4
    assert bf16.metrics["model_bytes"] > sum(table.rows for table in WORKLOAD.tables) * 2 * 8


# ---------------------------------------------------------------- planted faults

def _drop_table(monkeypatch, position: int = 1) -> None:
    """A planted fault: one table's lookups never reach the kernel (its bags come out 0)."""
    real = dlrm_triton.tbe_inputs

    def dropped(indices, offsets):
        indices, offsets = list(indices), list(offsets)
        indices[position] = indices[position][:0]
        offsets[position] = torch.zeros_like(offsets[position])
        return real(indices, offsets)

    monkeypatch.setattr(dlrm_triton, "tbe_inputs", dropped)


@pytest.mark.parametrize("op, precision", [("dlrm_infer", "fp32"), ("dlrm_infer", "bf16"),
                                           ("dlrm_infer", "int4"), ("dlrm_train", "fp32")])
def test_planted_dropped_table_fails(monkeypatch, op, precision):
    _drop_table(monkeypatch)
    assert "exceed" in _check(_build(op, precision), precision)


@pytest.mark.parametrize("op, precision", [("dlrm_infer", "fp32"), ("dlrm_infer", "int8"),
                                           ("dlrm_train", "bf16")])
def test_planted_mean_pooling_fails(monkeypatch, op, precision):
    monkeypatch.setattr(dlrm_triton, "POOLING", "mean")
    assert "exceed" in _check(_build(op, precision), precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planted_fused_update_at_twice_the_learning_rate_fails(precision):
    prepared = dlrm_triton.build_triton_train(_context(precision),
                                              table_learning_rate=2 * LEARNING_RATE)
    assert "exceed" in _check(prepared, precision)


# ---------------------------------------------------------------- the training step

def test_a_training_step_updates_only_the_looked_up_rows():
    initial = build_dlrm(WORKLOAD, 1, embeddings="per_table")
    model = dlrm_triton.triton_model(triton_tbe, initial, "fp32", CPU, LEARNING_RATE)
    assert not list(model.embeddings.parameters())  # torch.optim.SGD never steps a table
    before = [weight.clone() for weight in model.embeddings.table_weights()]
    bottom = model.bottom[0].weight.detach().clone()
    dense, indices, offsets = batch_tensors(make_batch(WORKLOAD, 0, 0), CPU)
    labels = torch.ones(WORKLOAD.batch_size)
    train_step(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE), dense, indices,
               offsets, labels)
    for old, new, table_indices in zip(before, model.embeddings.table_weights(), indices):
        touched = torch.zeros(old.shape[0], dtype=torch.bool)
        touched[table_indices] = True
        assert torch.equal(new[~touched], old[~touched])
        assert (new[touched] != old[touched]).any(dim=1).all()
    assert not torch.equal(model.bottom[0].weight, bottom)


# ---------------------------------------------------------------- where it runs

def test_a_cpu_sweep_without_the_interpreter_leaves_both_impls_out(monkeypatch):
    def planned(named=Named()):
        left_out = LeftOut()
        tasks = plan(OPS, [WORKLOAD], ["fp32", "bf16", "int8"], ["cpu"], ["native"], [1],
                     seed=0, named=named, left_out=left_out)
        return tasks, left_out

    tasks, _ = planned()
    assert {task.task.impl for task in tasks} >= {"triton_tbe"}
    monkeypatch.delenv("TRITON_INTERPRET")
    tasks, left_out = planned()
    assert tasks and "triton_tbe" not in {task.task.impl for task in tasks}
    reasons = {record["reason"]: record["impls"] for record in left_out.records()}
    assert {"dlrm_infer/triton_tbe", "dlrm_train/triton_tbe"} <= set(reasons[CPU_SKIP])
    # Named, it is a skip row with the reason; built anyway, the builder refuses alike.
    tasks, _ = planned(Named(impls=frozenset({"triton_tbe"})))
    assert {task.skip_reason for task in tasks if task.task.impl == "triton_tbe"} == {
        f"{op}/triton_tbe: {CPU_SKIP}" for op in OPS}
    for op in OPS:
        with pytest.raises(Unsupported, match="runs on cuda"):
            _build(op, "fp32")


def test_tt_variants_and_odd_dim_int4_are_unsupported():
    with pytest.raises(Unsupported, match="TT-Rec"):
        registry.impls("dlrm_train")["triton_tbe"].build(
            _context("fp32", variant={"tt_tables": 1, "tt_rank": 4}))
    with pytest.raises(Unsupported, match="even embedding dim"):
        _build("dlrm_infer", "int4", tiny_workload(dim=7))


def test_infer_runs_timed_through_run_task_with_its_accuracy(monkeypatch):
    # The accuracy's 8 x 2048 evaluation samples take minutes in the interpreter: 2 x 64 here.
    monkeypatch.setattr(teacher, "EVAL_BATCH_SIZE", 64)
    monkeypatch.setattr(dlrm, "EVAL_BATCHES", 2)
    monkeypatch.setattr(common, "MAX_ROTATION_MODEL_BATCHES", 3)
    teacher.evaluation_set.cache_clear()  # none of another batch size is reused
    task = Task(op="dlrm_infer", impl="triton_tbe", workload=WORKLOAD, variant={},
                precision="int8", device="cpu", isa="native", threads=1, seed=0, options={})
    row = worker.run_task(task, WorkerSettings("r", FAST_POLICY))
    assert row.status == "ok", row.error
    assert math.isfinite(row.auc) and math.isfinite(row.ctr_abs_diff)
    assert json.loads(row.params)["embedding_launches_per_call"] == 1
    teacher.evaluation_set.cache_clear()  # nor is one of this size left for later tests


@pytest.mark.parametrize("op", OPS)
def test_a_sampled_check_reads_the_same_first_samples_as_the_logits(monkeypatch, op):
    # Above the float64 budget the whole-model check runs on the batch's first samples; the
    # pooled rows (inference) and updated rows (training) it reads beside the logits must be
    # those samples' too, or the row would claim a sample it did not check.
    monkeypatch.setattr(common, "CHECK_FLOAT64_BYTES", 2_000)
    prepared = _build(op, "fp32")
    samples = prepared.metrics["checked_samples"]
    assert 2 <= samples < WORKLOAD.batch_size
    expected = prepared.reference()
    assert expected[0].shape == (samples,)
    if op == "dlrm_infer":
        assert expected[1].shape[0] == samples  # pooled rows [samples, tables, dim]
    assert _check(prepared, "fp32") == ""
