"""Peer lookup impls (FBGEMM TBE training/inference, torchrec EBC): checked against float64,
planted faults fail the check, bytes by the TBE's row format, a skip reason when absent."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

import bench.ops.sls_fbgemm as sls_fbgemm
from bench import peers, registry
from bench.ops.common import lookup_bound
from bench.ops.fbgemm_placement import placement
from bench.records import ResultRow
from bench.registry import BuildContext, Unsupported
from bench.run import worker
from conftest import tiny_workload
from workloads import presets
from workloads.specs import IndexDistribution, PoolingDistribution

CPU = torch.device("cpu")
SMOKE = presets.smoke()
KAGGLE_CAPPED = presets.kaggle().capped(1000)
HAVE_FBGEMM = importlib.util.find_spec("fbgemm_gpu") is not None
HAVE_TORCHREC = importlib.util.find_spec("torchrec") is not None
needs_fbgemm = pytest.mark.skipif(not HAVE_FBGEMM, reason="fbgemm-gpu-cpu not installed")
needs_torchrec = pytest.mark.skipif(not (HAVE_FBGEMM and HAVE_TORCHREC),
                                    reason="torchrec not installed")

TBE_IMPLS = [("fbgemm_tbe", precision) for precision in sls_fbgemm.TRAINING_PRECISIONS] + [
    ("fbgemm_tbe_infer", precision) for precision in sls_fbgemm.INFERENCE_PRECISIONS]


def _params(modes_of=None):
    """(op, impl, precision, mode) of every peer lookup impl, each marked with its package;
    modes_of(op) limits the modes (default: sum, mean and weighted for sls)."""
    modes_of = modes_of or (lambda op: ("sum", "mean", "weighted") if op == "sls" else ("sum",))
    combos = []
    for op in ("sls", "sls_multi"):
        for impl_name, precision in TBE_IMPLS:
            combos += [pytest.param(op, impl_name, precision, mode, marks=needs_fbgemm,
                                    id=f"{op}-{impl_name}-{precision}-{mode}")
                       for mode in modes_of(op)]
    combos.append(pytest.param("sls_multi", "torchrec_ebc", "fp32", "sum", marks=needs_torchrec,
                               id="sls_multi-torchrec_ebc-fp32-sum"))
    return combos


def _build(op, impl_name, precision, mode="sum", workload=SMOKE):
    context = BuildContext(workload=workload, variant={"mode": mode}, precision=precision,
                           device=CPU, seed=0, options={})
    return registry.impls(op)[impl_name].build(context)


def _verdict(prepared, precision) -> str:
    return worker.check(prepared, ResultRow(), precision)


# ---------------------------------------------------------------- correct against float64

@pytest.mark.parametrize("workload, op, impl_name, precision, mode", [
    pytest.param(SMOKE, *combo.values, marks=combo.marks, id=f"smoke-{combo.id}")
    for combo in _params()] + [
    # Kaggle pools one row a bag: its mean and weighted bags would add nothing to sum.
    pytest.param(KAGGLE_CAPPED, *combo.values, marks=combo.marks, id=f"kaggle-capped-{combo.id}")
    for combo in _params(lambda op: ("sum",))])
def test_peer_impl_passes_the_worker_check(workload, op, impl_name, precision, mode):
    prepared = _build(op, impl_name, precision, mode, workload)
    assert _verdict(prepared, precision) == ""
    assert registry.refusal(registry.impls(op)[impl_name], {"mode": mode}, precision, "cpu",
                            {}) is None
    assert prepared.params["rotation_batches"] > 1
    # Timing cycles through distinct batches: the next call looks up other rows.
    first, second = prepared.run(), prepared.run()
    assert first.shape == second.shape and not torch.equal(first, second)


@needs_fbgemm
@pytest.mark.parametrize("impl_name, precision", TBE_IMPLS)
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
def test_tbe_variable_pooling_zipf(impl_name, precision, mode):
    """Bags of varying length (some empty) and skewed ids, three tables of unequal rows."""
    workload = tiny_workload(pooling=PoolingDistribution("lognormal", 5.0, 0.7),
                             distribution=IndexDistribution("zipf", 1.1), batch_size=40)
    assert _verdict(_build("sls", impl_name, precision, mode, workload), precision) == ""
    if mode == "sum":
        assert _verdict(_build("sls_multi", impl_name, precision, mode, workload),
                        precision) == ""


# ---------------------------------------------------------------- planted faults

def _shift_rows(monkeypatch, cls, index_argument: str = "indices"):
    """Every lookup through cls.forward reads the next row (wrapping in the smallest table)."""
    real = cls.forward

    def bugged(self, *args, **kwargs):
        if index_argument == "features":  # torchrec: a KeyedJaggedTensor
            features = args[0]
            rows = min(bag.num_embeddings for bag in self.embedding_bags.values())
            shifted = type(features)(keys=features.keys(), values=(features.values() + 1) % rows,
                                     offsets=features.offsets())
            return real(self, shifted)
        rows = min(spec[1] if isinstance(spec[0], str) else spec[0]
                   for spec in self.embedding_specs)
        indices, offsets, *rest = args
        return real(self, (indices + 1) % rows, offsets, *rest, **kwargs)

    monkeypatch.setattr(cls, "forward", bugged)


def _tbe_class(impl_name):
    if impl_name == "fbgemm_tbe":
        return importlib.import_module(
            "fbgemm_gpu.split_table_batched_embeddings_ops_training"
        ).SplitTableBatchedEmbeddingBagsCodegen
    return importlib.import_module(
        "fbgemm_gpu.split_table_batched_embeddings_ops_inference"
    ).IntNBitTableBatchedEmbeddingBagsCodegen


@pytest.mark.parametrize("op, impl_name, precision, mode", _params())
def test_indices_shifted_by_one_row_fail(monkeypatch, op, impl_name, precision, mode):
    if impl_name == "torchrec_ebc":
        _shift_rows(monkeypatch, importlib.import_module("torchrec").EmbeddingBagCollection,
                    "features")
    else:
        _shift_rows(monkeypatch, _tbe_class(impl_name))
    message = _verdict(_build(op, impl_name, precision, mode), precision)
    assert "exceed" in message, message


@needs_fbgemm
@pytest.mark.parametrize("impl_name, precision", TBE_IMPLS)
def test_mean_pooled_as_sum_fails(monkeypatch, impl_name, precision):
    """The mean variant reaching the TBE as a sum (the pooling mode dropped)."""
    monkeypatch.setattr(sls_fbgemm, "_pooling",
                        lambda fbgemm, mode: fbgemm.common.PoolingMode.SUM)
    message = _verdict(_build("sls", impl_name, precision, "mean"), precision)
    assert "exceed" in message, message


@needs_fbgemm
@pytest.mark.parametrize("impl_name, precision", TBE_IMPLS)
def test_dropped_per_sample_weights_fail(monkeypatch, impl_name, precision):
    cls = _tbe_class(impl_name)
    real = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, indices, offsets, per_sample_weights=None:
                        real(self, indices, offsets, None))
    message = _verdict(_build("sls", impl_name, precision, "weighted"), precision)
    assert "exceed" in message, message


@needs_fbgemm
@pytest.mark.parametrize("op", ["sls", "sls_multi"])
def test_int8_table_with_int4_grade_rows_fails(monkeypatch, op):
    """An int8 TBE filled from rows first rounded to 16 levels: int4-grade error must fail the
    int8 bound (the bound is tight enough to tell the two formats apart)."""
    quantize = importlib.import_module("fbgemm_gpu.tbe.utils.quantize")
    real = quantize.quantize_embs

    def coarse(weight, weight_ty, *args):
        minimum = weight.min(dim=1, keepdim=True).values
        step = (weight.max(dim=1, keepdim=True).values - minimum).clamp(min=1e-30) / 15
        return real(torch.round((weight - minimum) / step) * step + minimum, weight_ty, *args)

    monkeypatch.setattr(quantize, "quantize_embs", coarse)
    message = _verdict(_build(op, "fbgemm_tbe_infer", "int8"), "int8")
    assert "exceed" in message, message


@needs_fbgemm
@pytest.mark.parametrize("op", ["sls", "sls_multi"])
def test_tables_in_the_wrong_order_fail(monkeypatch, op):
    """The TBE's split weights filled in reverse table order (sls: a row-reversed table)."""
    real = sls_fbgemm.TrainingTables.__init__

    def reversed_tables(self, fbgemm, weights, precision, mode, where):
        flipped = [weight.flip(0) for weight in weights] if len(weights) == 1 else weights[::-1]
        if len(weights) > 1:  # same shapes needed: pad or cut to each slot's rows
            flipped = [source[: target.shape[0]] if source.shape[0] >= target.shape[0] else
                       torch.cat([source, target[source.shape[0]:]])
                       for source, target in zip(flipped, weights)]
        real(self, fbgemm, flipped, precision, mode, where)

    monkeypatch.setattr(sls_fbgemm.TrainingTables, "__init__", reversed_tables)
    message = _verdict(_build(op, "fbgemm_tbe", "fp32"), "fp32")
    assert "exceed" in message, message


# ---------------------------------------------------------------- bounds and bytes

@needs_fbgemm
def test_tbe_int8_bound_counts_its_fp16_scale_and_bias():
    """The TBE's int8 rows carry an fp16 scale/bias pair, so their bound is wider than that of
    torch's int8 rows (fp32 pair), and narrower than an int4 bound."""
    table = (torch.rand(50, 8) - 0.5) * 0.1
    indices, offsets = torch.arange(50), torch.arange(0, 50, 5)
    tbe = sls_fbgemm.tbe_lookup_bound(table, indices, offsets, "sum", None, "int8")
    torch_int8 = lookup_bound(table, indices, offsets, "sum", None, "int8")
    int4 = sls_fbgemm.tbe_lookup_bound(table, indices, offsets, "sum", None, "int4")
    assert (tbe > torch_int8).all() and (tbe < int4 / 4).all()


@needs_fbgemm
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("scale", [0.1, 1e-3, 4.4e-4])  # 4.4e-4: a 20M-row table's spread
def test_tbe_quantization_error_holds_and_is_tight(precision, scale):
    """Each row's bound holds for FBGEMM's actual quantization of it, and is reached within 2x.
    Small tables' int8 scales are fp16 subnormals: the error then grows far past half a step."""
    generator = torch.Generator().manual_seed(0)
    table = (torch.rand(2000, 64, generator=generator) - 0.5) * scale
    tables = sls_fbgemm.InferenceTables(sls_fbgemm._fbgemm(), [table], precision, "sum",
                                        placement(CPU))
    error = (tables(torch.arange(2000), torch.arange(2001)).double()
             - table.double()).abs().amax(dim=1, keepdim=True)
    allowed = sls_fbgemm.tbe_quantization_error(table.double(), precision)
    assert (error <= allowed).all()
    assert (error / allowed).max() > 0.5
    spread = table.double().amax(dim=1, keepdim=True) - table.double().amin(dim=1, keepdim=True)
    half_step = spread / (2 ** (8 if precision == "int8" else 4) - 1) / 2
    if precision == "int8" and scale < 1e-2:
        assert (error / half_step).max() > 3


@needs_fbgemm
@pytest.mark.parametrize("impl_name, precision, row_bytes", [
    ("fbgemm_tbe", "fp32", 8 * 4), ("fbgemm_tbe", "fp16", 8 * 2),
    ("fbgemm_tbe_infer", "fp16", 8 * 2),
    ("fbgemm_tbe_infer", "int8", 8 + 4),  # dim bytes + fp16 scale and bias
    ("fbgemm_tbe_infer", "int4", 8 // 2 + 4)])
@pytest.mark.parametrize("mode", ["sum", "weighted"])
def test_tbe_bytes_follow_the_stored_row(impl_name, precision, row_bytes, mode):
    prepared = _build("sls", impl_name, precision, mode)
    table = SMOKE.tables[SMOKE.largest_table()]
    lookups = SMOKE.batch_size * table.pooling.mean  # smoke pools a fixed count
    output_bytes = {"fp32": 4, "fp16": 2}.get(precision, 4)
    weight_bytes = 4 if mode == "weighted" else 0
    assert prepared.params["row_bytes"] == row_bytes
    assert prepared.params["tbe"].endswith("(HOST, CPU)")  # tables in host memory, CPU kernels
    assert prepared.bytes_moved == pytest.approx(
        lookups * (row_bytes + 8 + weight_bytes)
        + SMOKE.batch_size * (8 + table.dim * output_bytes))
    assert prepared.flops == pytest.approx(lookups * table.dim * (2 if weight_bytes else 1))
    assert prepared.params["table_bytes"] == table.rows * row_bytes


# ---------------------------------------------------------------- absent packages

@pytest.mark.parametrize("op, impl_name, precision", [
    ("sls", "fbgemm_tbe", "fp32"), ("sls", "fbgemm_tbe_infer", "int8"),
    ("sls_multi", "fbgemm_tbe", "fp16"), ("sls_multi", "fbgemm_tbe_infer", "int4"),
    ("sls_multi", "torchrec_ebc", "fp32")])
@pytest.mark.parametrize("how", ["require", "import"])
def test_absent_peer_raises_unsupported_with_the_install_command(monkeypatch, op, impl_name,
                                                                 precision, how):
    if how == "require":
        def absent(module):
            raise Unsupported(f"{module} is not available; install the peers with: "
                              f"{peers.PEERS_INSTALL}")
        monkeypatch.setattr(peers, "require", absent)
    else:  # the real require, over an import that fails as a missing wheel does
        real = importlib.import_module

        def failing(name, *args):
            if name.split(".")[0] in ("fbgemm_gpu", "torchrec"):
                raise ModuleNotFoundError(f"No module named '{name}'")
            return real(name, *args)
        monkeypatch.setattr(peers.importlib, "import_module", failing)
    with pytest.raises(Unsupported) as raised:
        _build(op, impl_name, precision)
    assert peers.PEERS_INSTALL in str(raised.value)
    assert "not available" in str(raised.value)
