"""Byte and FLOP formulas against independent counts of what each op's closure touches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_workload
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench import registry
from bench.models.dlrm import flops_per_sample
from bench.ops import common, dlrm_batches
from bench.ops.common import PooledTable
from bench.ops.dlrm import model_at_precision
from bench.registry import BuildContext
from bench.models.teacher import teacher_model
from bench.models.ttrec import TTEmbeddingBag
from workloads import presets
from workloads.specs import IndexDistribution, PoolingDistribution

CPU = torch.device("cpu")
SMOKE = presets.smoke()
ZIPF = IndexDistribution("zipf", 1.05)
LOGNORMAL = PoolingDistribution("lognormal", 6.0, 0.7)
EXACT = 1e-9  # formulas and counts are both exact integers (or means of them)


def _build(op, impl_name, workload, variant, precision):
    context = BuildContext(workload=workload, variant=variant, precision=precision, device=CPU,
                           seed=0, options={})
    return registry.impls(op)[impl_name].build(context)


def _matches(formula: float, counted: float) -> bool:
    return abs(formula - counted) <= EXACT * max(abs(counted), 1.0)


@pytest.fixture
def few_rotations(monkeypatch):
    """Short rotations, so a test can run every rotating call."""
    monkeypatch.setattr(common, "MAX_ROTATION_BATCHES", 5)
    monkeypatch.setattr(common, "MAX_ROTATION_MODEL_BATCHES", 3)


def _rotating_calls(prepared) -> list:
    """The partials a cycling closure rotates through, read without running them."""
    rotation = prepared.params["rotation_batches"]
    if rotation == 1:
        return [prepared.run]
    upcoming = prepared.run.__closure__[0].cell_contents  # cycling's itertools.cycle
    return [next(upcoming) for _ in range(rotation)]


def _nbytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


# ---------------------------------------------------------------- weights as stored

def _state_dict_weight_bytes(module: torch.nn.Module) -> int:
    """Weights from the state dict: packed int8 Linears as (int8 weight, fp32 bias) plus one
    scale/zero-point pair; the dynamic modules' output scale and zero point are never read."""
    total = 0
    for name, value in module.state_dict().items():
        if name.endswith("_packed_params._packed_params"):
            weight, bias = value
            total += weight.int_repr().nbytes + bias.nbytes + 8
        elif isinstance(value, torch.Tensor) and not name.endswith(("scale", "zero_point")):
            total += value.nbytes
    # Non-persistent buffers (the interaction's pair index) are read but not in the state dict.
    total += sum(buffer.nbytes for name, buffer in module.named_buffers()
                 if name not in module.state_dict())
    return total


def _named_parameter_bytes(module: torch.nn.Module) -> int:
    """The planted formula: parameters only (empty for dynamic int8 Linears)."""
    return sum(parameter.nbytes for parameter in module.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_stored_weight_bytes_match_the_state_dict(precision):
    from bench.models.dlrm import mlp
    from bench.ops.fc import at_precision, stored_weight_bytes

    module = at_precision(mlp(14, (16, 8, 1), False, seed=0), precision, CPU)
    counted = _state_dict_weight_bytes(module)
    by_widths = {"fp32": 4, "bf16": 2, "int8": 1}[precision] * (14 * 16 + 16 * 8 + 8 * 1) + (
        {"fp32": 4, "bf16": 2, "int8": 4}[precision] * (16 + 8 + 1)) + (
        3 * 8 if precision == "int8" else 0)
    assert stored_weight_bytes(module) == counted == by_widths
    if precision == "int8":  # planted: dynamic int8 Linears have no parameters
        assert _named_parameter_bytes(module) == 0 != counted


# ---------------------------------------------------------------- fc

def _closure_values(function) -> list:
    return [cell.cell_contents for cell in function.__closure__]


def _fc_counted(prepared) -> tuple[int, int]:
    """(weights, activations) bytes: state dict, plus input and each layer's output (hooks)."""
    values = _closure_values(prepared.run)
    module = next(value for value in values if isinstance(value, torch.nn.Module))
    inputs = next(value for value in values if isinstance(value, torch.Tensor))
    outputs = []
    hooks = [layer.register_forward_hook(lambda _, args, output: outputs.append(output))
             for layer in module.modules() if "Linear" in type(layer).__name__]
    prepared.run()
    for hook in hooks:
        hook.remove()
    return _state_dict_weight_bytes(module), inputs.nbytes + _nbytes(outputs)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("layer", ["linear", "bottom_mlp", "top_mlp"])
def test_fc_bytes_match_what_the_forward_touches(precision, layer):
    prepared = _build("fc", "torch_linear", SMOKE, {"layer": layer}, precision)
    weights, activations = _fc_counted(prepared)
    assert _matches(prepared.bytes_moved, weights + activations)
    # Planted: the weights-only formula (no biases, int8 at 1 byte and nothing else) fails.
    widths = prepared.params["widths"]
    weights_only = sum(a * b for a, b in zip(widths, widths[1:])) * (
        {"fp32": 4, "bf16": 2, "int8": 1}[precision])
    assert not _matches(weights_only + activations, weights + activations)


def test_fc_flops_match_the_flop_counter():
    prepared = _build("fc", "torch_linear", SMOKE, {"layer": "top_mlp"}, "fp32")
    with FlopCounterMode(display=False) as counter:
        prepared.run()
    assert prepared.flops == counter.get_total_flops()


# ---------------------------------------------------------------- sls and sls_multi

def _row_bytes(table: PooledTable) -> int:
    """Bytes of one stored row: the packed width (values plus scale and bias) when quantized."""
    return table.weight.shape[1] * table.weight.element_size()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
@pytest.mark.parametrize("mode", ["sum", "weighted"])
def test_sls_bytes_match_inputs_rows_and_output(few_rotations, precision, mode):
    workload = tiny_workload(pooling=LOGNORMAL, distribution=ZIPF, batch_size=32)
    prepared = _build("sls", "embedding_bag", workload, {"mode": mode}, precision)
    calls = _rotating_calls(prepared)
    assert len(calls) == 5
    counted = []
    for call in calls:
        table, (indices, offsets, _, weights) = call.func, call.args
        touched = indices.nbytes + offsets.nbytes + indices.numel() * _row_bytes(table)
        touched += 0 if weights is None else weights.nbytes
        counted.append(touched + call().nbytes)
    mean = sum(counted) / len(counted)
    assert _matches(prepared.bytes_moved, mean)
    # Planted: charging the first batch's lookups for every call fails under variable pooling.
    assert not _matches(counted[0], mean)


@pytest.mark.parametrize("impl_name", ["per_table", "batched"])
def test_sls_multi_bytes_match_inputs_rows_and_output(few_rotations, impl_name):
    workload = tiny_workload(pooling=LOGNORMAL, distribution=ZIPF, batch_size=32)
    prepared = _build("sls_multi", impl_name, workload, {"mode": "sum"}, "bf16")
    row_bytes = _row_bytes(PooledTable(torch.rand(2, workload.dim), "bf16", CPU))
    counted = []
    for call in _rotating_calls(prepared):
        tensors = call.args[0]
        touched = sum(indices.nbytes + offsets.nbytes + indices.numel() * row_bytes
                      for indices, offsets, _ in tensors)
        counted.append(touched + call().nbytes)
    assert _matches(prepared.bytes_moved, sum(counted) / len(counted))


# ---------------------------------------------------------------- interaction

@pytest.mark.parametrize("impl_name", ["dot", "cat"])
def test_interaction_bytes_and_flops(impl_name):
    prepared = _build("interaction", impl_name, SMOKE, {}, "bf16")
    inputs = [value for value in _closure_values(prepared.run)
              if isinstance(value, torch.Tensor)]
    assert len(inputs) == 2  # the bottom-MLP output and the pooled embeddings
    with FlopCounterMode(display=False) as counter:
        output = prepared.run()
    assert _matches(prepared.bytes_moved, _nbytes(inputs) + output.nbytes)
    assert prepared.flops == counter.get_total_flops()


# ---------------------------------------------------------------- TT-Rec

class _Touches(TorchDispatchMode):
    """Bytes gathered from the TT cores and cache (index_select / embedding outputs) and bmm
    FLOPs, counted as the kernels run."""

    def __init__(self, module: TTEmbeddingBag):
        super().__init__()
        sources = list(module.cores)
        if module.cache is not None:
            sources += [module.cache.weight, module.cache.row_to_slot]
        self.sources = {tensor.data_ptr() for tensor in sources}
        self.gathered = 0
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        aten = torch.ops.aten
        if func in (aten.index_select.default, aten.embedding.default):
            if args[0].data_ptr() in self.sources:
                self.gathered += output.numel() * output.element_size()
        elif func is aten.bmm.default:
            batch, rows, inner = args[0].shape
            self.flops += 2 * batch * rows * inner * args[1].shape[2]
        return output


def _tt_module(prepared) -> TTEmbeddingBag:
    lookup = prepared.check.func
    return next(cell.cell_contents for cell in lookup.__closure__
                if isinstance(cell.cell_contents, TTEmbeddingBag))


@pytest.mark.parametrize("impl_name", ["tt_cached", "tt_uncached"])
def test_tt_flops_and_bytes_count_distinct_uncached_ids(few_rotations, impl_name):
    # Zipf 1.05 with many lookups per distinct row, as in the 1.6-2.1x overcount.
    workload = tiny_workload(rows=(300, 120, 4096), pooling=PoolingDistribution("fixed", 32.0),
                             distribution=ZIPF, batch_size=256)
    prepared = _build("tt_sls", impl_name, workload, {"rank": 4}, "fp32")
    module = _tt_module(prepared)
    module.reset_cache_stats()
    flops, touched, reconstructed, calls = 0, 0, 0, _rotating_calls(prepared)
    for call in calls:
        indices, offsets = call.args
        with _Touches(module) as touches:
            output = call()
        flops += touches.flops + indices.numel() * workload.dim  # pooling adds per lookup
        touched += touches.gathered + indices.nbytes + offsets.nbytes + output.nbytes
        distinct = torch.from_numpy(np.unique(indices.numpy()))
        reconstructed += (distinct.numel() if module.cache is None
                          else int((module.cache.row_to_slot[distinct] < 0).sum()))
    assert _matches(prepared.flops, flops / len(calls))
    assert _matches(prepared.bytes_moved, touched / len(calls))
    assert prepared.metrics["hit_rate"] == pytest.approx(module.hit_rate, abs=1e-12)
    assert "dense_equivalent_bytes" in prepared.metrics
    # Planted: the per-lookup formula (a reconstruction per missed lookup, not per distinct
    # uncached id) overcounts the reconstruction FLOPs by more than a quarter here.
    reconstruction = flops - len(calls) * prepared.metrics["mean_lookups"] * workload.dim
    per_lookup = prepared.metrics["mean_lookups"] * (1 - module.hit_rate) * (
        reconstruction / reconstructed)
    assert per_lookup > 1.25 * reconstruction / len(calls)
    # Planted: the dense table's row traffic is not what TT reads.
    assert not _matches(prepared.metrics["dense_equivalent_bytes"], touched / len(calls))


# ---------------------------------------------------------------- whole model

def _inference_counted(prepared, model, precision) -> tuple[float, float]:
    """Mean (bytes, FLOPs) over the rotation: weights as stored, rows as stored, inputs and
    logits; FLOPs from the counter plus one add per looked-up value."""
    weights = sum(_state_dict_weight_bytes(part) for part in
                  (model.bottom, model.interaction, model.top))
    if precision in ("int8", "int4"):
        row_bytes = [_row_bytes(table) for table in model.embeddings.tables]
        row_bytes = row_bytes * (len(SMOKE.tables) // len(row_bytes))
    else:
        row_bytes = [weight.shape[1] * weight.element_size()
                     for weight in model.embeddings.table_weights()]
    counted_bytes, counted_flops, calls = 0.0, 0.0, _rotating_calls(prepared)
    for call in calls:
        dense, indices, offsets = call.args
        with FlopCounterMode(display=False) as counter:
            logits = call()
        counted_bytes += (weights + dense.nbytes + _nbytes(indices) + _nbytes(offsets)
                          + sum(part.numel() * size for part, size in zip(indices, row_bytes))
                          + logits.nbytes)
        counted_flops += counter.get_total_flops() + sum(part.numel() for part in indices) * (
            SMOKE.dim)
    return counted_bytes / len(calls), counted_flops / len(calls)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("layout", ["per_table", "batched"])
def test_dlrm_infer_bytes_count_the_packed_mlp(few_rotations, precision, layout):
    prepared = _build("dlrm_infer", layout, SMOKE, {}, precision)
    model = model_at_precision(teacher_model(SMOKE, 0, embeddings=layout), precision, layout,
                               CPU).eval()
    counted_bytes, counted_flops = _inference_counted(prepared, model, precision)
    assert _matches(prepared.bytes_moved, counted_bytes)
    if precision in ("fp32", "bf16"):  # the flop counter does not see quantized::linear_dynamic
        assert _matches(prepared.flops, counted_flops)
    if precision in ("int8", "int4"):
        # Planted: the formula that took MLP bytes from named_parameters() (0 when quantized).
        mlp_bytes = sum(_state_dict_weight_bytes(part) for part in (model.bottom, model.top))
        assert mlp_bytes > 0
        assert not _matches(prepared.bytes_moved - mlp_bytes, counted_bytes)


def test_dlrm_flops_per_sample_matches_the_counter():
    # flops_per_sample is the formula both whole-model ops stand on; counted independently.
    prepared = _build("dlrm_infer", "batched", SMOKE, {}, "fp32")
    call = _rotating_calls(prepared)[0]
    with FlopCounterMode(display=False) as counter:
        call()
    lookups = sum(part.numel() for part in call.args[1])
    assert flops_per_sample(SMOKE) * SMOKE.batch_size == counter.get_total_flops() + (
        lookups * SMOKE.dim)


def test_dlrm_train_row_updates_count_distinct_rows(few_rotations):
    prepared = _build("dlrm_train", "batched", SMOKE, {}, "fp32")
    calls = _rotating_calls(prepared)
    unique = sum(np.unique(table.numpy()).size for call in calls for table in call.args[3])
    parts = prepared.metrics["bytes_parts"]
    assert _matches(parts["row_updates"], 2 * unique / len(calls) * SMOKE.dim * 4)
    assert _matches(prepared.bytes_moved, sum(parts.values()))


# ---------------------------------------------------------------- rotation

@pytest.mark.parametrize("op_name, impl_name", [("dlrm_infer", "batched"),
                                                ("dlrm_train", "per_table")])
def test_whole_model_ops_cycle_through_distinct_batches(few_rotations, op_name, impl_name):
    prepared = _build(op_name, impl_name, SMOKE, {}, "fp32")
    assert prepared.params["rotation_batches"] == 3
    # Capped far below 4x the LLC on the smoke workload: the row says so.
    assert prepared.metrics["rotation_short_of_target"] is True
    assert prepared.metrics["rotation_limited_by"] == "batch cap"
    calls = _rotating_calls(prepared)
    position = 1 if op_name == "dlrm_infer" else 3  # the per-table indices argument
    first_ids = [call.args[position][0] for call in calls]
    for one in range(len(first_ids)):
        for other in range(one + 1, len(first_ids)):
            assert not torch.equal(first_ids[one], first_ids[other])
    if op_name == "dlrm_train":
        assert len({id(call.args[0]) for call in calls}) == 1  # one student trains on them all


def test_rotating_labels_match_the_teacher_labels():
    rotating = dlrm_batches.rotating_labelled_batches(SMOKE, 0, 3)
    from bench.models.teacher import label_batches

    expected = label_batches(teacher_model(SMOKE, 0), SMOKE, 0,
                             dlrm_batches.rotation_batch_indices(3), SMOKE.batch_size)
    for mine, theirs in zip(rotating, expected):
        np.testing.assert_allclose(mine.probabilities, theirs.probabilities, rtol=1e-5)
        np.testing.assert_array_equal(mine.batch.tables[0].indices, theirs.batch.tables[0].indices)


def _fake_cache_dir(tmp_path, entries):
    for position, (kind, level, size) in enumerate(entries):
        index = tmp_path / f"index{position}"
        index.mkdir()
        (index / "type").write_text(kind + "\n")
        (index / "level").write_text(f"{level}\n")
        (index / "size").write_text(size + "\n")
    return tmp_path


def test_last_level_cache_is_the_highest_level(tmp_path):
    sysfs = _fake_cache_dir(tmp_path, [("Data", 1, "48K"), ("Instruction", 1, "32K"),
                                       ("Unified", 2, "2048K"), ("Unified", 3, "491520K")])
    assert common.last_level_cache(sysfs) == (480 << 20, "sysfs L3")


def test_last_level_cache_falls_back_without_sysfs(tmp_path):
    assert common.last_level_cache(tmp_path / "missing") == (common.FALLBACK_LLC_BYTES,
                                                             "fallback")


def test_rotation_and_probe_exceed_four_llcs(monkeypatch):
    monkeypatch.setattr(common, "last_level_cache", lambda: (480 << 20, "sysfs L3"))
    monkeypatch.setattr(common, "available_memory_bytes", lambda: 64 << 30)
    assert common.rotation_target()["rotation_target_bytes"] >= 4 * (480 << 20)
    assert common.beyond_cache_bytes(buffers=2) >= 4 * (480 << 20)
    plan = common.rotation_plan(bytes_per_call=4 << 20, memory_per_call=1 << 10)
    assert plan["rotation_bytes"] >= 4 * (480 << 20)
    assert plan["rotation_short_of_target"] is False
    # Big batches meet the cap on the memory rotating inputs may take; the row says so.
    capped = common.rotation_plan(bytes_per_call=4 << 20, memory_per_call=4 << 20)
    assert capped["rotation_short_of_target"] is True
    assert capped["rotation_limited_by"] == "input memory cap"
    # With little memory the probe shrinks and the rotation says it is short, and why.
    monkeypatch.setattr(common, "available_memory_bytes", lambda: 512 << 20)
    assert common.beyond_cache_bytes(buffers=2) == 64 << 20
    short = common.rotation_plan(bytes_per_call=4 << 20, memory_per_call=1 << 20)
    assert short["rotation_short_of_target"] is True
    assert short["rotation_limited_by"] == "available memory"


def test_sls_rotation_covers_four_llcs(monkeypatch):
    monkeypatch.setattr(common, "last_level_cache", lambda: (64 << 10, "sysfs L3"))
    monkeypatch.setattr(common, "MIN_ROTATION_TARGET_BYTES", 0)
    prepared = _build("sls", "embedding_bag", tiny_workload(), {"mode": "sum"}, "fp32")
    assert prepared.metrics["rotation_short_of_target"] is False
    assert prepared.metrics["rotation_bytes"] >= 4 * (64 << 10)
    assert prepared.params["rotation_batches"] == len(_rotating_calls(prepared))


def test_dlrm_infer_with_tt_tables_counts_tt_gathers(few_rotations):
    workload = tiny_workload(rows=(300, 120, 4096), pooling=PoolingDistribution("fixed", 8.0),
                             distribution=ZIPF, batch_size=64)
    prepared = _build("dlrm_infer", "batched", workload, {"tt_tables": 1, "tt_rank": 4}, "fp32")
    calls = _rotating_calls(prepared)
    model = next(value for value in _closure_values(calls[0].func)
                 if isinstance(value, torch.nn.Module))
    (module,), (tt_position,) = model.embeddings.tt, model.embeddings.tt_positions
    weights = sum(_state_dict_weight_bytes(part) for part in
                  (model.bottom, model.interaction, model.top))
    counted_bytes = counted_flops = 0.0
    for call in calls:
        dense, indices, offsets = call.args
        with FlopCounterMode(display=False) as counter, _Touches(module) as touches:
            logits = call()
        dense_rows = sum(part.numel() for position, part in enumerate(indices)
                         if position != tt_position) * workload.dim * 4
        counted_bytes += (weights + dense.nbytes + _nbytes(indices) + _nbytes(offsets)
                          + dense_rows + touches.gathered + logits.nbytes)
        counted_flops += counter.get_total_flops() + sum(part.numel() for part in indices) * (
            workload.dim)
    assert _matches(prepared.bytes_moved, counted_bytes / len(calls))
    assert _matches(prepared.flops, counted_flops / len(calls))
