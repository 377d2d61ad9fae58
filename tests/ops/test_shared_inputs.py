"""Work shared across impls and precisions in a worker: rotations, references, fp32 predictions."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from bench import embeddings, registry
from bench.embeddings import table_weight
from bench.models import dlrm as dlrm_model
from bench.models import dlrm_reference
from bench.models.dlrm import batch_tensors
from bench.models.dlrm_reference import REFERENCE_MEMO, WorkloadMemo, reference_logits
from bench.models.teacher import teacher_model
from bench.models.ttrec import TTEmbeddingBag
from bench.ops import ceilings, common, dlrm_batches, dlrm_costs, sls, ttrec
from bench.ops import dlrm as dlrm_ops
from bench.records import STATUS_OK
from bench.references import table_lookup64
from bench.registry import BuildContext
from bench.run import worker
from bench.run.settings import WorkerSettings
from bench.run.tasks import Task
from conftest import FAST_POLICY
from workloads import generators, presets
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


def plant_a_doubled_step(prepared) -> None:
    """The planted fault of a training check: the step's pooled rows moved twice as far."""
    right = prepared.check

    def check_with_a_doubled_step():
        logits, bottom, top, pooled = right()
        return logits, bottom, top, pooled * 2.0

    prepared.check = check_with_a_doubled_step


def test_a_training_check_still_fails_a_planted_fault_after_a_cached_reference():
    prepared = _build("dlrm_train", "per_table")
    assert worker.check(prepared, worker.ResultRow(), "fp32") == ""  # caches the reference
    plant_a_doubled_step(prepared)
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


# ---------------------------------------------------------------- lookup ops' shared inputs

def _lookup_context(precision="fp32", variant=None, workload=SMOKE):
    return BuildContext(workload=workload, variant=variant or {}, precision=precision,
                        device=CPU, seed=0, options={})


def _build_lookup(op, impl_name, precision="fp32", variant=None, workload=SMOKE):
    return registry.impls(op)[impl_name].build(_lookup_context(precision, variant, workload))


@pytest.fixture
def fresh_inputs():
    """A worker's state at a workload change: no shared tables, inputs or cache states."""
    common.clear_shared_inputs()
    yield
    common.clear_shared_inputs()


def test_a_second_impl_of_a_workload_reuses_the_shared_table_and_rotation(fresh_inputs,
                                                                          monkeypatch):
    draws = []

    def counted(*args, **kwargs):
        draws.append(args[1])
        return generators.rotating_table_batches(*args, **kwargs)

    monkeypatch.setattr(common, "rotating_table_batches", counted)
    largest = SMOKE.largest_table()
    first = _build_lookup("sls", "embedding_bag", variant={"mode": "sum"})
    misses = embeddings._cached_weight.cache_info().misses
    second = _build_lookup("tt_sls", "dense", variant={"rank": 16})
    third = _build_lookup("sls", "embedding_bag", variant={"mode": "weighted"})
    assert draws == [largest]  # one rotation drawn for the three builds
    assert embeddings._cached_weight.cache_info().misses == misses  # no table rebuilt
    shared = common.shared_table_weight(SMOKE.tables[largest], 0, largest)
    for prepared in (first, second, third):
        assert worker.check(prepared, worker.ResultRow(), "fp32") == ""
    assert shared.data_ptr() == common.shared_table_weight(SMOKE.tables[largest], 0,
                                                           largest).data_ptr()


def test_no_lookup_impl_changes_the_shared_tables_or_inputs(fresh_inputs):
    largest = SMOKE.largest_table()
    builds = [("sls", name, {"mode": mode}) for name in ("embedding_bag",)
              for mode in ("sum", "mean", "weighted")]
    builds += [("sls_multi", name, {"mode": "sum"}) for name in ("per_table", "batched")]
    builds += [("tt_sls", name, {"rank": 16}) for name in ("dense", "tt_cached", "tt_uncached")]
    _build_lookup(*builds[0][:2], variant=builds[0][2])
    tables = [common.shared_table_weight(table, 0, index).clone()
              for index, table in enumerate(SMOKE.tables)]
    for op, name, variant in builds:
        prepared = _build_lookup(op, name, variant=variant)
        for _ in range(3):
            prepared.run()
        assert worker.check(prepared, worker.ResultRow(), "fp32") == "", (op, name)
    parts = common.workload_rotation_plan(SMOKE, [largest], "fp32")["rotation_batches"]
    rotation = common.shared_rotation(SMOKE, largest, 0, parts, CPU)
    fresh = generators.rotating_table_batches(SMOKE, largest, 0, parts)
    for (indices, offsets, weights), batch in zip(rotation, fresh):
        assert np.array_equal(indices.numpy(), batch.indices)
        assert np.array_equal(offsets.numpy(), batch.offsets)
        assert np.array_equal(weights.numpy(), batch.weights)
    for index, table in enumerate(SMOKE.tables):
        assert torch.equal(common.shared_table_weight(table, 0, index), tables[index])


@pytest.mark.parametrize("policy_impl", ["tt_cached", "tt_cached_lru", "tt_uncached"])
def test_a_tt_cache_state_loaded_from_the_worker_equals_a_fresh_one(fresh_inputs, monkeypatch,
                                                                    policy_impl):
    settled = []
    original = ttrec._settle_cache

    def counted(*args):
        settled.append(args[1].cache_policy)
        return original(*args)

    monkeypatch.setattr(ttrec, "_settle_cache", counted)
    variant = {"rank": 4}
    _build_lookup("tt_sls", policy_impl, "fp32", variant)  # settles the cache: the passes
    loaded = _build_lookup("tt_sls", policy_impl, "bf16", variant)  # loads what they left
    assert len(settled) == 1
    common.clear_shared_inputs()
    fresh = _build_lookup("tt_sls", policy_impl, "bf16", variant)  # runs the passes itself
    assert len(settled) == 2
    assert loaded.metrics == fresh.metrics and loaded.params == fresh.params
    loaded_module, fresh_module = (_tt_module(prepared) for prepared in (loaded, fresh))
    if fresh_module.cache is not None:  # the state itself: the row map and the cached values
        for name in ttrec.CACHE_STATE:
            assert torch.equal(getattr(loaded_module.cache, name),
                               getattr(fresh_module.cache, name)), name
        assert torch.equal(loaded_module.cache.weight, fresh_module.cache.weight)
    assert worker.check(loaded, worker.ResultRow(), "bf16") == ""
    assert torch.equal(loaded.run(), fresh.run())  # same state, same timed call


def _tt_module(prepared) -> TTEmbeddingBag:
    """The TTEmbeddingBag a tt_sls Prepared's reference reads (found in its closure)."""
    for cell in prepared.reference.__closure__:
        if isinstance(cell.cell_contents, TTEmbeddingBag):
            return cell.cell_contents
    raise AssertionError("the reference reads no TT module")


def test_the_fused_kernel_shares_the_lfu_state_of_the_reference_kernel(fresh_inputs,
                                                                       monkeypatch):
    settled = []
    original = ttrec._settle_cache
    monkeypatch.setattr(ttrec, "_settle_cache",
                        lambda *args: settled.append(1) or original(*args))
    cached = _build_lookup("tt_sls", "tt_cached", "fp32", {"rank": 4})
    fused = _build_lookup("tt_sls", "tt_fused", "fp32", {"rank": 4})
    assert len(settled) == 1
    assert cached.metrics == fused.metrics
    assert worker.check(fused, worker.ResultRow(), "fp32") == ""


def test_membw_probes_of_a_size_draw_their_buffer_once(fresh_inputs, monkeypatch):
    draws = []
    original = torch.rand

    def counted(*args, **kwargs):
        draws.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(ceilings.torch, "rand", counted)
    machine = dataclasses.replace(SMOKE, name="machine", batch_size=1)
    size = 1 << 16
    for name, variant in (("copy", {"bytes": size}), ("read", {"bytes": size}),
                          ("copy", {"bytes": size, "row_bytes": 64}),
                          ("read", {"bytes": size, "row_bytes": 64})):
        prepared = _build_lookup("membw", name, variant=variant, workload=machine)
        prepared.run()
        assert worker.check(prepared, worker.ResultRow(), "fp32") == "", (name, variant)
    assert draws == [size // 4]
    common.clear_shared_inputs()
    assert not ceilings.PROBE_BUFFERS.entries and not ceilings.GATHER_INDICES.entries


# ---------------------------------------------------------------- the sampled check

@pytest.fixture
def small_check_budget(monkeypatch):
    """A float64 check budget that the smoke workload's largest table exceeds."""
    monkeypatch.setattr(common, "CHECK_FLOAT64_BYTES", 20_000)
    return 20_000


def test_a_check_below_the_budget_compares_every_bag(fresh_inputs):
    prepared = _build_lookup("sls", "embedding_bag", variant={"mode": "sum"})
    assert "checked_bags" not in prepared.metrics
    assert prepared.reference().shape[0] == SMOKE.batch_size


@pytest.mark.parametrize("op, impl_name, variant", [
    ("sls", "embedding_bag", {"mode": "weighted"}), ("sls", "embedding_bag", {"mode": "mean"}),
    ("sls_multi", "batched", {"mode": "sum"}), ("tt_sls", "dense", {"rank": 4}),
    ("tt_sls", "tt_cached", {"rank": 4})])
def test_above_the_budget_a_sample_of_bags_is_checked_and_stated(fresh_inputs,
                                                                  small_check_budget, op,
                                                                  impl_name, variant):
    prepared = _build_lookup(op, impl_name, variant=variant)
    checked, bags = prepared.metrics["checked_bags"], prepared.metrics["bags"]
    assert bags == SMOKE.batch_size and 2 <= checked < bags
    expected = prepared.reference()
    assert expected.shape[1 if op == "sls_multi" else 0] == checked
    assert worker.check(prepared, worker.ResultRow(), "fp32") == ""


def test_the_sample_spreads_over_the_batch_with_the_first_and_last_bags():
    sample = common.checked_bags(1000, 1e9, 10**8, 64)
    ids = sample.bag_ids.tolist()
    assert ids[0] == 0 and ids[-1] == 999 and ids == sorted(set(ids))
    gaps = np.diff(ids)
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    assert sample.metrics()["checked_bags"] == len(ids) and sample.metrics()["bags"] == 1000
    assert common.checked_bags(1000, 100, 10**8, 64).bag_ids is None  # small: every bag


def test_a_sampled_reference_is_the_full_reference_at_the_sampled_bags(fresh_inputs):
    largest = SMOKE.largest_table()
    weight = common.shared_table_weight(SMOKE.tables[largest], 0, largest)
    indices, offsets, weights = common.shared_rotation(SMOKE, largest, 0, 1, CPU)[0]
    sample = common.CheckedBags(SMOKE.batch_size, torch.tensor([0, 5, 6, 40, 63]))
    full = table_lookup64(weight, indices, offsets, "sum", weights)
    part = table_lookup64(weight, *sample.batch(indices, offsets, weights)[:2], "sum",
                          sample.batch(indices, offsets, weights)[2])
    assert torch.equal(part, full[sample.bag_ids])


@pytest.mark.parametrize("bag", ["first", "last"])
def test_a_planted_fault_in_a_sampled_bag_fails_the_sampled_check(fresh_inputs,
                                                                  small_check_budget,
                                                                  monkeypatch, bag):
    class ZeroedBag(common.PooledTable):
        def __call__(self, *args, **kwargs):
            pooled = super().__call__(*args, **kwargs).clone()
            pooled[0 if bag == "first" else -1] = 0.0  # a bag whose lookups were dropped
            return pooled

    monkeypatch.setattr(sls, "PooledTable", ZeroedBag)
    prepared = _build_lookup("sls", "embedding_bag", variant={"mode": "sum"})
    assert prepared.metrics["checked_bags"] < prepared.metrics["bags"]
    assert "exceed" in worker.check(prepared, worker.ResultRow(), "fp32")


def test_the_row_of_a_sampled_check_states_how_many_bags_it_checked(fresh_inputs,
                                                                     small_check_budget):
    task = Task(op="sls", impl="embedding_bag", workload=SMOKE, variant={"mode": "sum"},
                precision="fp32", device="cpu", isa="native", threads=1, seed=0)
    row = worker.run_task(task, WorkerSettings("sampled", FAST_POLICY))
    assert row.status == STATUS_OK, row.error
    metrics = json.loads(row.metrics)
    assert metrics["bags"] == SMOKE.batch_size and 2 <= metrics["checked_bags"] < 64


# ---------------------------------- one copy of a training model's tables (mlperf on a GPU)

def _table_storages(model) -> set[int]:
    return {source.untyped_storage().data_ptr()
            for kind, source in dlrm_reference.reference_tables(model) if kind == "dense"}


def test_concatenated_tables_are_built_in_place_and_not_copied_again():
    weights = embeddings.concatenated_table_weights(SMOKE.tables, 3, CPU)
    for index, (table, weight) in enumerate(zip(SMOKE.tables, weights)):
        assert torch.equal(weight, table_weight(table, 3, index))
    whole = embeddings.concatenated_view(weights)
    assert whole is not None and whole.data_ptr() == weights[0].data_ptr()
    assert torch.equal(whole, torch.cat([weight.clone() for weight in weights]))
    module = dlrm_model.BatchedEmbeddings(weights, sparse=True)
    assert module.bag.weight.data_ptr() == weights[0].data_ptr()  # the same memory
    # Separate tensors (or out of order) are concatenated by copying, as before.
    separate = [table_weight(table, 3, index) for index, table in enumerate(SMOKE.tables)]
    assert embeddings.concatenated_view(separate) is None
    assert embeddings.concatenated_view(weights[::-1]) is None
    assert torch.equal(embeddings.concatenated(separate), whole)


def test_a_training_check_shares_the_students_tables_and_puts_their_rows_back():
    for layout in ("per_table", "batched", "fused_sgd"):
        student = dlrm_model.build_dlrm(SMOKE, 1, embeddings=layout, sparse=True)
        tables = [weight.clone() for weight in student.embeddings.table_weights()]
        shared = dlrm_ops.table_sharing_copy(student)
        assert _table_storages(shared) == _table_storages(student)  # no table copied
        assert shared.top[0].weight.data_ptr() != student.top[0].weight.data_ptr()
        dense, indices, offsets = batch_tensors(make_batch(SMOKE, 0, 0), CPU)
        labels = torch.ones(SMOKE.batch_size)
        with dlrm_ops.restored_tables(student, indices):
            dlrm_ops.train_step(shared, torch.optim.SGD(shared.parameters(), lr=0.1), dense,
                                indices, offsets, labels)
            changed = [not torch.equal(now, before) for now, before
                       in zip(student.embeddings.table_weights(), tables)]
            assert all(changed), layout  # the step wrote the student's own rows...
        for now, before in zip(student.embeddings.table_weights(), tables):
            assert torch.equal(now, before), layout  # ...and they are back, bit for bit
        assert all(parameter.grad is None for parameter in student.parameters())


def test_a_training_check_without_the_rows_put_back_fails(monkeypatch):
    # The reference reads the student after the check: rows left stepped are a wrong start.
    monkeypatch.setattr(dlrm_ops, "restored_tables",
                        lambda model, indices: contextlib.nullcontext())
    REFERENCE_MEMO.clear()
    prepared = _build("dlrm_train", "per_table")
    assert "exceed" in worker.check(prepared, worker.ResultRow(), "fp32")


def test_a_gpus_tables_are_drawn_from_the_same_seed_and_bounds_as_the_cpus():
    # The device path draws with the device's own generator (not the CPU's stream on a GPU);
    # the draw itself, run on the CPU, is the cached weights bit for bit.
    table = SMOKE.tables[1]
    drawn = embeddings.drawn_table_weight(torch.empty(table.rows, table.dim), table.rows, 4, 1)
    assert torch.equal(drawn, table_weight(table, 4, 1))
    assert float(drawn.abs().max()) <= (1.0 / table.rows) ** 0.5


# ------------------------------------------- the whole-model check of a batch too large for it

def test_a_batchs_head_is_a_batch_of_its_first_samples():
    batch = make_batch(SMOKE, 0, 0)
    head = batch.head(5)
    assert head.batch_size == 5 and len(head.tables) == len(batch.tables)
    (dense, indices, offsets), (head_dense, head_indices, head_offsets) = (
        batch_tensors(batch, CPU), batch_tensors(head, CPU))
    assert torch.equal(head_dense, dense[:5])
    for index, table in enumerate(SMOKE.tables):
        weight = table_weight(table, 0, index)
        full = table_lookup64(weight, indices[index], offsets[index], "sum", None)
        part = table_lookup64(weight, head_indices[index], head_offsets[index], "sum", None)
        assert torch.equal(part, full[:5])
    assert batch.head(SMOKE.batch_size).tables[0].indices.size == batch.tables[0].indices.size


def test_only_a_batch_beyond_the_float64_budget_is_checked_on_its_first_samples():
    assert dlrm_batches.checked_samples(presets.kaggle()) == presets.kaggle().batch_size
    assert dlrm_batches.checked_samples(presets.mlperf()) == 2048  # the CPU's batch: all of it
    gpu_batch = dataclasses.replace(presets.mlperf(), batch_size=55_296)
    samples = dlrm_batches.checked_samples(gpu_batch)
    lookups = samples * sum(table.pooling.mean for table in gpu_batch.tables)
    assert 2 <= samples < 55_296
    assert common.check_float64_bytes(lookups, gpu_batch.total_rows, samples * 26,
                                      128) <= common.CHECK_FLOAT64_BYTES
    assert dlrm_batches.check_metrics(gpu_batch)["checked_samples"] == samples
    assert dlrm_batches.check_metrics(presets.kaggle()) == {}
    assert dlrm_batches.checked_part(make_batch(gpu_batch, 0, 0, batch_size=samples + 10),
                                     gpu_batch).batch_size == samples


@pytest.mark.parametrize("op, impl_name", [("dlrm_train", "per_table"),
                                           ("dlrm_train", "fused_sgd"),
                                           ("dlrm_infer", "batched")])
def test_above_the_budget_the_model_check_runs_on_the_first_samples(small_check_budget, op,
                                                                      impl_name):
    REFERENCE_MEMO.clear()
    prepared = _build(op, impl_name)
    samples = prepared.metrics["checked_samples"]
    assert 2 <= samples < SMOKE.batch_size
    expected = prepared.reference()
    logits = expected[0] if op == "dlrm_train" else expected
    assert logits.shape == (samples,)
    assert worker.check(prepared, worker.ResultRow(), "fp32") == ""


def test_a_planted_fault_fails_a_sampled_training_check(small_check_budget):
    REFERENCE_MEMO.clear()
    prepared = _build("dlrm_train", "per_table")
    assert prepared.metrics["checked_samples"] < SMOKE.batch_size
    plant_a_doubled_step(prepared)
    assert "exceed" in worker.check(prepared, worker.ResultRow(), "fp32")


# ------------------------------------------- one copy of an inference model's tables (a GPU)

def test_fp32_inference_times_the_teacher_itself_and_other_precisions_a_copy():
    model = teacher_model(SMOKE, 0)
    assert dlrm_ops.model_at_precision(model, "fp32", "batched", CPU) is model
    half = dlrm_ops.model_at_precision(model, "bf16", "batched", CPU)
    assert half is not model and half.top[0].weight.dtype == torch.bfloat16
    # Another device gets a copy (meta: a device without data, as a GPU is to the host).
    moved = dlrm_ops.model_at_precision(model, "fp32", "batched", torch.device("meta"))
    assert moved is not model and moved.top[0].weight.device.type == "meta"


def test_a_prepare_that_changes_its_model_gets_a_copy_of_the_teacher():
    seen = {}

    def at_precision(fp32_model, precision, layout, device):
        seen["fp32"] = fp32_model
        return dlrm_ops.model_at_precision(fp32_model, precision, layout, device)

    def prepare(model):
        seen["prepared"] = model
        return model

    prepared = dlrm_ops.build_infer(
        BuildContext(workload=SMOKE, variant={}, precision="fp32", device=CPU, seed=0,
                     options={}), "per_table", prepare=prepare, at_precision=at_precision)
    assert seen["prepared"] is not seen["fp32"]
    assert _table_storages(seen["prepared"]).isdisjoint(_table_storages(seen["fp32"]))
    assert worker.check(prepared, worker.ResultRow(), "fp32") == ""


def test_evaluation_labels_come_from_the_given_teacher_as_from_the_hosts():
    from bench.models.teacher import evaluation_batches, evaluation_set

    given = evaluation_batches(teacher_model(SMOKE, 0, embeddings="per_table"), SMOKE, 0, 2)
    for mine, cached in zip(given, evaluation_set(SMOKE, 0, 2), strict=True):
        np.testing.assert_array_equal(mine.labels, cached.labels)
        np.testing.assert_allclose(mine.probabilities, cached.probabilities, rtol=1e-12)


def test_the_teachers_predictions_are_shared_across_precisions_and_keep_no_model_alive():
    dlrm_ops.FP32_PREDICTIONS_MEMO.clear()
    hits = dlrm_ops.FP32_PREDICTIONS_MEMO.hits
    for precision in ("fp32", "bf16"):
        _build("dlrm_infer", "per_table", precision).accuracy()
    assert dlrm_ops.FP32_PREDICTIONS_MEMO.hits == hits + 1  # bf16's fp32 predictions: fp32's
    entries = list(dlrm_ops.FP32_PREDICTIONS_MEMO.entries.values())
    assert entries and all(isinstance(entry, np.ndarray) for entry in entries)
