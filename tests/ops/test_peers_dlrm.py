"""Whole-model peer impls: the DLRM on FBGEMM TBEs (fused SGD / row-wise Adagrad training,
quantized inference) and torch.compile of per_table, each checked against float64."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from bench import peers, registry
from bench.models.dlrm_reference import reference_train_step
from bench.ops.dlrm import LEARNING_RATE
from bench.records import ResultRow
from bench.registry import BuildContext, Prepared, Unsupported
from bench.run import worker
from workloads import presets

CPU = torch.device("cpu")
SMOKE = presets.smoke()
HAVE_FBGEMM = importlib.util.find_spec("fbgemm_gpu") is not None
needs_fbgemm = pytest.mark.skipif(not HAVE_FBGEMM, reason="fbgemm_gpu is not installed; "
                                  f"install the peers with: {peers.PEERS_INSTALL}")
TBE_IMPLS = [("dlrm_train", "fbgemm_tbe"), ("dlrm_train", "fbgemm_tbe_adagrad"),
             ("dlrm_infer", "fbgemm_tbe")]


def _context(precision: str, workload=SMOKE, variant=None) -> BuildContext:
    return BuildContext(workload=workload, variant=variant or {}, precision=precision,
                        device=CPU, seed=0, options={})


def _build(op: str, name: str, precision: str) -> Prepared:
    return registry.impls(op)[name].build(_context(precision))


def _check(prepared: Prepared, precision: str) -> str:
    row = ResultRow()
    message = worker.check(prepared, row, precision)
    assert message or math.isfinite(row.rel_error)
    return message


def _tbe_combinations():
    return [pytest.param(op, name, precision, id=f"{op}-{name}-{precision}")
            for op, name in TBE_IMPLS for precision in registry.impls(op)[name].precisions]


# ---------------------------------------------------------------- FBGEMM TBE

@needs_fbgemm
@pytest.mark.parametrize("op, name, precision", _tbe_combinations())
def test_tbe_impls_pass_the_worker_check(op, name, precision):
    prepared = _build(op, name, precision)
    assert _check(prepared, precision) == ""
    assert prepared.bytes_moved > 0 and prepared.flops > 0
    prepared.run()
    prepared.run()  # the timed closure cycles through the rotating batches


@needs_fbgemm
def test_tbe_training_reads_back_the_updated_rows():
    """The check's rows come from split_embedding_weights: they moved, by the SGD step."""
    from bench.models.dlrm import batch_tensors, build_dlrm
    from bench.ops.dlrm_batches import rotating_labelled_batches
    from bench.ops.dlrm_fbgemm import build_tbe_train

    prepared = build_tbe_train(_context("fp32"), "sgd", LEARNING_RATE)
    rows = prepared.check()[4]
    expected = prepared.reference()[4]
    batch = rotating_labelled_batches(SMOKE, 0, prepared.params["rotation_batches"])[0].batch
    _, indices, _ = batch_tensors(batch, CPU)
    initial = build_dlrm(SMOKE, 1, embeddings="per_table")  # the student's seed
    before = torch.cat([weight[torch.unique(table)] for weight, table
                        in zip(initial.embeddings.table_weights(), indices)]).double()
    assert rows.shape == expected.shape
    assert (rows.double() - before).abs().max() > 1e-5
    torch.testing.assert_close(rows.double() - before, expected - before, rtol=1e-4, atol=1e-7)


@needs_fbgemm
def test_tbe_reference_is_the_per_table_reference_step():
    """For SGD the TBE's float64 step is dlrm_reference.reference_train_step (plus the rows)."""
    from bench.models.dlrm import build_dlrm
    from bench.ops.dlrm_batches import model_rotation_plan, rotating_labelled_batches
    from bench.ops.dlrm_fbgemm import reference_tbe_step

    labelled = rotating_labelled_batches(
        SMOKE, 0, model_rotation_plan(SMOKE, "fp32")["rotation_batches"])[0]
    labels = torch.from_numpy(labelled.labels)
    initial = build_dlrm(SMOKE, 1, embeddings="per_table")
    ours = reference_tbe_step(initial, labelled.batch, labels, "sgd", LEARNING_RATE)
    theirs = reference_train_step(initial, labelled.batch, labels, LEARNING_RATE)
    assert len(ours) == 5
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-14)


def test_rowwise_adagrad64_is_fbgemm_definition():
    """state += mean(g^2) over the row; row -= lr g / (sqrt(state) + eps), in float64."""
    from bench.ops.dlrm_fbgemm import rowwise_adagrad64

    rows = torch.tensor([[1.0, 2.0], [0.5, -0.5]], dtype=torch.float64)
    grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    state = torch.tensor([0.5, 2.0], dtype=torch.float64)
    new_rows, new_state = rowwise_adagrad64(rows, grad, state, 0.1, 1e-8)
    assert new_state.tolist() == pytest.approx([0.5 + 12.5, 2.0])
    assert new_rows[0].tolist() == pytest.approx(
        [1.0 - 0.1 * 3.0 / (13.0 ** 0.5 + 1e-8), 2.0 - 0.1 * 4.0 / (13.0 ** 0.5 + 1e-8)])
    assert new_rows[1].tolist() == [0.5, -0.5]


@needs_fbgemm
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planted_tbe_learning_rate_times_five_fails(precision):
    from bench.ops.dlrm_fbgemm import build_tbe_train

    prepared = build_tbe_train(_context(precision), "sgd", 5 * LEARNING_RATE,
                               reference_learning_rate=LEARNING_RATE)
    assert "exceed" in _check(prepared, precision)


@needs_fbgemm
@pytest.mark.parametrize("precision", ["fp32"])
def test_planted_adagrad_wrong_eps_fails(precision):
    from bench.ops.dlrm_fbgemm import ADAGRAD_EPS, ADAGRAD_LEARNING_RATE, build_tbe_train

    prepared = build_tbe_train(_context(precision), "rowwise_adagrad", ADAGRAD_LEARNING_RATE,
                               eps=1e-3, reference_eps=ADAGRAD_EPS)
    assert "exceed" in _check(prepared, precision)


@needs_fbgemm
@pytest.mark.parametrize("precision", ["fp32"])
def test_planted_adagrad_doubled_rate_fails(precision):
    """The bound from the gradient's own error lets rows with a near-zero gradient move by
    O(lr); it must still catch a rate off by 2x on the rest."""
    from bench.ops.dlrm_fbgemm import ADAGRAD_LEARNING_RATE, build_tbe_train

    prepared = build_tbe_train(_context(precision), "rowwise_adagrad",
                               2 * ADAGRAD_LEARNING_RATE,
                               reference_learning_rate=ADAGRAD_LEARNING_RATE)
    assert "exceed" in _check(prepared, precision)


@needs_fbgemm
@pytest.mark.parametrize("precision", ["fp32"])
def test_planted_adagrad_state_not_kept_fails(monkeypatch, precision):
    """A TBE whose row-wise state is lost between steps (zeroed before each lookup): the
    checked step starts from the state a warm-up step left, so the rows and states differ."""
    from bench.ops import dlrm_fbgemm

    forward = dlrm_fbgemm.TBEEmbeddings.forward

    def forgetful(self, indices, offsets):
        if torch.is_grad_enabled():
            for state in self.row_states():
                state.zero_()
        return forward(self, indices, offsets)

    prepared = _build("dlrm_train", "fbgemm_tbe_adagrad", precision)
    monkeypatch.setattr(dlrm_fbgemm.TBEEmbeddings, "forward", forgetful)
    assert "exceed" in _check(prepared, precision)


@needs_fbgemm
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_planted_tbe_infer_row_off_by_one_fails(monkeypatch, precision):
    from bench.ops import dlrm_fbgemm

    layout = dlrm_fbgemm.tbe_inputs

    def shifted(indices, offsets):
        flat, bag_offsets = layout(indices, offsets)
        return (flat + 1).clamp(max=min(table.rows for table in SMOKE.tables) - 1), bag_offsets

    prepared = _build("dlrm_infer", "fbgemm_tbe", precision)
    monkeypatch.setattr(dlrm_fbgemm, "tbe_inputs", shifted)
    assert "exceed" in _check(prepared, precision)


@pytest.mark.parametrize("op, name", TBE_IMPLS)
def test_absent_fbgemm_is_unsupported_with_the_install_command(monkeypatch, op, name):
    real = importlib.import_module

    def no_fbgemm(module, *args, **kwargs):
        if module.startswith("fbgemm_gpu"):
            raise ImportError(f"No module named '{module}'")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(peers.importlib, "import_module", no_fbgemm)
    precision = registry.impls(op)[name].precisions[0]
    with pytest.raises(Unsupported, match="fbgemm_gpu is not available") as raised:
        _build(op, name, precision)
    assert peers.PEERS_INSTALL in str(raised.value)


@needs_fbgemm
def test_tbe_refuses_tt_variants_and_odd_dims():
    from conftest import tiny_workload

    with pytest.raises(Unsupported, match="TT-Rec"):
        registry.impls("dlrm_train")["fbgemm_tbe"].build(
            _context("fp32", variant={"tt_tables": 1, "tt_rank": 4}))
    with pytest.raises(Unsupported, match="divisible by 4"):
        registry.impls("dlrm_infer")["fbgemm_tbe"].build(
            _context("int8", workload=tiny_workload(dim=6)))


# ---------------------------------------------------------------- torch.compile

def _graphs() -> int:
    from bench.ops.dlrm_compiled import _compiled_graphs

    return _compiled_graphs()


def _assert_compiled_and_checked(prepared: Prepared, precision: str) -> None:
    assert prepared.metrics["compiled_graphs_at_build"] >= 1 or _graphs() >= 1
    assert _check(prepared, precision) == ""
    before = _graphs()
    for _ in range(prepared.params["rotation_batches"] + 1):
        prepared.run()
    assert _graphs() == before, "the timed closure compiled (the build's warm-up missed it)"


def test_compiled_infer_fp32_passes_and_times_compiled_code():
    """Not slow: the inference compile takes well under 40 s here."""
    _assert_compiled_and_checked(_build("dlrm_infer", "compiled", "fp32"), "fp32")


@pytest.mark.slow
def test_compiled_infer_bf16_passes():
    _assert_compiled_and_checked(_build("dlrm_infer", "compiled", "bf16"), "bf16")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_train_passes(precision):
    _assert_compiled_and_checked(_build("dlrm_train", "compiled", precision), precision)


@pytest.mark.slow
def test_planted_compiled_step_wrong_learning_rate_fails():
    from bench.ops.dlrm_compiled import build_compiled_train

    prepared = build_compiled_train(_context("fp32"), learning_rate=5 * LEARNING_RATE,
                                    reference_learning_rate=LEARNING_RATE)
    assert "exceed" in _check(prepared, "fp32")


def test_compiled_refuses_other_precisions_and_tt():
    with pytest.raises(Unsupported, match="fp32/bf16"):
        registry.impls("dlrm_train")["compiled"].build(_context("fp16"))
    with pytest.raises(Unsupported, match="TT-Rec"):
        registry.impls("dlrm_infer")["compiled"].build(
            _context("fp32", variant={"tt_tables": 1, "tt_rank": 4}))
