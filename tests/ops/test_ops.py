"""Ops: every impl agrees with its float64 reference, formulas, Unsupported combos, run_task."""

from __future__ import annotations

import json
import math
import time
import timeit

import pytest
import torch
from conftest import tiny_workload

from bench import registry
from bench.run import worker
from bench.run.settings import WorkerSettings
from bench.host import transparent_huge_pages
from bench.models.dlrm import flops_per_sample
from bench.ops.common import PooledTable, relative_error, table_weight
from bench.ops.dlrm import model_at_precision
from bench.ops.fc import at_precision
from bench.ops.sls_triton import CPU_SKIP as TRITON_CPU_SKIP
from bench.ops.ttrec_triton import CPU_SKIP as TT_TRITON_CPU_SKIP
from bench.peers import PEERS_INSTALL
from bench.registry import BuildContext, Impl, Prepared, Unsupported
from bench.records import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, ResultRow, samples_from_row
from bench.run.tasks import Task
from workloads import presets
from workloads.specs import IndexDistribution, PoolingDistribution

CPU = torch.device("cpu")
SMOKE = presets.smoke()
# Small probes: the defaults (a 1024 GEMM, a buffer 4x the LLC) are for real sweeps.
OPTIONS = {"gemm_size": 64, "membw_sizes": [4096]}


def _expected_unsupported(op_name: str, precision: str) -> bool:
    """Listed combinations that may skip on CPU: only where the machine decides (--list shows
    only precisions that run, so a listed one that always skips fails this test)."""
    quantized_mlp = ((op_name == "fc" and precision == "int8")
                     or (op_name == "dlrm_infer" and precision in ("int8", "int4")))
    return quantized_mlp and "fbgemm" not in torch.backends.quantized.supported_engines


def _context(workload, variant, precision, options=None, device=CPU, seed=0) -> BuildContext:
    return BuildContext(workload=workload, variant=variant, precision=precision, device=device,
                        seed=seed, options=options if options is not None else OPTIONS)


def _build(op, impl_name, workload, variant, precision, options=None) -> Prepared:
    return registry.impls(op)[impl_name].build(_context(workload, variant, precision, options))


def _all_combinations():
    combos = []
    for op_name, op in registry.ops().items():
        for implementation in registry.impls(op_name).values():
            if "cpu" not in implementation.devices:
                continue  # a GPU-only impl (cuda_graph) has its own CPU tests with fakes
            for variant in op.variants(SMOKE, OPTIONS):
                for precision in implementation.precisions:
                    label = "-".join([op_name, implementation.name,
                                      *(str(value) for value in variant.values()), precision])
                    combos.append(pytest.param(op_name, implementation.name, variant, precision,
                                               id=label))
    return combos


def _assert_checks(prepared: Prepared, precision: str) -> None:
    """worker.check, the sweep's comparison with the float64 reference, accepts the impl."""
    row = ResultRow()
    message = worker.check(prepared, row, precision)
    assert message == "", message
    assert math.isfinite(row.rel_error)


class _NoClock:
    """Replaces every clock the timed closure could read; calling one fails the test."""

    def __init__(self, monkeypatch):
        self.calls = []
        for module, name in ((time, "perf_counter"), (time, "perf_counter_ns"),
                             (time, "monotonic"), (time, "monotonic_ns"), (time, "time"),
                             (time, "time_ns"), (time, "process_time"),
                             (timeit, "default_timer")):
            monkeypatch.setattr(module, name, self._make(name))

    def _make(self, name):
        def clock(*args):
            self.calls.append(name)
            raise AssertionError(f"the timed closure read a clock ({name})")
        return clock


# ---------------------------------------------------------------- correctness of every impl

@pytest.mark.parametrize("op_name, impl_name, variant, precision", _all_combinations())
def test_impl_matches_float64_reference(monkeypatch, op_name, impl_name, variant, precision):
    try:
        prepared = _build(op_name, impl_name, SMOKE, variant, precision)
    except Unsupported as reason:
        # A peer package (FBGEMM, torchrec) this machine lacks is a skip that says how to
        # install it (bench.peers.require); with the peers installed, their impls must run.
        # So is dlrm_train/tt_fused's dense variant (it trains TT tables only, by design),
        # and a huge-pages impl on a host whose transparent huge pages are off, and the
        # Triton TBE and TT kernels, cuda kernels (tests/models/test_triton_tbe.py and
        # test_tt_triton.py run them interpreted).
        tt_only = impl_name == "tt_fused" and not variant.get("tt_tables")
        assert (_expected_unsupported(op_name, precision) or tt_only
                or PEERS_INSTALL in str(reason)
                or str(reason).startswith((TRITON_CPU_SKIP, TT_TRITON_CPU_SKIP))
                or (transparent_huge_pages() not in ("always", "madvise")
                    and "transparent_hugepage" in str(reason))), str(reason)
        assert str(reason)  # the message becomes the skip reason
        return
    assert not _expected_unsupported(op_name, precision)
    assert prepared.samples >= 1
    assert prepared.flops >= 0 and math.isfinite(prepared.flops)
    assert prepared.bytes_moved > 0 and math.isfinite(prepared.bytes_moved)
    # The suite's own check (a tolerance of 0.0 stays exact there); the references are
    # independent formulations, and tests/test_references.py shows a planted bug fails them.
    _assert_checks(prepared, precision)
    output = (prepared.check or prepared.run)()
    # The timed closure computes without reading a clock.
    no_clock = _NoClock(monkeypatch)
    result = prepared.run()
    monkeypatch.undo()
    assert no_clock.calls == []
    if prepared.check is None:
        assert torch.as_tensor(result).shape == torch.as_tensor(output).shape


def test_assert_checks_fails_a_wrong_output_and_keeps_a_zero_tolerance():
    """The helper above can fail: a 1e-6 slip under tolerance 0.0 (once read as 'unset')."""
    expected = torch.tensor([1.0, 2.0], dtype=torch.float64)
    _assert_checks(Prepared(run=lambda: expected.float(), reference=lambda: expected, samples=1,
                            flops=1.0, bytes_moved=1.0, tolerance=0.0), "fp32")
    for output, tolerance in ((expected.float() * (1 + 1e-6), 0.0), (expected.float() * 2, None)):
        wrong = Prepared(run=lambda output=output: output, reference=lambda: expected, samples=1,
                         flops=1.0, bytes_moved=1.0, tolerance=tolerance)
        with pytest.raises(AssertionError, match="relative error"):
            _assert_checks(wrong, "fp32")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8", "int4"])
@pytest.mark.parametrize("mode", ["sum", "mean", "weighted"])
def test_sls_variable_pooling_zipf(precision, mode):
    workload = tiny_workload(pooling=PoolingDistribution("lognormal", 5.0, 0.7),
                             distribution=IndexDistribution("zipf", 1.1), batch_size=40)
    prepared = _build("sls", "embedding_bag", workload, {"mode": mode}, precision)
    _assert_checks(prepared, precision)


@pytest.mark.parametrize("op_name, impl_name", [("dlrm_infer", "per_table"),
                                                ("dlrm_infer", "batched"),
                                                ("dlrm_train", "batched")])
@pytest.mark.parametrize("interaction", ["dcn", "cat"])
def test_dlrm_other_interactions(op_name, impl_name, interaction):
    workload = tiny_workload(interaction=interaction,
                             pooling=PoolingDistribution("uniform", 3.0, 2.0))
    prepared = _build(op_name, impl_name, workload, {}, "fp32")
    _assert_checks(prepared, "fp32")


def test_relative_error():
    expected = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert relative_error(torch.tensor([3.0, 4.0]), expected) == 0.0
    assert relative_error(torch.tensor([3.0, 5.0]), expected) == pytest.approx(0.2)
    assert relative_error((torch.ones(2), torch.tensor([3.0, 5.0])),
                          (torch.ones(2, dtype=torch.float64), expected)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="NaN"):
        relative_error(torch.tensor([float("nan"), 4.0]), expected)
    with pytest.raises(ValueError, match="shape"):
        relative_error(torch.ones(3), expected)
    with pytest.raises(ValueError, match="parts"):
        relative_error((torch.ones(2),), (expected, expected))


# ---------------------------------------------------------------- unsupported combinations

@pytest.mark.parametrize("op_name, impl_name, variant, precision", [
    ("fc", "torch_linear", {"layer": "linear"}, "int4"),
    ("interaction", "dot", {}, "int8"),
    ("interaction", "cat", {}, "int4"),
    ("dlrm_train", "per_table", {}, "int8"),
    ("dlrm_train", "batched", {}, "int4"),
])
def test_documented_unsupported_combinations(op_name, impl_name, variant, precision):
    with pytest.raises(Unsupported) as reason:
        _build(op_name, impl_name, SMOKE, variant, precision)
    assert precision in str(reason.value)


def test_int4_tables_need_even_dim():
    workload = tiny_workload(dim=7)
    with pytest.raises(Unsupported, match="even"):
        _build("sls", "embedding_bag", workload, {"mode": "sum"}, "int4")
    # int8 has no such restriction.
    prepared = _build("sls", "embedding_bag", workload, {"mode": "sum"}, "int8")
    _assert_checks(prepared, "int8")


def test_quantized_kernels_refuse_cuda_before_touching_it():
    weight = torch.rand(10, 8)
    cuda = torch.device("cuda")
    for precision in ("int8", "int4"):
        with pytest.raises(Unsupported, match="CPU"):
            PooledTable(weight, precision, cuda)
    with pytest.raises(Unsupported, match="CPU"):
        at_precision(torch.nn.Linear(4, 4), "int8", cuda)
    with pytest.raises(Unsupported):
        at_precision(torch.nn.Linear(4, 4), "int4", CPU)
    from bench.models.dlrm import build_dlrm
    with pytest.raises(Unsupported, match="CPU"):
        model_at_precision(build_dlrm(SMOKE, 0), "int8", "batched", cuda)


# ---------------------------------------------------------------- formulas

# smoke: the largest table is #2 (2000 rows), dim 8, 4 lookups a bag, 64 bags -> 256 lookups.
@pytest.mark.parametrize("precision, mode, flops, bytes_moved, row_bytes", [
    # lookups * (row + 8 B index [+ 4 B weight]) + bags * (8 B offset + dim * output bytes)
    ("fp32", "sum", 256 * 8, 256 * (32 + 8) + 64 * (8 + 32), 32),
    ("fp32", "mean", 256 * 8, 256 * (32 + 8) + 64 * (8 + 32), 32),
    ("fp32", "weighted", 2 * 256 * 8, 256 * (32 + 8 + 4) + 64 * (8 + 32), 32),
    ("fp16", "sum", 256 * 8, 256 * (16 + 8) + 64 * (8 + 16), 16),
    ("bf16", "sum", 256 * 8, 256 * (16 + 8) + 64 * (8 + 16), 16),
    ("int8", "sum", 256 * 8, 256 * (8 + 8 + 8) + 64 * (8 + 32), 16),  # fp32 scale+bias a row
    ("int4", "sum", 256 * 8, 256 * (4 + 4 + 8) + 64 * (8 + 32), 8),  # fp16 scale+bias a row
])
def test_sls_formulas(precision, mode, flops, bytes_moved, row_bytes):
    prepared = _build("sls", "embedding_bag", SMOKE, {"mode": mode}, precision)
    assert prepared.flops == flops
    assert prepared.bytes_moved == bytes_moved
    assert prepared.samples == 64
    assert prepared.params["table"] == 2 and prepared.params["rows"] == 2000
    assert prepared.params["table_bytes"] == 2000 * row_bytes
    assert prepared.params["mode"] == mode


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("dim", [8, 16, 128])
def test_quantized_row_bytes_match_packed_rows(precision, dim):
    table = PooledTable(torch.rand(5, dim), precision, CPU)
    packed_row_bytes = table.weight.shape[1] * table.weight.element_size()
    assert table.bytes_per_row == packed_row_bytes


@pytest.mark.parametrize("impl_name", ["per_table", "batched"])
def test_sls_multi_formulas(impl_name):
    prepared = _build("sls_multi", impl_name, SMOKE, {"mode": "sum"}, "fp32")
    lookups, bags = 3 * 256, 3 * 64
    assert prepared.flops == lookups * 8
    assert prepared.bytes_moved == lookups * (32 + 8) + bags * (8 + 32)
    assert prepared.params["lookups"] == lookups
    assert prepared.samples == 64
    output = prepared.run()
    assert tuple(output.shape) == (3, 64, 8)


@pytest.mark.parametrize("layer, widths", [
    ("linear", (14, 16)),  # top MLP input: 8 + 4 * 3 / 2 = 14
    ("bottom_mlp", (4, 16, 8)),
    ("top_mlp", (14, 16, 1)),
])
def test_fc_formulas(layer, widths):
    prepared = _build("fc", "torch_linear", SMOKE, {"layer": layer}, "fp32")
    pairs = list(zip(widths, widths[1:]))
    assert prepared.params["widths"] == list(widths)
    assert prepared.flops == 2 * 64 * sum(a * b for a, b in pairs)
    weights = sum(a * b + b for a, b in pairs)  # weights and biases
    assert prepared.bytes_moved == weights * 4 + 64 * sum(widths) * 4
    assert tuple(prepared.run().shape) == (64, widths[-1])


def test_interaction_formulas():
    dot = _build("interaction", "dot", SMOKE, {}, "fp32")
    # 4 features of dim 8: a 4x4 Gram matrix per sample, 14 outputs.
    assert dot.flops == 64 * 2 * 4 * 4 * 8
    assert dot.bytes_moved == 64 * (4 * 8 + 14) * 4
    assert tuple(dot.run().shape) == (64, 14)
    cat = _build("interaction", "cat", SMOKE, {}, "bf16")
    assert cat.flops == 0
    assert cat.bytes_moved == 64 * (4 * 8 + 4 * 8) * 2
    assert tuple(cat.run().shape) == (64, 32)


def test_dlrm_flops():
    # smoke per sample: bottom 4-16-8, dot over 4 features of dim 8, top 14-16-1, 12 lookups.
    per_sample = (2 * (4 * 16 + 16 * 8) + 2 * 4 * 4 * 8 + 2 * (14 * 16 + 16 * 1) + 12 * 8)
    assert flops_per_sample(SMOKE) == per_sample
    # Kaggle: bottom 13-512-256-64-16, 27 features of dim 16, top 367-512-256-1, 26 lookups.
    kaggle = (2 * (13 * 512 + 512 * 256 + 256 * 64 + 64 * 16) + 2 * 27 * 27 * 16
              + 2 * (367 * 512 + 512 * 256 + 256 * 1) + 26 * 16)
    assert flops_per_sample(presets.kaggle()) == kaggle
    infer = _build("dlrm_infer", "batched", SMOKE, {}, "fp32")
    assert infer.flops == 64 * per_sample
    assert tuple(infer.run().shape) == (64,)
    train = _build("dlrm_train", "batched", SMOKE, {}, "fp32")
    assert train.flops == 3 * 64 * per_sample


def test_machine_probe_formulas():
    copy = _build("membw", "copy", SMOKE, {"bytes": 4096}, "fp32")
    assert copy.bytes_moved == 2 * 4096 and copy.flops == 0
    read = _build("membw", "read", SMOKE, {"bytes": 4096}, "fp32")
    assert read.bytes_moved == 4096 and read.flops == 1024
    gemm = _build("gemm_peak", "matmul", SMOKE, {"size": 64}, "fp32")
    assert gemm.flops == 2 * 64 ** 3
    assert gemm.bytes_moved == 3 * 64 * 64 * 4


def test_same_seed_same_inputs_different_seed_different():
    first = _build("sls", "embedding_bag", SMOKE, {"mode": "sum"}, "fp32")
    second = _build("sls", "embedding_bag", SMOKE, {"mode": "sum"}, "fp32")
    assert torch.equal(first.run(), second.run())
    other = registry.impls("sls")["embedding_bag"].build(
        _context(SMOKE, {"mode": "sum"}, "fp32", seed=1))
    assert not torch.equal(first.run(), other.run())


def test_table_weight_init_bounds():
    table = SMOKE.tables[0]
    weight = table_weight(table, seed=0, table_index=0)
    bound = math.sqrt(1.0 / table.rows)
    assert weight.shape == (table.rows, table.dim)
    assert weight.abs().max() <= bound
    assert torch.equal(weight, table_weight(table, seed=0, table_index=0))


# ---------------------------------------------------------------- registry

def test_registry_contents():
    ops = registry.ops()
    for name in ("sls", "sls_multi", "fc", "interaction", "dlrm_infer", "dlrm_train", "membw",
                 "gemm_peak"):
        assert name in ops
        impls = registry.impls(name)
        assert impls
        assert sum(entry.baseline for entry in impls.values()) == 1
        assert registry.baseline_of(name).baseline
        for entry in impls.values():
            assert set(entry.precisions) <= set(registry.PRECISIONS)
            assert len(entry.code_version) == 12
    assert set(registry.TOLERANCE) == set(registry.PRECISIONS)


def test_registry_refuses_duplicates_and_unknowns():
    registry.load_all()
    # An impl may name an op that a later module registers; one that no module does is refused.
    registry.impl("no_such_op", "x", ("fp32",))(lambda context: None)
    try:
        with pytest.raises(ValueError, match="no module registers.*no_such_op"):
            registry.load_all()
    finally:
        registry._IMPLS.pop("no_such_op")
    registry.load_all()
    with pytest.raises(ValueError, match="twice"):
        registry.impl("sls", "embedding_bag", ("fp32",))(lambda context: None)
    with pytest.raises(ValueError, match="unknown precisions"):
        registry.impl("sls", "brand_new", ("fp64",))(lambda context: None)
    with pytest.raises(ValueError, match="baseline"):
        registry.impl("sls", "brand_new", ("fp32",), baseline=True)(lambda context: None)
    assert "brand_new" not in registry.impls("sls")
    with pytest.raises(ValueError, match="twice"):
        registry.register_op(registry.ops()["sls"])


# ---------------------------------------------------------------- run_task

def _task(op="sls", impl_name="embedding_bag", workload=SMOKE, variant=None, precision="fp32"):
    return Task(op=op, impl=impl_name, workload=workload,
                variant={"mode": "sum"} if variant is None else variant, precision=precision,
                device="cpu", isa="native", threads=1, seed=0, options={})


def _fake_impl(monkeypatch, build, name="fake", precisions=("fp32", "int8")):
    """Register a test-only sls impl for the duration of one test."""
    registry.load_all()
    monkeypatch.setitem(registry._IMPLS["sls"], name, Impl("sls", name, build, precisions))
    return name


def _prepared(output, reference, **extra) -> Prepared:
    counter = {"calls": 0}

    def run():
        counter["calls"] += 1
        return output

    prepared = Prepared(run=run, reference=lambda: reference, samples=4, flops=100.0,
                        bytes_moved=800.0, params={"fake": True}, **extra)
    prepared.counter = counter  # type: ignore[attr-defined]
    return prepared


EXPECTED = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)


def test_run_task_ok_row(fast_policy):
    task = _task()
    row = worker.run_task(task, WorkerSettings("run-1", fast_policy), isa_effective="aten=x")
    assert row.status == STATUS_OK, row.error
    assert row.error == ""
    assert row.task_key == task.key() and row.run_id == "run-1"
    assert row.op == "sls" and row.impl == "embedding_bag" and row.is_baseline
    assert row.workload == "smoke" and row.precision == "fp32" and row.batch_size == 64
    assert row.isa_effective == "aten=x"
    assert row.n_samples >= fast_policy.min_samples
    samples = samples_from_row(row)
    assert len(samples) == row.n_samples and all(value > 0 for value in samples)
    assert math.isfinite(row.median_s) and row.median_s > 0
    assert row.min_s <= row.median_s <= row.p90_s <= row.p99_s
    assert 0 <= row.rel_error <= registry.TOLERANCE["fp32"]
    assert row.flops == 2048 and row.bytes_moved == 12800
    assert row.gbps == pytest.approx(row.bytes_moved / row.median_s / 1e9)
    assert row.gflops == pytest.approx(row.flops / row.median_s / 1e9)
    assert row.samples_per_s == pytest.approx(64 / row.median_s)
    params = json.loads(row.params)
    assert params["mode"] == "sum" and params["rows"] == 2000
    metrics = json.loads(row.metrics)
    assert "noisy" in metrics and "noise_iqr_over_median" in metrics


def test_run_task_times_the_run_closure(monkeypatch, fast_policy):
    prepared = _prepared(EXPECTED.float(), EXPECTED)
    name = _fake_impl(monkeypatch, lambda context: prepared)
    row = worker.run_task(_task(impl_name=name), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_OK, row.error
    assert row.rel_error == 0.0
    # check once, warm up once, then at least n_samples timed calls
    assert prepared.counter["calls"] >= 2 + row.n_samples
    assert json.loads(row.params) == {"mode": "sum", "fake": True}
    assert not row.is_baseline


@pytest.mark.parametrize("output, words", [
    (torch.tensor([1.0, float("nan"), 3.0, 4.0]), "NaN"),
    (torch.tensor([1.0, 2.0, float("inf"), 4.0]), "infinity"),
    (torch.ones(5), "shape"),
    (EXPECTED.float() * 2, "exceeds the fp32 tolerance"),
])
def test_run_task_bad_output_is_an_error_row(monkeypatch, fast_policy, output, words):
    prepared = _prepared(output, EXPECTED)
    name = _fake_impl(monkeypatch, lambda context: prepared)
    row = worker.run_task(_task(impl_name=name), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_ERROR
    assert words in row.error
    assert row.n_samples == 0 and math.isnan(row.median_s)
    assert prepared.counter["calls"] == 1  # never timed


def test_run_task_unsupported_is_a_skipped_row(monkeypatch, fast_policy):
    def build(context):
        raise Unsupported("no such kernel on this machine")

    name = _fake_impl(monkeypatch, build)
    row = worker.run_task(_task(impl_name=name), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_SKIPPED
    assert row.error == "no such kernel on this machine"


def test_run_task_real_unsupported_is_skipped(fast_policy):
    row = worker.run_task(_task(op="fc", impl_name="torch_linear", variant={"layer": "linear"},
                                precision="int4"), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_SKIPPED and "int4" in row.error


def test_run_task_builder_crash_is_an_error_row(monkeypatch, fast_policy):
    def build(context):
        raise RuntimeError("kaput\nsecond line")

    name = _fake_impl(monkeypatch, build)
    row = worker.run_task(_task(impl_name=name), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_ERROR
    assert "build failed" in row.error and "RuntimeError" in row.error
    assert "\n" not in row.error


def test_run_task_kernel_raising_is_an_error_row(monkeypatch, fast_policy):
    def run():
        raise RuntimeError("kernel exploded")

    name = _fake_impl(monkeypatch, lambda context: Prepared(
        run=run, reference=lambda: EXPECTED, samples=1, flops=1.0, bytes_moved=1.0))
    row = worker.run_task(_task(impl_name=name), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_ERROR and "kernel exploded" in row.error


def test_run_task_uses_prepared_tolerance(monkeypatch, fast_policy):
    loose = _prepared(EXPECTED.float() * 1.5, EXPECTED, tolerance=0.6)
    name = _fake_impl(monkeypatch, lambda context: loose)
    row = worker.run_task(_task(impl_name=name), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_OK and row.rel_error == pytest.approx(0.5)
    # The precision's tolerance applies otherwise: int8 allows 3e-2.
    near = _prepared(EXPECTED.float() * 1.02, EXPECTED)
    monkeypatch.setitem(registry._IMPLS["sls"], name, Impl("sls", name, lambda context: near,
                                                           ("fp32", "int8")))
    assert worker.run_task(_task(impl_name=name, precision="int8"),
                           WorkerSettings("r", fast_policy)).status == STATUS_OK
    assert worker.run_task(_task(impl_name=name, precision="fp32"),
                           WorkerSettings("r", fast_policy)).status == STATUS_ERROR


def test_run_task_zero_tolerance_means_exact(monkeypatch, fast_policy):
    prepared = _prepared(EXPECTED.float() * (1 + 1e-6), EXPECTED, tolerance=0.0)
    name = _fake_impl(monkeypatch, lambda context: prepared)
    row = worker.run_task(_task(impl_name=name), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_ERROR


def test_run_task_accuracy_failure_is_an_error_row(monkeypatch, fast_policy):
    def accuracy():
        raise RuntimeError("evaluation set broken")

    prepared = _prepared(EXPECTED.float(), EXPECTED, accuracy=accuracy)
    name = _fake_impl(monkeypatch, lambda context: prepared)
    row = worker.run_task(_task(impl_name=name), WorkerSettings("r", fast_policy))
    assert row.status == STATUS_ERROR and "evaluation set broken" in row.error


def _independent_quality() -> tuple[float, float]:
    """(AUC, log-loss) of the float64 reference teacher on dlrm_infer's evaluation set, by
    a pairwise count and the BCE formula (not bench.models.quality, not the model's forward)."""
    import numpy as np

    from bench.models.dlrm import batch_tensors
    from bench.models.dlrm_reference import reference_logits
    from bench.ops.dlrm import EVAL_BATCHES
    from bench.models.teacher import evaluation_set, teacher_model

    teacher = teacher_model(SMOKE, 0, embeddings="batched")
    labelled = evaluation_set(SMOKE, 0, EVAL_BATCHES)
    labels = np.concatenate([item.labels for item in labelled]).astype(bool)
    scores = np.concatenate([torch.sigmoid(reference_logits(
        teacher, *batch_tensors(item.batch, CPU))).numpy() for item in labelled])
    negatives = np.sort(scores[~labels])
    below = np.searchsorted(negatives, scores[labels], side="left")
    tied = np.searchsorted(negatives, scores[labels], side="right") - below
    auc = float((below + 0.5 * tied).sum() / (labels.sum() * (~labels).sum()))
    logloss = float(-np.mean(np.where(labels, np.log(scores), np.log1p(-scores))))
    return auc, logloss


def test_run_task_records_accuracy(fast_policy):
    row = worker.run_task(_task(op="dlrm_infer", impl_name="batched", variant={}),
                          WorkerSettings("r", fast_policy))
    assert row.status == STATUS_OK, row.error
    auc, logloss = _independent_quality()
    # The fp32 model's figures are the float64 teacher's, up to fp32 rounding of the CTRs.
    assert row.auc == pytest.approx(auc, abs=1e-4)
    assert row.logloss == pytest.approx(logloss, rel=1e-4)
    metrics = json.loads(row.metrics)
    assert metrics["eval_samples"] == 8 * 2048
    assert metrics["fp32_auc"] == pytest.approx(auc, abs=1e-4)


@pytest.mark.parametrize("precision, largest_difference", [("bf16", 0.01), ("int8", 0.05)])
def test_dlrm_infer_accuracy_compares_two_different_models(precision, largest_difference):
    """At a lower precision the compared CTRs come from two models: they differ, a little."""
    quality = _build("dlrm_infer", "batched", SMOKE, {}, precision).accuracy()
    auc, _ = _independent_quality()
    assert 0.0 < quality["ctr_abs_diff"] < largest_difference
    assert quality["metrics"]["fp32_auc"] == pytest.approx(auc, abs=1e-4)
    assert quality["auc"] == pytest.approx(auc, abs=0.01)
    assert quality["auc"] != quality["metrics"]["fp32_auc"]
