"""The Triton TBE through Triton's interpreter on the CPU: pooled lookups against float64 at
every storage precision and pooling mode, planted faults fail, the fused SGD step equals the
explicit float64 update (duplicate ids included), and the sls / sls_multi impls pass the check."""

from __future__ import annotations


import pytest
from conftest import triton_interpreter

# triton.jit picks the interpreter when it decorates, so the variable must be set before the
# kernel module is imported; it is put back afterwards, and set per test by the fixture below,
# so that CLI subprocesses of other test modules never inherit it.
with triton_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")
    from bench.models import triton_tbe, triton_tbe_kernels  # noqa: E402

import dataclasses  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from conftest import FAST_POLICY, tiny_workload  # noqa: E402

from bench import registry  # noqa: E402
from bench.compare_outputs import UNDERFLOW, UNIT_ROUNDOFF, compare  # noqa: E402
from bench.ops import sls_triton  # noqa: E402
from bench.ops.common import PooledTable, lookup_bound  # noqa: E402
from bench.records import ResultRow  # noqa: E402
from bench.references import table_lookup64  # noqa: E402
from bench.registry import BuildContext, Unsupported  # noqa: E402
from bench.run import worker  # noqa: E402
from bench.run.settings import WorkerSettings  # noqa: E402
from bench.run.tasks import Task  # noqa: E402

CPU = torch.device("cpu")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
MODES = ("sum", "mean", "weighted")
ROWS, DIM, BATCH = (300, 120, 50), 12, 8


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 while a test runs: the impls build on the CPU only with it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_were_built_for_the_interpreter():
    assert triton_tbe_kernels.INTERPRETED


def _tables(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(rows, DIM, generator=generator) * 2 - 1 for rows in ROWS]


def _inputs(seed: int = 1):
    """Table-major inputs: bags of 0-6 lookups (empty bags and repeated ids included)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 7, (len(ROWS) * BATCH,), generator=generator)
    lengths[3] = 0
    indices = torch.cat([torch.randint(0, ROWS[bag // BATCH], (int(length),), generator=generator)
                         for bag, length in enumerate(lengths)])
    indices[1] = indices[0]  # a row twice in one bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    weights = torch.rand(indices.numel(), generator=generator) * 2 - 1
    return indices, offsets, weights


def _per_table(indices, offsets, weights, table):
    """One table's indices, bag starts (re-based) and weights from the table-major input."""
    bags = offsets[table * BATCH:(table + 1) * BATCH + 1]
    start, end = int(bags[0]), int(bags[-1])
    return indices[start:end], bags[:-1] - start, weights[start:end]


def _reference_and_bound(tables, indices, offsets, weights, mode, precision):
    """[batch, tables * dim] float64 lookups (index_add pooling) and the project's bound."""
    pool = "sum" if mode == "weighted" else mode
    expected, bounds = [], []
    for table, weight in enumerate(tables):
        table_indices, starts, table_weights = _per_table(indices, offsets, weights, table)
        table_weights = table_weights if mode == "weighted" else None
        expected.append(table_lookup64(weight, table_indices, starts, pool, table_weights))
        bounds.append(lookup_bound(weight, table_indices, starts, pool, table_weights, precision))
    return torch.cat(expected, dim=1), torch.cat(bounds, dim=1)


def _lookup(precision, mode, tables=None, inputs=None):
    tables = tables or _tables()
    indices, offsets, weights = inputs or _inputs()
    module = triton_tbe.TritonTableBatchedEmbeddingBag(tables, precision,
                                                       "sum" if mode == "weighted" else mode)
    output = module(indices, offsets, weights if mode == "weighted" else None)
    expected, bound = _reference_and_bound(tables, indices, offsets, weights, mode, precision)
    return module, output, expected, bound


# ---------------------------------------------------------------- forward against float64

@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mode", MODES)
def test_forward_matches_float64_within_the_bound(precision, mode):
    module, output, expected, bound = _lookup(precision, mode)
    assert output.shape == (BATCH, len(ROWS) * DIM)
    assert output.dtype == triton_tbe.FLOAT_STORAGE.get(precision, torch.float32)
    comparison = compare(output, expected, bound)
    assert comparison.passed, comparison.describe()
    empty = 3  # table 0, sample 3
    assert torch.equal(output[empty, :DIM].float(), torch.zeros(DIM))
    for kind in ("zero_bag", "swap_rows", "one_nan"):
        planted = output.detach().clone()
        if kind == "zero_bag":
            planted[1] = 0
        elif kind == "swap_rows":
            planted[[1, 2]] = planted[[2, 1]]
        else:
            planted.view(-1)[planted.numel() // 2] = float("nan")
        if kind == "one_nan":
            with pytest.raises(ValueError, match="NaN"):
                compare(planted, expected, bound)
        else:
            assert not compare(planted, expected, bound).passed, kind


def test_a_shifted_table_start_fails_the_check():
    """A planted kernel-input fault: table 1 reads one row past its start."""
    tables = _tables()
    indices, offsets, weights = _inputs()
    module = triton_tbe.TritonTableBatchedEmbeddingBag(tables, "fp32")
    module.table_rows[1] += 1
    expected, bound = _reference_and_bound(tables, indices, offsets, weights, "sum", "fp32")
    assert not compare(module(indices, offsets), expected, bound).passed


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_rows_decode_as_the_project_format(precision):
    """Single-row bags equal PooledTable's quantized:: lookup of the same fp32 table."""
    weight = _tables()[2]
    indices = torch.arange(weight.shape[0])
    offsets = torch.arange(weight.shape[0] + 1)
    module = triton_tbe.TritonTableBatchedEmbeddingBag([weight], precision)
    theirs = PooledTable(weight, precision, CPU)(indices, offsets[:-1])
    torch.testing.assert_close(module(indices, offsets), theirs, rtol=1e-6, atol=1e-6)
    assert module.bytes_per_row == PooledTable(weight, precision, CPU).bytes_per_row


# ---------------------------------------------------------------- fused SGD

def _explicit_sgd64(tables, indices, offsets, grad, weights, mode, learning_rate):
    """Every table after w[r] -= lr * coefficient * grad[bag] for each lookup, in float64."""
    updated = [table.double() for table in tables]
    lengths = offsets[1:] - offsets[:-1]
    for bag in range(lengths.numel()):
        table, sample = divmod(bag, BATCH)
        for lookup in range(int(offsets[bag]), int(offsets[bag + 1])):
            coefficient = (float(weights[lookup]) if mode == "weighted"
                           else 1.0 / int(lengths[bag]) if mode == "mean" else 1.0)
            row = int(indices[lookup])
            updated[table][row] -= (learning_rate * coefficient
                                    * grad[sample, table * DIM:(table + 1) * DIM].double())
    return updated


def _sgd_bound(tables, indices, offsets, grad, weights, mode, learning_rate, expected, precision):
    """|stored - float64| per element: the update's fp32 accumulation ((n + 2) u32 of the
    summed |terms|, n the row's lookups), fp32 arithmetic, and rounding into storage."""
    magnitude = _explicit_sgd64([torch.zeros_like(table) for table in tables], indices, offsets,
                                -grad.abs(), weights.abs(), mode, learning_rate)
    counts = [torch.bincount(_per_table(indices, offsets, weights, table)[0],
                             minlength=rows).double() for table, rows in enumerate(ROWS)]
    storage = UNIT_ROUNDOFF.get(precision, 0.0)
    return [((count[:, None] + 4) * UNIT_ROUNDOFF["fp32"] * (size + table.double().abs())
             + max(storage, UNIT_ROUNDOFF["fp32"]) * value.abs() + UNDERFLOW[precision])
            for count, size, table, value in zip(counts, magnitude, tables, expected)]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_sgd_equals_the_explicit_float64_update(precision, mode):
    indices, offsets, weights = _inputs()
    stored = [table.to(triton_tbe.FLOAT_STORAGE[precision]).float() for table in _tables()]
    module = triton_tbe.TritonTableBatchedEmbeddingBag(stored, precision,
                                                       "sum" if mode == "weighted" else mode,
                                                       learning_rate=0.5)
    grad = torch.rand(BATCH, len(ROWS) * DIM, generator=torch.Generator().manual_seed(2)) - 0.5
    sample_weights = weights if mode == "weighted" else None
    # Through autograd: the loss's gradient is grad; the backward runs the fused step.
    output = module(indices, offsets, sample_weights)
    assert output.requires_grad and not list(module.parameters())
    (output.float() * grad).sum().backward()
    # The backward receives the gradient in the output's dtype: the update is exact for that.
    received = grad.to(output.dtype).float()
    expected = _explicit_sgd64(stored, indices, offsets, received, weights, mode, 0.5)
    bound = _sgd_bound(stored, indices, offsets, received, weights, mode, 0.5, expected,
                       precision)
    actual = module.table_weights()
    for table, (after, before, want, limit) in enumerate(zip(actual, stored, expected, bound)):
        comparison = compare(after, want, limit)
        assert comparison.passed, f"table {table}: {comparison.describe()}"
        looked_up = torch.zeros(before.shape[0], dtype=torch.bool)
        looked_up[_per_table(indices, offsets, weights, table)[0]] = True
        assert torch.equal(after[~looked_up].float(), before[~looked_up])  # untouched rows
        assert not torch.equal(after[looked_up].float(), before[looked_up])


def test_sgd_without_summing_duplicates_fails_the_check(monkeypatch):
    """A planted fault: each distinct row takes only its first lookup's gradient."""
    real = triton_tbe.sgd_plan

    def first_lookup_only(*args):
        rows, starts, ends, order, grad_starts, coefficients = real(*args)
        return rows, starts, starts + 1, order, grad_starts, coefficients

    monkeypatch.setattr(triton_tbe, "sgd_plan", first_lookup_only)
    indices, offsets, weights = _inputs()
    tables = _tables()
    module = triton_tbe.TritonTableBatchedEmbeddingBag(tables, "fp32")
    grad = torch.rand(BATCH, len(ROWS) * DIM, generator=torch.Generator().manual_seed(2)) - 0.5
    module.fused_sgd_step(indices, offsets, grad, learning_rate=0.5)
    expected = _explicit_sgd64(tables, indices, offsets, grad, weights, "sum", 0.5)
    bound = _sgd_bound(tables, indices, offsets, grad, weights, "sum", 0.5, expected, "fp32")
    assert not all(compare(after, want, limit).passed
                   for after, want, limit in zip(module.table_weights(), expected, bound))


def test_quantized_tables_refuse_a_learning_rate():
    with pytest.raises(ValueError, match="inference"):
        triton_tbe.TritonTableBatchedEmbeddingBag(_tables(), "int8", learning_rate=0.1)


def test_bad_inputs_are_refused():
    indices, offsets, weights = _inputs()
    module = triton_tbe.TritonTableBatchedEmbeddingBag(_tables(), "fp32", "mean")
    with pytest.raises(ValueError, match="sum pooling"):
        module(indices, offsets, weights)
    with pytest.raises(ValueError, match="tables \\* batch \\+ 1"):
        module(indices, offsets[:-1])
    with pytest.raises(TypeError, match="int64"):
        module(indices.int(), offsets)


# ---------------------------------------------------------------- the ops' impls

def _context(precision, mode="sum", workload=None):
    return BuildContext(workload=workload or tiny_workload(), variant={"mode": mode},
                        precision=precision, device=CPU, seed=0, options={})


IMPL_CASES = ([("sls", precision, "sum") for precision in PRECISIONS]
              + [("sls", precision, mode) for precision in ("fp16", "int8")
                 for mode in ("mean", "weighted")]
              + [("sls_multi", precision, "sum") for precision in PRECISIONS])


@pytest.mark.parametrize("op, precision, mode", IMPL_CASES)
def test_impl_passes_the_worker_check_and_planted_faults_fail(op, precision, mode):
    prepared = registry.impls(op)["triton_tbe"].build(_context(precision, mode))
    row = ResultRow()
    assert worker.check(prepared, row, precision) == ""
    assert prepared.params["triton_interpreter"] is True
    output = prepared.check()
    zero, swap = ((0, 1), (0, 2)) if op == "sls_multi" else ((1,), (2,))
    for kind in ("zero_bag", "swap_rows", "one_nan"):
        planted = output.detach().clone(memory_format=torch.contiguous_format)
        if kind == "zero_bag":
            planted[zero] = 0
        elif kind == "swap_rows":
            first = planted[zero].clone()
            planted[zero], planted[swap] = planted[swap], first
        else:
            planted.view(-1)[planted.numel() // 2] = float("nan")
        faulty = dataclasses.replace(prepared, check=lambda planted=planted: planted)
        message = worker.check(faulty, ResultRow(), precision)
        assert message, f"{kind} passed the check"
        assert ("NaN" in message) if kind == "one_nan" else ("error bound exceeded" in message)


def test_impl_runs_timed_through_run_task():
    task = Task(op="sls_multi", impl="triton_tbe", workload=tiny_workload(),
                variant={"mode": "sum"}, precision="bf16", device="cpu", isa="native",
                threads=1, seed=0, options={})
    row = worker.run_task(task, WorkerSettings("r", FAST_POLICY))
    assert row.status == "ok", row.error
    assert json.loads(row.params)["launches_per_call"] == 1


def test_cpu_without_the_interpreter_is_a_skip_row_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    task = Task(op="sls", impl="triton_tbe", workload=tiny_workload(), variant={"mode": "sum"},
                precision="fp32", device="cpu", isa="native", threads=1, seed=0, options={})
    row = worker.run_task(task, WorkerSettings("r", FAST_POLICY))
    assert (row.status, row.error) == ("skipped", sls_triton.CPU_SKIP)


def test_kernels_imported_without_the_interpreter_are_refused_on_cpu(monkeypatch):
    monkeypatch.setattr(triton_tbe_kernels, "INTERPRETED", False)
    with pytest.raises(Unsupported, match="imported before TRITON_INTERPRET"):
        registry.impls("sls")["triton_tbe"].build(_context("fp32"))


def test_odd_dim_int4_is_unsupported():
    workload = tiny_workload(dim=7)
    with pytest.raises(Unsupported, match="even embedding dim"):
        registry.impls("sls_multi")["triton_tbe"].build(_context("int4", workload=workload))
