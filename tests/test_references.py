"""Planted bugs: each op's float64 reference rejects a wrong impl and passes a right one."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

import bench.models.dlrm
import bench.models.quantized
import bench.ops.dlrm
import bench.ops.fc
import bench.ops.gemm_linear
import bench.ops.interaction
import bench.ops.sls
import bench.models.onednn
import bench.models.ttrec.tt_embedding
from bench import references, registry
from bench.run import worker
from bench.ops.common import PooledTable
from bench.registry import BuildContext
from bench.records import ResultRow
from workloads import presets

CPU = torch.device("cpu")
SMOKE = presets.smoke()
TT_VARIANT = {"tt_tables": 1, "tt_rank": 4}  # the largest smoke table as TT, 9% cache hits


def _checked(op: str, impl_name: str, variant: dict, precision: str) -> tuple[str, ResultRow]:
    """The suite's own verdict on a freshly built impl: (failure message or '', its row)."""
    context = BuildContext(workload=SMOKE, variant=variant, precision=precision, device=CPU,
                           seed=0, options={})
    prepared = registry.impls(op)[impl_name].build(context)
    row = ResultRow()
    return worker.check(prepared, row, precision), row


# ---------------------------------------------------------------- planted bugs

def _row_off_by_one(monkeypatch):
    """Every pooled-table lookup reads the next row (quantized and float tables alike)."""
    real = PooledTable.__call__

    def bugged(self, indices, offsets, mode="sum", weights=None):
        return real(self, (indices + 1) % self.rows, offsets, mode, weights)

    monkeypatch.setattr(PooledTable, "__call__", bugged)


def _wrong_pooling(monkeypatch):
    """Sum pools as mean, mean as sum, and per-sample weights are dropped."""
    real = PooledTable.__call__

    def bugged(self, indices, offsets, mode="sum", weights=None):
        return real(self, indices, offsets, "mean" if mode == "sum" and weights is None
                    else "sum", None)

    monkeypatch.setattr(PooledTable, "__call__", bugged)


def _concatenated_rows_shifted(monkeypatch):
    """Ids shifted into the concatenated table land one row early (a row-start slip)."""
    real = bench.models.dlrm.flatten_tables

    def bugged(indices, offsets, row_starts):
        shifted, bag_starts = real(indices, offsets, row_starts)
        return (shifted - 1).clamp(min=0), bag_starts

    for module in (bench.models.dlrm, bench.ops.sls, bench.models.quantized):
        monkeypatch.setattr(module, "flatten_tables", bugged)


def _swapped_output_neurons(monkeypatch):
    """The executed copy of an MLP has its first layer's first two output neurons swapped."""
    real = bench.ops.fc.at_precision

    def bugged(module, precision, device):
        first = next(layer for layer in module if isinstance(layer, torch.nn.Linear))
        swapped = torch.nn.Linear(first.in_features, first.out_features)
        with torch.no_grad():
            order = torch.arange(first.out_features)
            order[0], order[1] = 1, 0
            swapped.weight.copy_(first.weight[order])
            swapped.bias.copy_(first.bias[order])
        layers = [swapped if layer is first else layer for layer in module]
        return real(torch.nn.Sequential(*layers), precision, device)

    monkeypatch.setattr(bench.ops.fc, "at_precision", bugged)
    monkeypatch.setattr(bench.ops.dlrm, "at_precision", bugged)


def _final_relu_dropped(monkeypatch):
    """The executed copy of an MLP loses its last ReLU."""
    real = bench.ops.fc.at_precision

    def bugged(module, precision, device):
        layers = list(module)
        if isinstance(layers[-1], torch.nn.ReLU):
            layers[-1] = torch.nn.Identity()
        return real(torch.nn.Sequential(*layers), precision, device)

    monkeypatch.setattr(bench.ops.fc, "at_precision", bugged)


def _interaction_pairs_swapped(monkeypatch):
    """The dot interaction gathers pair (1, 0) where (2, 0) belongs and vice versa."""
    real = bench.models.dlrm.DotInteraction.__init__

    def bugged(self, num_features):
        real(self, num_features)
        self.pairs[[0, 1]] = self.pairs[[1, 0]].clone()

    monkeypatch.setattr(bench.models.dlrm.DotInteraction, "__init__", bugged)


def _cat_tables_reversed(monkeypatch):
    """The concat interaction puts the tables' vectors in reverse order."""
    def bugged(self, dense, pooled):
        return bench.models.dlrm.stack_features(dense, pooled.flip(1)).flatten(1)

    monkeypatch.setattr(bench.models.dlrm.CatInteraction, "forward", bugged)


def _fused_learning_rate_5x(monkeypatch):
    """The fused SGD update applies 5x the learning rate (a same-code reference missed it)."""
    real = bench.models.dlrm._LookupWithSGD.backward

    def bugged(context, grad_output):
        context.learning_rate = 5 * context.learning_rate
        return real(context, grad_output)

    monkeypatch.setattr(bench.models.dlrm._LookupWithSGD, "backward", staticmethod(bugged))


def _optimizer_learning_rate_5x(monkeypatch):
    """The training step's optimizer runs at five times the learning rate."""
    real = torch.optim.SGD

    def bugged(parameters, lr, **options):
        return real(parameters, lr=5 * lr, **options)

    monkeypatch.setattr(torch.optim, "SGD", bugged)


def _tt_last_digit_off_by_one(monkeypatch):
    """TT reconstruction selects the next slice of the last core (a digit off by one)."""
    real = bench.models.ttrec.tt_embedding.reconstruct_tt_rows

    def bugged(cores, row_ids, row_factors):
        last = row_factors[-1]
        shifted = row_ids - row_ids % last + (row_ids + 1) % last
        return real(cores, shifted, row_factors)

    monkeypatch.setattr(bench.models.ttrec.tt_embedding, "reconstruct_tt_rows", bugged)


def _tt_middle_core_dropped(monkeypatch):
    """TT reconstruction ignores the middle core's digit (always its first slice)."""
    real = bench.models.ttrec.tt_embedding.reconstruct_tt_rows

    def bugged(cores, row_ids, row_factors):
        cores = list(cores)
        middle = len(cores) // 2
        cores[middle] = cores[middle][:, :1].expand_as(cores[middle])
        return real(cores, row_ids, row_factors)

    monkeypatch.setattr(bench.models.ttrec.tt_embedding, "reconstruct_tt_rows", bugged)


def _onednn_bias_dropped(monkeypatch):
    """oneDNN Linear layers compute x W^T without their bias."""
    function = bench.models.onednn._OneDnnLinearFunction
    real = function.forward

    def bugged(context, inputs, weight, bias):
        return real(context, inputs, weight, None if bias is None else torch.zeros_like(bias))

    monkeypatch.setattr(function, "forward", staticmethod(bugged))


def _onednn_weight_gradient_doubled(monkeypatch):
    """oneDNN Linear layers return twice their weight gradient."""
    function = bench.models.onednn._OneDnnLinearFunction
    real = function.backward

    def bugged(context, grad_output):
        grad_inputs, grad_weight, grad_bias = real(context, grad_output)
        return grad_inputs, None if grad_weight is None else 2 * grad_weight, grad_bias

    monkeypatch.setattr(function, "backward", staticmethod(bugged))


def _fused_last_digit_off_by_one(monkeypatch):
    """The fused TT kernel reads the next slice of the last core."""
    real = bench.models.ttrec.tt_embedding.stacked_digits

    def bugged(row_ids, row_factors):
        digits = real(row_ids, row_factors).clone()
        digits[-1] = (digits[-1] + 1) % row_factors[-1]
        return digits

    monkeypatch.setattr(bench.models.ttrec.tt_embedding, "stacked_digits", bugged)


def _fused_backward_first_core_dropped(monkeypatch):
    """The fused TT backward returns no gradient for the first core."""
    from bench.models.ttrec.fused import FusedTTRows

    real = FusedTTRows.backward

    def bugged(ctx, grad_rows):
        grads = real(ctx, grad_rows)
        return (grads[0], None, *grads[2:])

    monkeypatch.setattr(FusedTTRows, "backward", staticmethod(bugged))


def _matmul_operands_swapped(monkeypatch):
    """The GEMM probe computes B @ A instead of A @ B."""
    real_mm, real_int_mm = torch.mm, torch._int_mm
    monkeypatch.setattr(torch, "mm", lambda left, right: real_mm(right, left))
    monkeypatch.setattr(torch, "_int_mm", lambda left, right: real_int_mm(right, left))


def _linear_outputs_rolled(monkeypatch):
    """The Linear probe's outputs come out one column off (every precision's kernel)."""
    real_at_precision = bench.ops.gemm_linear.at_precision

    class Rolled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs):
            return torch.roll(self.inner(inputs), 1, dims=1)

    def rolled(module, precision, device):
        return Rolled(real_at_precision(module, precision, device))

    monkeypatch.setattr(bench.ops.gemm_linear, "at_precision", rolled)


# (op, impl, variant, precisions, bug): each bug must fail the suite's check at each precision.
DENSE_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
PLANTED = [
    ("sls", "embedding_bag", {"mode": "sum"}, DENSE_PRECISIONS, _row_off_by_one),
    ("sls", "embedding_bag", {"mode": "weighted"}, DENSE_PRECISIONS, _row_off_by_one),
    ("sls", "embedding_bag", {"mode": "sum"}, DENSE_PRECISIONS, _wrong_pooling),
    ("sls", "embedding_bag", {"mode": "mean"}, DENSE_PRECISIONS, _wrong_pooling),
    ("sls", "embedding_bag", {"mode": "weighted"}, DENSE_PRECISIONS, _wrong_pooling),
    ("sls", "huge_pages", {"mode": "sum"}, DENSE_PRECISIONS, _row_off_by_one),
    ("sls", "huge_pages", {"mode": "weighted"}, DENSE_PRECISIONS, _wrong_pooling),
    ("sls_multi", "per_table", {"mode": "sum"}, DENSE_PRECISIONS, _row_off_by_one),
    ("sls_multi", "batched_huge_pages", {"mode": "sum"}, DENSE_PRECISIONS,
     _concatenated_rows_shifted),
    ("sls_multi", "batched", {"mode": "sum"}, DENSE_PRECISIONS, _concatenated_rows_shifted),
    ("fc", "torch_linear", {"layer": "linear"}, ("fp32", "fp16", "bf16", "int8"),
     _swapped_output_neurons),
    ("fc", "torch_linear", {"layer": "top_mlp"}, ("fp32", "bf16", "int8"),
     _swapped_output_neurons),
    ("fc", "torch_linear", {"layer": "bottom_mlp"}, ("fp32", "bf16", "int8"), _final_relu_dropped),
    ("fc", "onednn", {"layer": "top_mlp"}, ("fp32",), _swapped_output_neurons),
    ("fc", "onednn", {"layer": "bottom_mlp"}, ("fp32",), _onednn_bias_dropped),
    ("dlrm_infer", "onednn", {}, ("fp32",), _onednn_bias_dropped),
    ("dlrm_infer", "onednn", {}, ("fp32",), _interaction_pairs_swapped),
    ("dlrm_train", "onednn", {}, ("fp32",), _onednn_weight_gradient_doubled),
    ("dlrm_train", "onednn", {}, ("fp32",), _interaction_pairs_swapped),
    ("interaction", "dot", {}, FLOAT_PRECISIONS, _interaction_pairs_swapped),
    ("interaction", "cat", {}, FLOAT_PRECISIONS, _cat_tables_reversed),
    ("dlrm_infer", "per_table", {}, DENSE_PRECISIONS, _interaction_pairs_swapped),
    ("dlrm_infer", "batched", {}, DENSE_PRECISIONS, _interaction_pairs_swapped),
    ("dlrm_infer", "per_table", {}, ("int8", "int4"), _row_off_by_one),
    ("dlrm_infer", "batched", {}, ("int8", "int4"), _concatenated_rows_shifted),
    ("dlrm_infer", "batched", {}, ("fp32", "bf16"), _concatenated_rows_shifted),
    ("dlrm_infer", "per_table", {}, ("int8", "int4"), _swapped_output_neurons),
    ("dlrm_infer", "batched", TT_VARIANT, FLOAT_PRECISIONS, _tt_last_digit_off_by_one),
    ("dlrm_train", "fused_sgd", {}, FLOAT_PRECISIONS, _fused_learning_rate_5x),
    ("dlrm_train", "per_table", {}, FLOAT_PRECISIONS, _optimizer_learning_rate_5x),
    ("dlrm_train", "batched", {}, FLOAT_PRECISIONS, _concatenated_rows_shifted),
    ("dlrm_train", "fused_sgd", {}, FLOAT_PRECISIONS, _concatenated_rows_shifted),
    ("dlrm_train", "per_table", {}, FLOAT_PRECISIONS, _interaction_pairs_swapped),
    ("dlrm_train", "per_table", TT_VARIANT, FLOAT_PRECISIONS, _tt_last_digit_off_by_one),
    ("dlrm_train", "batched", TT_VARIANT, FLOAT_PRECISIONS, _tt_middle_core_dropped),
    ("tt_sls", "tt_cached", {"rank": 16}, FLOAT_PRECISIONS, _tt_last_digit_off_by_one),
    ("tt_sls", "tt_uncached", {"rank": 16}, FLOAT_PRECISIONS, _tt_last_digit_off_by_one),
    ("tt_sls", "tt_cached", {"rank": 16}, FLOAT_PRECISIONS, _tt_middle_core_dropped),
    ("tt_sls", "tt_uncached", {"rank": 16}, FLOAT_PRECISIONS, _tt_middle_core_dropped),
    ("tt_sls", "dense", {"rank": 16}, FLOAT_PRECISIONS, _row_off_by_one),
    ("tt_sls", "tt_fused", {"rank": 16}, FLOAT_PRECISIONS, _fused_last_digit_off_by_one),
    ("tt_sls", "tt_cached_lru", {"rank": 16}, FLOAT_PRECISIONS, _tt_last_digit_off_by_one),
    ("dlrm_train", "tt_fused", TT_VARIANT, FLOAT_PRECISIONS, _fused_last_digit_off_by_one),
    ("dlrm_train", "tt_fused", TT_VARIANT, ("fp32",), _fused_backward_first_core_dropped),
    ("gemm_peak", "matmul", {"size": 64}, ("fp32", "fp16", "bf16", "int8"),
     _matmul_operands_swapped),
    ("gemm_peak", "linear", {"size": 64}, ("fp32", "fp16", "bf16", "int8"),
     _linear_outputs_rolled),
]


# Measured on smoke: the int8-MLP model's own error is 0.070 against float64 at int8 and int4
# alike; these bugs raise it to 0.15-0.17, above int8's whole-model bound (0.15) but far below
# int4's (0.3). Tightening the int4 whole-model tolerance fixes it; strict, so the fix shows here.
INT4_WHOLE_MODEL_GAP = pytest.mark.xfail(
    strict=True, reason="dlrm_infer's int4 whole-model tolerance 0.3 passes a bug that "
                        "moves the logits' relative error from 0.070 to 0.15-0.17")
WHOLE_MODEL_GAPS = {"_interaction_pairs_swapped", "_row_off_by_one", "_concatenated_rows_shifted"}


def _planted_cases() -> list:
    cases = []
    for op, impl_name, variant, precisions, bug in PLANTED:
        for precision in precisions:
            label = "-".join([op, impl_name, *(str(value) for value in variant.values()),
                              precision, bug.__name__.strip("_")])
            gap = (op == "dlrm_infer" and precision == "int4"
                   and bug.__name__ in WHOLE_MODEL_GAPS)
            cases.append(pytest.param(op, impl_name, variant, precision, bug, id=label,
                                      marks=[INT4_WHOLE_MODEL_GAP] if gap else []))
    return cases


def _unbugged_cases() -> list:
    cases, seen = [], set()
    for op, impl_name, variant, precisions, _ in PLANTED:
        for precision in precisions:
            key = (op, impl_name, tuple(variant.items()), precision)
            if key not in seen:
                seen.add(key)
                cases.append(pytest.param(op, impl_name, variant, precision, id="-".join(
                    [op, impl_name, *(str(value) for value in variant.values()), precision])))
    return cases


@pytest.mark.parametrize("op, impl_name, variant, precision", _unbugged_cases())
def test_unbugged_impl_passes_the_check(op, impl_name, variant, precision):
    message, row = _checked(op, impl_name, variant, precision)
    assert message == "", message
    assert math.isfinite(row.rel_error)


@pytest.mark.parametrize("op, impl_name, variant, precision, bug", _planted_cases())
def test_planted_bug_fails_the_check(monkeypatch, op, impl_name, variant, precision, bug):
    bug(monkeypatch)
    message, row = _checked(op, impl_name, variant, precision)
    assert message, (f"{bug.__name__} passed the {precision} check "
                     f"(relative error {row.rel_error:.3g})")


# Peer impls (FBGEMM, torchrec, torch.compile) and the GPU impls (Triton, CUDA graphs) plant
# their bugs in their own test files, named from tests/.
PEER_TESTS = {"bench.ops.sls_fbgemm": "ops/test_peers_sls.py",
              "bench.ops.sls_torchrec": "ops/test_peers_sls.py",
              "bench.ops.dlrm_fbgemm": "ops/test_peers_dlrm.py",
              "bench.ops.dlrm_compiled": "ops/test_peers_dlrm.py",
              "bench.ops.sls_triton": "models/test_triton_tbe.py",
              "bench.ops.dlrm_triton": "ops/test_dlrm_triton.py",
              "bench.ops.ttrec_triton": "models/test_tt_triton.py",
              "bench.ops.dlrm_cuda_graph": "ops/test_cuda_graph.py"}


def test_planted_bugs_cover_every_op_and_impl():
    """Every registered impl of a checked op has a planted bug (ceilings: see membw tests)."""
    covered = {(op, impl_name) for op, impl_name, *_ in PLANTED}
    for op in registry.ops():
        for impl_name, implementation in registry.impls(op).items():
            if op == "membw":
                continue
            peer_tests = PEER_TESTS.get(implementation.build.__module__)
            if peer_tests:
                text = (Path(__file__).parent / peer_tests).read_text(encoding="utf-8")
                assert "planted" in text.lower() and f'"{impl_name}"' in text, (op, impl_name)
            else:
                assert (op, impl_name) in covered, f"{op}/{impl_name} has no planted bug"


@pytest.mark.parametrize("impl_name, bug", [
    ("copy", "half_copied"),
    ("read", "half_summed"),
])
def test_membw_planted_bug_fails_the_check(monkeypatch, impl_name, bug):
    context = BuildContext(workload=SMOKE, variant={"bytes": 4096}, precision="fp32", device=CPU,
                           seed=0, options={})
    prepared = registry.impls("membw")[impl_name].build(context)
    assert worker.check(prepared, ResultRow(), "fp32") == ""
    # Patched after the build: the probe's own buffers are made by the real ops.
    if bug == "half_copied":
        real_copy = torch.Tensor.copy_

        def copy_half(self, source, non_blocking=False):
            half = self.numel() // 2
            real_copy(self.view(-1)[:half], source.reshape(-1)[:half])
            self.view(-1)[half:] = 0
            return self

        monkeypatch.setattr(torch.Tensor, "copy_", copy_half)
    else:
        real_sum = torch.Tensor.sum
        monkeypatch.setattr(torch.Tensor, "sum",
                            lambda self, *arguments, **options:
                            real_sum(self[: self.numel() // 2], *arguments, **options))
    message = worker.check(prepared, ResultRow(), "fp32")
    monkeypatch.undo()
    assert message


# ---------------------------------------------------------------- the reference helpers

def test_pool_rows64_by_brute_force():
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    positions = torch.tensor([0, 3, 3, 6, 1, 2, 2, 2, 5])
    offsets = torch.tensor([0, 3, 3, 4, 9])  # bag 1 and the last bag are empty
    weights = torch.rand(9, generator=generator)
    for mode, use_weights in (("sum", False), ("mean", False), ("sum", True)):
        expected = torch.zeros(5, 5, dtype=torch.float64)
        bounds = offsets.tolist() + [positions.numel()]
        for bag in range(5):
            members = range(bounds[bag], bounds[bag + 1])
            for member in members:
                scale = float(weights[member]) if use_weights else 1.0
                expected[bag] += scale * rows[positions[member]]
            if mode == "mean" and len(members):
                expected[bag] /= len(members)
        actual = references.pool_rows64(rows, positions, offsets, mode,
                                        weights if use_weights else None)
        assert torch.allclose(actual, expected, atol=1e-12), mode


def test_dot_interaction64_by_brute_force():
    dense = torch.randn(3, 4, dtype=torch.float64)
    pooled = torch.randn(3, 2, 4, dtype=torch.float64)
    output = references.dot_interaction64(dense, pooled)
    features = [dense] + [pooled[:, table] for table in range(2)]
    pairs = [(features[i] * features[j]).sum(1) for i in range(3) for j in range(i)]
    expected = torch.cat([dense] + [pair.unsqueeze(1) for pair in pairs], dim=1)
    assert torch.allclose(output, expected, atol=1e-12)


@pytest.mark.parametrize("row_factors, dim_factors, ranks", [
    ((3, 4, 5), (2, 3, 2), (1, 2, 3, 1)),
    ((7, 6), (4, 2), (1, 5, 1)),
    ((2, 3, 2, 3), (1, 2, 2, 3), (1, 2, 2, 3, 1)),
])
def test_tt_rows64_by_brute_force(row_factors, dim_factors, ranks):
    generator = torch.Generator().manual_seed(5)
    cores = [torch.randn(ranks[k], row_factors[k], dim_factors[k], ranks[k + 1],
                         generator=generator, dtype=torch.float64)
             for k in range(len(row_factors))]
    row_ids = torch.arange(math.prod(row_factors))
    actual = references.tt_rows64(cores, row_ids, row_factors)
    for row in row_ids.tolist():
        digits = []
        remaining = row
        for factor in reversed(row_factors):
            digits.insert(0, remaining % factor)
            remaining //= factor
        for columns in itertools.product(*(range(size) for size in dim_factors)):
            column = 0
            for size, value in zip(dim_factors, columns):
                column = column * size + value
            product = torch.ones(1, 1, dtype=torch.float64)
            for core, digit, value in zip(cores, digits, columns):
                product = product @ core[:, digit, value, :]
            assert actual[row, column].item() == pytest.approx(product.item(), abs=1e-12)


@pytest.mark.parametrize("chunk_rows", [7, references.TT_CHUNK_ROWS])
def test_tt_rows64_matches_the_module_layout(monkeypatch, chunk_rows):
    """The reference and the module agree on which column of a row is which, in chunks too."""
    from bench.models.ttrec import TTEmbeddingBag

    monkeypatch.setattr(references, "TT_CHUNK_ROWS", chunk_rows)
    module = TTEmbeddingBag(60, 12, rank=3, row_factors=(3, 4, 5), dim_factors=(2, 3, 2),
                            cache_policy="none", dtype=torch.float64)
    rows = torch.arange(60)
    assert torch.allclose(references.tt_rows64(list(module.cores), rows, module.row_factors),
                          module.full_weight().detach(), atol=1e-12)


def test_sgd_update_and_bce():
    parameter = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    loss = references.binary_cross_entropy64(parameter, torch.tensor([1.0, 0.0]))
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d/dz mean(softplus(z) - y z) = (sigmoid(z) - y) / 2
    gradient = [(1 / (1 + math.exp(-1.0)) - 1) / 2, (1 / (1 + math.exp(2.0))) / 2]
    (updated,) = references.sgd_update([parameter], 0.1)
    assert updated.tolist() == pytest.approx([1.0 - 0.1 * gradient[0], -2.0 - 0.1 * gradient[1]])
