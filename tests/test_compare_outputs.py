"""Per-row error bounds: correct kernels pass, a zeroed bag, swapped rows or one NaN fail."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from conftest import tiny_workload

from bench import registry
from bench.run import worker
from bench.run.settings import WorkerSettings
from bench.compare_outputs import (WHOLE_MODEL_ROW_TOLERANCE, compare, quantization_error,
                                   relative_error, relative_row_bound, rowwise_adagrad_bound,
                                   summed_gradient_error, whole_model_bound)
from bench.registry import BuildContext, Prepared, Unsupported
from bench.records import ResultRow
from bench.run.tasks import Task
from workloads import presets
from workloads.specs import IndexDistribution, PoolingDistribution

CPU = torch.device("cpu")
SMOKE = presets.smoke()
WHOLE_MODEL_OPS = ("dlrm_infer", "dlrm_train")

CASES = [
    ("sls", "embedding_bag", {"mode": "sum"}),
    ("sls", "embedding_bag", {"mode": "mean"}),
    ("sls", "embedding_bag", {"mode": "weighted"}),
    ("sls_multi", "per_table", {"mode": "sum"}),
    ("sls_multi", "batched", {"mode": "sum"}),
    ("fc", "torch_linear", {"layer": "linear"}),
    ("fc", "torch_linear", {"layer": "bottom_mlp"}),
    ("fc", "torch_linear", {"layer": "top_mlp"}),
    ("interaction", "dot", {}),
    ("interaction", "cat", {}),
    ("dlrm_infer", "per_table", {}),
    ("dlrm_infer", "batched", {}),
    ("dlrm_train", "batched", {}),
    ("tt_sls", "tt_cached", {"rank": 16}),
    ("tt_sls", "tt_uncached", {"rank": 16}),
    ("tt_sls", "dense", {"rank": 16}),
]


def _cases():
    params = []
    for op, impl_name, variant in CASES:
        for precision in registry.impls(op)[impl_name].precisions:
            label = "-".join([op, impl_name, *map(str, variant.values()), precision])
            params.append(pytest.param(op, impl_name, variant, precision, id=label))
    return params


def _build(op, impl_name, variant, precision, workload=SMOKE) -> Prepared:
    context = BuildContext(workload=workload, variant=variant, precision=precision, device=CPU,
                           seed=0, options={})
    return registry.impls(op)[impl_name].build(context)


def _with_output(prepared: Prepared, output) -> Prepared:
    """The same check with a planted output in place of the kernel's."""
    return dataclasses.replace(prepared, check=lambda: output, run=lambda: output)


def _first_part(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first_part(value, part):
    return (part,) + tuple(value[1:]) if isinstance(value, tuple) else part


def _fault_rows(op: str, expected: torch.Tensor) -> tuple[tuple, tuple]:
    """(row to zero, row to swap it with), as indices into the leading dims.

    Lookup, FC and interaction outputs: rows 1 and 2 (non-empty bags here). Whole-model
    outputs may be off by their noise in every row, so a fault is planted where it moves the
    output beyond that noise: the row of largest magnitude, swapped with the farthest from it.
    """
    flat = expected.reshape(expected.shape[0], -1) if expected.dim() > 1 else expected[:, None]
    if op in WHOLE_MODEL_OPS:
        values = flat[:, 0] if flat.shape[1] == 1 else flat.norm(dim=1)
        largest = int(values.abs().argmax())
        return (largest,), (int((values - values[largest]).abs().argmax()),)
    if op == "sls_multi":  # [tables, bags, dim]: one bag of the first table
        return (0, 1), (0, 2)
    return (1,), (2,)


def _planted(output: torch.Tensor, kind: str, zero_row, swap_row) -> torch.Tensor:
    planted = output.detach().clone()
    if kind == "zero_bag":
        planted[zero_row] = 0
    elif kind == "swap_rows":
        first, second = planted[zero_row].clone(), planted[swap_row].clone()
        planted[zero_row], planted[swap_row] = second, first
    elif kind == "one_nan":
        planted.view(-1)[planted.numel() // 2] = float("nan")
    return planted


def _prepare(op, impl_name, variant, precision) -> Prepared:
    try:
        return _build(op, impl_name, variant, precision)
    except Unsupported as reason:
        assert (op == "fc" and precision == "int4") or (
            op == "dlrm_train" and precision in ("int8", "int4")), str(reason)
        pytest.skip(str(reason))


@pytest.mark.parametrize("op, impl_name, variant, precision", _cases())
def test_real_kernel_passes_and_planted_faults_fail(op, impl_name, variant, precision):
    prepared = _prepare(op, impl_name, variant, precision)
    output = (prepared.check or prepared.run)()
    row = ResultRow()
    assert worker.check(_with_output(prepared, output), row, precision) == ""
    ratio = json.loads(row.metrics)["error_bound_ratio"]
    assert 0 <= ratio <= 1 and math.isfinite(row.rel_error)
    expected = _first_part(prepared.reference()).double()
    zero_row, swap_row = _fault_rows(op, expected)
    first = _first_part(output)
    for kind in ("zero_bag", "swap_rows", "one_nan"):
        planted = _replace_first_part(output, _planted(first, kind, zero_row, swap_row))
        faulty = ResultRow()
        message = worker.check(_with_output(prepared, planted), faulty, precision)
        assert message, f"{kind} passed the check"
        if kind == "one_nan":
            assert "NaN" in message
        else:
            assert "error bound exceeded at row" in message
            assert json.loads(faulty.metrics)["error_bound_ratio"] > 1


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_one_zeroed_bag_of_2048_fails_where_the_global_l2_passes(precision):
    workload = tiny_workload(rows=(4000,), dim=16, batch_size=2048,
                             pooling=PoolingDistribution("fixed", 20.0))
    prepared = _build("sls", "embedding_bag", {"mode": "sum"}, precision, workload)
    assert worker.check(prepared, ResultRow(), precision) == ""
    planted = prepared.check().clone()
    planted[1000] = 0
    # The old check alone: one bag of 2048 moves the relative L2 by about 1/sqrt(2048).
    assert relative_error(planted, prepared.reference()) <= registry.TOLERANCE[precision]
    message = worker.check(_with_output(prepared, planted), ResultRow(), precision)
    assert re.search(r"error bound exceeded at row 1000\b", message), message
    assert "bound" in message and "|error|" in message


@pytest.mark.parametrize("op, impl_name", [("sls", "embedding_bag"), ("sls_multi", "batched")])
def test_one_percent_of_bags_zeroed_fails_at_int4(op, impl_name):
    workload = tiny_workload(rows=(3000, 2000), dim=16, batch_size=1000,
                             pooling=PoolingDistribution("fixed", 30.0))
    prepared = _build(op, impl_name, {"mode": "sum"}, "int4", workload)
    assert worker.check(prepared, ResultRow(), "int4") == ""
    planted = prepared.check().clone()
    bags = planted[0] if op == "sls_multi" else planted
    bags[::100] = 0  # 10 of 1000 bags
    assert relative_error(planted, prepared.reference()) <= registry.TOLERANCE["int4"]
    assert "error bound exceeded" in worker.check(_with_output(prepared, planted),
                                                   ResultRow(), "int4")


@pytest.mark.parametrize("precision", registry.PRECISIONS)
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
def test_zipf_bags_with_repeated_rows(precision, mode):
    """Hot rows repeat within a bag (their stored error repeats too): still within the bound,
    and a zeroed bag still fails."""
    workload = tiny_workload(rows=(3000,), dim=16, batch_size=512,
                             pooling=PoolingDistribution("lognormal", 40.0, 0.7),
                             distribution=IndexDistribution("zipf", 1.1))
    prepared = _build("sls", "embedding_bag", {"mode": mode}, precision, workload)
    assert worker.check(prepared, ResultRow(), precision) == ""
    planted = prepared.check().clone()
    planted[7] = 0
    message = worker.check(_with_output(prepared, planted), ResultRow(), precision)
    assert re.search(r"error bound exceeded at row 7\b", message), message


LONG_BAGS = tiny_workload(rows=(5000,), dim=16, batch_size=64,
                          pooling=PoolingDistribution("fixed", 200.0))


def test_bf16_accumulation_of_long_bags_fails():
    """A kernel summing 200 lookups in bf16 (not fp32) is outside the bound by design."""
    from bench.ops.common import table_weight
    from workloads.generators import rotating_table_batches

    prepared = _build("sls", "embedding_bag", {"mode": "sum"}, "bf16", LONG_BAGS)
    table = LONG_BAGS.tables[0]
    weight = table_weight(table, 0, 0).to(torch.bfloat16)
    batch = rotating_table_batches(LONG_BAGS, 0, 0, prepared.params["rotation_batches"])[0]
    indices = torch.from_numpy(batch.indices)
    bounds = torch.from_numpy(batch.offsets).tolist() + [indices.numel()]
    bags = []
    for start, end in zip(bounds, bounds[1:]):
        total = torch.zeros(table.dim, dtype=torch.bfloat16)
        for index in indices[start:end]:
            total = total + weight[index]  # every partial sum rounded to bf16
        bags.append(total)
    planted = torch.stack(bags)
    assert worker.check(prepared, ResultRow(), "bf16") == ""
    assert "error bound exceeded" in worker.check(_with_output(prepared, planted), ResultRow(),
                                                   "bf16")


# ---------------------------------------------------------------- the comparison itself

def test_compare_names_the_worst_row_error_and_bound():
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    actual = expected.clone()
    actual[0, 1] += 0.05
    actual[1, 0] += 0.2
    result = compare(actual, expected, 0.1)
    assert not result.passed
    assert (result.row, result.element) == (1, (1, 0))
    assert result.error == pytest.approx(0.2) and result.bound == pytest.approx(0.1)
    assert result.ratio == pytest.approx(2.0)
    assert result.rel_error == pytest.approx(relative_error(actual, expected))
    assert "row 1" in result.describe() and "0.2" in result.describe()
    # Within the bound everywhere: passes, ratio is the worst element's.
    assert compare(expected + 0.05, expected, 0.1).ratio == pytest.approx(0.5)
    # A per-row bound broadcasts along the row.
    per_row = torch.tensor([[0.01], [0.3], [0.01]], dtype=torch.float64)
    assert compare(actual, expected, per_row).row == 0


def test_compare_zero_bound_demands_exact_and_parts_are_checked():
    expected = torch.zeros(4, 3, dtype=torch.float64)
    assert compare(expected.float(), expected, 0.0).passed
    nudged = expected.clone()
    nudged[2, 1] = 1e-30
    assert compare(nudged, expected, 0.0).ratio == math.inf
    parts = compare((expected, nudged), (expected, expected), (1.0, 1e-31))
    assert parts.part == 1 and parts.row == 2 and not parts.passed
    with pytest.raises(ValueError, match="NaN"):
        compare(torch.full((4, 3), math.nan), expected, 1.0)
    with pytest.raises(ValueError, match="shape"):
        compare(torch.zeros(4, 2), expected, 1.0)
    with pytest.raises(ValueError, match="parts"):
        compare((expected,), (expected, expected), (1.0, 1.0))


def test_relative_row_bound_and_whole_model_bound_by_hand():
    expected = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    # Row RMS: sqrt(12.5) and 0; the whole output's RMS is sqrt(6.25) = 2.5.
    bound = relative_row_bound(expected, 0.1, floor_fraction=0.1)
    assert bound[0].tolist() == pytest.approx([0.1 * math.sqrt(12.5)] * 2)
    assert bound[1].tolist() == pytest.approx([0.1 * 0.25] * 2)
    tolerance = WHOLE_MODEL_ROW_TOLERANCE["int8"]
    whole = whole_model_bound(expected, "int8")
    assert whole[0, 0].item() == pytest.approx(tolerance * (math.sqrt(12.5) + 2.5))
    assert whole[1, 0].item() == pytest.approx(tolerance * 2.5)
    assert relative_row_bound(torch.tensor(2.0, dtype=torch.float64), 0.5).item() == 1.0


@pytest.mark.parametrize("precision, pack, lookup", [
    ("int8", "embedding_bag_byte_prepack", "embedding_bag_byte_rowwise_offsets"),
    ("int4", "embedding_bag_4bit_prepack", "embedding_bag_4bit_rowwise_offsets"),
])
def test_quantization_error_bounds_the_real_dequantization(precision, pack, lookup):
    rows = torch.empty(300, 16).uniform_(-0.2, 0.3, generator=torch.Generator().manual_seed(3))
    packed = getattr(torch.ops.quantized, pack)(rows)
    identity = torch.arange(300)
    dequantized = getattr(torch.ops.quantized, lookup)(packed, identity, identity, False, 0,
                                                       False, None, None, False)
    error = (dequantized.double() - rows.double()).abs()
    bound = quantization_error(rows.double(), precision)
    assert (error <= bound).all()
    # Not loose: round to nearest reaches close to half a step in some element of a row.
    assert (error.max(dim=1).values / bound.squeeze(1)).max() > 0.9


def test_run_task_records_the_ratio(fast_policy):
    task = Task(op="sls", impl="embedding_bag", workload=SMOKE, variant={"mode": "sum"},
                precision="int8", device="cpu", isa="native", threads=1, seed=0, options={})
    row = worker.run_task(task, WorkerSettings("r", fast_policy))
    assert row.status == "ok", row.error
    metrics = json.loads(row.metrics)
    assert 0 < metrics["error_bound_ratio"] <= 1
    assert "noisy" in metrics  # the timing metrics are still there


def test_fp16_subnormal_table_values_pass():
    """A 100k-row table holds values near 1e-5, below fp16's smallest normal (6.1e-5): the
    rounding there is absolute (2^-25), which a purely relative u|x| would call an error."""
    workload = tiny_workload(rows=(100_000,), dim=16, batch_size=256,
                             pooling=PoolingDistribution("fixed", 1.0))
    prepared = _build("sls", "embedding_bag", {"mode": "sum"}, "fp16", workload)
    assert worker.check(prepared, ResultRow(), "fp16") == ""
    planted = prepared.check().clone()
    planted[3] = 0
    assert "error bound exceeded" in worker.check(_with_output(prepared, planted), ResultRow(),
                                                   "fp16")


# ---------------------------------------------------------------- row-wise Adagrad


def _adagrad(rows, grad, state, learning_rate, eps=1e-8):
    """Row-wise Adagrad in float64 (FBGEMM's definition): updated rows and states."""
    new_state = state + grad.pow(2).mean(dim=1)
    return rows - learning_rate * grad / (new_state.sqrt() + eps).unsqueeze(1), new_state


def test_adagrad_bound_holds_for_any_gradient_error_within_delta():
    """Rows of every kind (near-zero, normal, with and without state), gradients perturbed up
    to their error bound in random and worst-aligned directions: always within the bound."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(400, 16, generator=generator, dtype=torch.float64) * 0.01
    scale = 10.0 ** torch.randint(-9, -2, (400, 1), generator=generator).double()
    grad = torch.randn(400, 16, generator=generator, dtype=torch.float64) * scale
    state = torch.where(torch.arange(400) % 2 == 0, 0.0,
                        torch.rand(400, generator=generator, dtype=torch.float64) * 1e-6)
    delta = torch.full_like(grad, 1e-7) * torch.rand(400, 1, generator=generator,
                                                     dtype=torch.float64)
    expected = _adagrad(rows, grad, state, 0.1)
    bound = rowwise_adagrad_bound(rows, grad, state, delta, 0.1, 1e-8)
    for trial in range(20):
        signs = (torch.randint(0, 2, grad.shape, generator=generator) * 2 - 1).double()
        magnitude = delta if trial % 2 else delta * torch.rand(grad.shape, generator=generator,
                                                               dtype=torch.float64)
        perturbed = grad + signs * magnitude if trial % 4 else grad - grad.sign() * delta
        assert compare(_adagrad(rows, perturbed, state, 0.1), expected, bound).passed


def test_adagrad_bound_lets_a_near_zero_gradient_row_move_by_order_lr():
    """A row whose gradient is within its error is moved by about lr either way: tolerated."""
    rows, state = torch.zeros(1, 8, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    grad = torch.full((1, 8), 1e-6, dtype=torch.float64)
    flipped = -grad  # within a gradient error of 3e-6: the kernel's gradient points back
    expected = _adagrad(rows, grad, state, 0.1)
    actual = _adagrad(rows, flipped, state, 0.1)
    assert (actual[0] - expected[0]).abs().min() > 0.19  # 2 lr: the update changed sign
    bound = rowwise_adagrad_bound(rows, grad, state, torch.full_like(grad, 3e-6), 0.1, 1e-8)
    assert compare(actual, expected, bound).passed


def test_adagrad_bound_fails_a_doubled_rate_dropped_state_and_wrong_eps_on_normal_rows():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(64, 16, generator=generator, dtype=torch.float64) * 0.01
    grad = torch.randn(64, 16, generator=generator, dtype=torch.float64) * 1e-4
    state = torch.full((64,), 1e-8, dtype=torch.float64)
    expected = _adagrad(rows, grad, state, 0.1)
    # The gradient's error: 1e-4 of its magnitude, as an fp32 whole-model bound makes it.
    bound = rowwise_adagrad_bound(rows, grad, state, 1e-4 * grad.abs().max() + 0 * grad, 0.1,
                                  1e-8)
    assert compare(_adagrad(rows, grad * (1 + 1e-6), state, 0.1), expected, bound).passed
    assert not compare(_adagrad(rows, grad, state, 0.2), expected, bound).passed
    assert not compare(_adagrad(rows, grad, 0 * state, 0.1), expected, bound).passed
    assert not compare(_adagrad(rows, grad, state, 0.1, eps=1e-3), expected, bound).passed


def test_summed_gradient_error_adds_each_lookups_bag_error():
    bag_error = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]], dtype=torch.float64)
    upstream = torch.zeros(3, 2, dtype=torch.float64)
    owners, positions = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 0, 0])
    error = summed_gradient_error(bag_error, upstream, owners, positions, 3)
    assert error.tolist() == [[111.0, 222.0], [10.0, 20.0], [0.0, 0.0]]
    upstream = torch.ones(3, 2, dtype=torch.float64)
    error = summed_gradient_error(0 * bag_error, upstream, owners, positions, 3)
    assert error[0].tolist() == pytest.approx([5 * 3 * 2.0 ** -24] * 2)  # (L + 2) u sum |g|
