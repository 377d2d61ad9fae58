"""Work shared across impls and precisions in a worker: rotations, references, fp32 predictions."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from bench import registry
from bench.embeddings import table_weight
from bench.models import dlrm_reference
from bench.models.dlrm import batch_tensors
from bench.models.dlrm_reference import REFERENCE_MEMO, WorkloadMemo, reference_logits
from bench.models.teacher import teacher_model
from bench.ops import dlrm_batches, dlrm_costs
from bench.registry import BuildContext
from bench.run import worker
from workloads import presets
from workloads.generators import make_batch

SMOKE = presets.smoke()
CPU = torch.device("cpu")


def _build(op: str, impl_name: str, precision: str = "fp32", workload=SMOKE):
    context = BuildContext(workload=workload, variant={}, precision=precision, device=CPU,
                           seed=0, options={})
    return registry.impls(op)[impl_name].build(context)


def test_a_short_rotation_is_the_prefix_of_a_long_one():
    long = dlrm_batches.rotating_batches(SMOKE, 0, 5)
    short = dlrm_batches.rotating_batches(SMOKE, 0, 3)
    assert all(one is other for one, other in zip(short, long[:3])) and len(short) == 3
    for batch, index in zip(long, dlrm_batches.rotation_batch_indices(5, SMOKE)):
        fresh = make_batch(SMOKE, 0, index)
        np.testing.assert_array_equal(batch.dense, fresh.dense)
        np.testing.assert_array_equal(batch.tables[0].indices, fresh.tables[0].indices)


def test_a_cached_reference_is_the_one_for_its_batch():
    model = teacher_model(SMOKE, 0)
    first, second = (batch_tensors(make_batch(SMOKE, 0, index), CPU) for index in (0, 1000))
    expected_first = dlrm_reference._reference_logits(model, *first)
    expected_second = dlrm_reference._reference_logits(model, *second)
    assert torch.equal(reference_logits(model, *first), expected_first)
    assert torch.equal(reference_logits(model, *second), expected_second)
    hits = REFERENCE_MEMO.hits
    assert torch.equal(reference_logits(model, *first), expected_first)  # from the memo
    assert REFERENCE_MEMO.hits == hits + 1
    assert not torch.equal(expected_first, expected_second)


def test_a_changed_model_never_gets_the_cached_reference():
    model = teacher_model(SMOKE, 0)
    batch = batch_tensors(make_batch(SMOKE, 0, 0), CPU)
    cached = reference_logits(model, *batch)
    planted = copy.deepcopy(model)
    with torch.no_grad():  # one looked-up row of one table, as a broken update would leave it
        _, table = dlrm_reference.reference_tables(planted)[0]  # a view of the parameter
        table[batch[1][0][0]] += 1.0
    assert not torch.equal(reference_logits(planted, *batch), cached)
    assert torch.equal(reference_logits(planted, *batch),
                       dlrm_reference._reference_logits(planted, *batch))


def test_a_training_check_still_fails_a_planted_fault_after_a_cached_reference():
    prepared = _build("dlrm_train", "per_table")
    assert worker.check(prepared, worker.ResultRow(), "fp32") == ""  # caches the reference
    wrong = prepared.check

    def check_with_a_doubled_step():
        logits, bottom, top, pooled = wrong()
        return logits, bottom, top, pooled * 2.0

    prepared.check = check_with_a_doubled_step
    assert "exceeds" in worker.check(prepared, worker.ResultRow(), "fp32")


def test_training_does_not_change_the_shared_tables_or_reference():
    cached_table = table_weight(SMOKE.tables[0], 1, 0)
    prepared = _build("dlrm_train", "batched")
    expected = prepared.reference()
    for _ in range(3):
        prepared.run()  # SGD steps update the student's tables in place
    assert torch.equal(table_weight(SMOKE.tables[0], 1, 0), cached_table)
    again = _build("dlrm_train", "per_table").reference()
    for mine, theirs in zip(again, expected):
        assert torch.equal(mine, theirs)


def test_the_memos_hold_one_workload_at_a_time():
    memo = WorkloadMemo(max_entries=2)
    other = dataclasses.replace(SMOKE, name="other")
    assert memo.get(SMOKE, "a", lambda: 1) == 1
    assert memo.get(SMOKE, "a", lambda: 2) == 1
    assert memo.get(other, "a", lambda: 3) == 3  # a new workload clears the memo
    assert memo.get(other, "b", lambda: 4) == 4 and memo.get(other, "c", lambda: 5) == 5
    assert list(memo.entries) == ["b", "c"]  # bounded: the oldest entry went first


def test_memoized_distinct_rows_equal_a_fresh_count():
    inputs = [batch_tensors(batch, CPU) for batch in dlrm_batches.rotating_batches(SMOKE, 0, 4)]
    for position in range(len(SMOKE.tables)):
        fresh = sum(torch.unique(indices[position]).numel() for _, indices, _ in inputs) / 4
        assert dlrm_costs._mean_distinct_rows(SMOKE, position, inputs) == fresh
        assert dlrm_costs._mean_distinct_rows(SMOKE, position, inputs) == fresh
