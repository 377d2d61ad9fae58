"""The fused Triton TT-Rec lookup through Triton's interpreter on the CPU: pooled bags and core /
cache gradients against float64 autograd of the chain (cache hits and misses mixed), planted
faults fail, TTEmbeddingBag(kernel="triton") agrees with the reference kernel, and the
tt_sls / dlrm_train impls pass the worker check."""

from __future__ import annotations

import os

import pytest
from conftest import triton_interpreter

# triton.jit picks the interpreter when it decorates, so the variable must be set before the
# kernel module is imported; it is put back afterwards, and set per test by the fixture below,
# so that CLI subprocesses of other test modules never inherit it.
with triton_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")
    from bench.models.ttrec import triton_tt, triton_tt_kernels  # noqa: E402

import copy  # noqa: E402

import torch  # noqa: E402
from conftest import tiny_workload  # noqa: E402

from bench import registry  # noqa: E402
from bench.compare_outputs import UNDERFLOW, UNIT_ROUNDOFF, compare  # noqa: E402
from bench.models.ttrec import TTEmbeddingBag  # noqa: E402
from bench.ops import common, ttrec_triton  # noqa: E402
from bench.records import ResultRow  # noqa: E402
from bench.references import pool_rows64, tt_rows64  # noqa: E402
from bench.registry import BuildContext, Unsupported  # noqa: E402
from bench.run import worker  # noqa: E402
from workloads import presets  # noqa: E402

CPU = torch.device("cpu")
# Odd sizes: every block is padded (dim 12 = 2 * 3 * 2, bond ranks 3 and 5).
ROW_FACTORS, DIM_FACTORS, RANKS = (3, 4, 5), (2, 3, 2), (1, 3, 5, 1)
NUM_ROWS, DIM = 60, 12
CACHED_ROWS = (0, 7, 8, 33, 59)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 while a test runs: the impls build on the CPU only with it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_were_built_for_the_interpreter():
    assert triton_tt_kernels.INTERPRETED


def _cores(dtype=torch.float32, seed=0, ranks=RANKS):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(ranks[k], ROW_FACTORS[k], DIM_FACTORS[k], ranks[k + 1],
                        generator=generator).to(dtype) for k in range(3)]


def _inputs(seed=1):
    """Bags of 0-5 lookups (an empty bag, a row twice in one bag), per-sample weights."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (12,), generator=generator)
    lengths[2] = 0
    indices = torch.randint(0, NUM_ROWS, (int(lengths.sum()),), generator=generator)
    indices[1] = indices[0]
    indices[3:6] = torch.tensor(CACHED_ROWS[:3])  # hits for sure
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)[:-1]])
    weights = torch.rand(indices.numel(), generator=generator) * 2 - 1
    return indices, offsets, weights


def _cache(cores, differ=True):
    """A slot map holding CACHED_ROWS (slots in reverse order) and their rows: the TT rows,
    or (differ) rows unlike them, so that a result shows which of the two was read."""
    slot_map = torch.full((NUM_ROWS,), -1, dtype=torch.int32)
    rows = torch.tensor(CACHED_ROWS)
    slot_map[rows] = torch.arange(len(CACHED_ROWS) - 1, -1, -1, dtype=torch.int32)
    values = tt_rows64([core.double() for core in cores], rows, ROW_FACTORS)
    if differ:
        values = values * -2 + 1
    weight = torch.empty(len(CACHED_ROWS), DIM, dtype=torch.float64)
    weight[slot_map[rows].long()] = values
    return slot_map, weight.to(cores[0].dtype)


def _expected64(cores, indices, offsets, weights, mode, slot_map=None, cache_weight=None):
    """Float64 pooled rows: the chain contracted right to left (bench.references), a cached
    row where the map has one; differentiable in cores and cache_weight."""
    rows = tt_rows64(cores, indices, ROW_FACTORS)
    if slot_map is not None:
        slots = slot_map.index_select(0, indices).long()
        hit = slots >= 0
        rows = torch.where(hit[:, None], cache_weight.index_select(0, slots.clamp(min=0)), rows)
    return pool_rows64(rows, torch.arange(indices.numel()), offsets, mode, weights)


def _bound(cores, indices, offsets, weights, mode, precision, expected, cache=None):
    """|kernel - float64|: fp32 products and sums over at most (r_1 + r_2 + bag) terms, each
    relative error under that many u32 times the summed magnitudes; then the output rounding."""
    slot_map, cache_weight = cache if cache is not None else (None, None)
    magnitude = _expected64([core.double().abs() for core in cores], indices, offsets,
                            None if weights is None else weights.abs(), mode, slot_map,
                            None if cache_weight is None else cache_weight.double().abs())
    terms = RANKS[1] + RANKS[2] + 8
    return (terms * UNIT_ROUNDOFF["fp32"] * magnitude
            + UNIT_ROUNDOFF[precision] * expected.abs() + UNDERFLOW[precision])


def _run(cores, indices, offsets, weights, mode, cache, precision="fp32", slot_map=None):
    """Kernel output, float64 expectation and bound; slot_map overrides the kernel's map."""
    real_map, cache_weight = cache if cache is not None else (None, None)
    output = triton_tt.tt_bag(cores, indices, offsets, weights, mode,
                              slot_map=real_map if slot_map is None else slot_map,
                              cache_weight=cache_weight)
    cores64 = [core.double() for core in cores]
    cache64 = None if cache_weight is None else cache_weight.double()
    expected = _expected64(cores64, indices, offsets, weights, mode, real_map, cache64)
    return output, expected, _bound(cores, indices, offsets, weights, mode, precision,
                                    expected, cache)


# ---------------------------------------------------------------- forward against float64

@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("fp16", torch.float16),
                                              ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("cached", [False, True])
def test_forward_matches_float64_with_hits_and_misses(precision, dtype, mode, weighted, cached):
    cores = _cores(dtype)
    indices, offsets, weights = _inputs()
    cache = _cache(cores) if cached else None
    output, expected, bound = _run(cores, indices, offsets, weights if weighted else None,
                                   mode, cache, precision)
    assert output.dtype == dtype and output.shape == (offsets.numel(), DIM)
    comparison = compare(output, expected, bound)
    assert comparison.passed, comparison.describe()
    assert torch.equal(output[2].float(), torch.zeros(DIM))  # the empty bag


def test_hits_are_counted_and_read_from_the_cache_not_the_cores():
    cores = _cores()
    indices, offsets, _ = _inputs()
    slot_map, cache_weight = _cache(cores)
    hits = torch.zeros((), dtype=torch.int64)
    rows = triton_tt.tt_bag(cores, indices, torch.arange(indices.numel()), slot_map=slot_map,
                            cache_weight=cache_weight, hits=hits)
    hit = slot_map[indices] >= 0
    assert int(hits) == int(hit.sum()) > 0 and not hit.all()
    # One-lookup bags: a hit is its cached row exactly (no arithmetic on the way).
    assert torch.equal(rows[hit], cache_weight[slot_map[indices[hit]].long()])
    tt = tt_rows64([core.double() for core in cores], indices, ROW_FACTORS)
    assert not torch.allclose(rows[hit].double(), tt[hit], atol=1e-3)


# ---------------------------------------------------------------- backward against float64

def _gradients(cores, indices, offsets, weights, mode, cache, slot_map=None, sparse=False):
    """Core and cache gradients of (output * upstream).sum(): kernel ones, float64 autograd
    ones, and their bounds (the same formula on magnitudes, times the terms' u32)."""
    upstream = torch.rand(offsets.numel(), DIM, generator=torch.Generator().manual_seed(3)) - .5
    real_map, cache_weight = cache if cache is not None else (None, None)
    leaves = [core.clone().requires_grad_() for core in cores]
    cache_leaf = None if cache_weight is None else cache_weight.clone().requires_grad_()
    output = triton_tt.tt_bag(leaves, indices, offsets, weights, mode,
                              slot_map=real_map if slot_map is None else slot_map,
                              cache_weight=cache_leaf, sparse_cache_gradient=sparse)
    (output * upstream).sum().backward()
    mine = [leaf.grad for leaf in leaves] + ([] if cache_leaf is None else [cache_leaf.grad])
    expected, magnitude = [], []
    for sign in (lambda tensor: tensor, torch.abs):
        leaves64 = [sign(core.double()).requires_grad_() for core in cores]
        cache64 = None if cache_weight is None else sign(cache_weight.double()).requires_grad_()
        pooled = _expected64(leaves64, indices, offsets,
                             None if weights is None else sign(weights), mode, real_map, cache64)
        (pooled * sign(upstream.double())).sum().backward()
        grads = [leaf.grad for leaf in leaves64] + ([] if cache64 is None else [cache64.grad])
        (expected if sign is not torch.abs else magnitude).extend(grads)
    terms = RANKS[1] + RANKS[2] + 2 * max(DIM_FACTORS) + 8
    bounds = [terms * UNIT_ROUNDOFF["fp32"] * size + 1e-30 for size in magnitude]
    return mine, expected, bounds


def _all_pass(mine, expected, bounds) -> bool:
    return all(compare(actual.to_dense() if actual.is_sparse else actual, want, limit).passed
               for actual, want, limit in zip(mine, expected, bounds))


@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("cached, sparse", [(False, False), (True, False), (True, True)])
def test_backward_equals_float64_autograd_of_the_chain(mode, weighted, cached, sparse):
    cores = _cores()
    indices, offsets, weights = _inputs()
    mine, expected, bounds = _gradients(cores, indices, offsets, weights if weighted else None,
                                        mode, _cache(cores) if cached else None, sparse=sparse)
    assert len(mine) == (4 if cached else 3)
    for index, (actual, want, limit) in enumerate(zip(mine, expected, bounds)):
        assert actual.is_sparse == (sparse and index == 3)
        actual = actual.to_dense() if actual.is_sparse else actual
        assert actual.dtype == torch.float32
        comparison = compare(actual, want, limit)
        assert comparison.passed, f"gradient {index}: {comparison.describe()}"
        assert want.abs().sum() > 0  # every leaf takes some gradient here


# ---------------------------------------------------------------- planted faults

def _reversed_digit_strides(row_factors):
    """A planted digit bug: i_3 taken as the most significant digit's stride."""
    return row_factors[2], row_factors[1] * row_factors[2]


def test_planted_wrong_digit_fails(monkeypatch):
    cores = _cores()
    indices, offsets, weights = _inputs()
    assert compare(*_run(cores, indices, offsets, weights, "sum", _cache(cores))).passed
    monkeypatch.setattr(triton_tt, "digit_strides", _reversed_digit_strides)
    assert not compare(*_run(cores, indices, offsets, weights, "sum", _cache(cores))).passed
    assert not _all_pass(*_gradients(cores, indices, offsets, None, "sum", _cache(cores)))


def test_planted_dropped_core_fails():
    """The kernel given an identity middle core computes the chain without core 2."""
    ranks = (1, 4, 4, 1)
    cores = _cores(ranks=ranks)
    indices, offsets, _ = _inputs()
    identity = torch.eye(4)[:, None, None, :].expand(4, ROW_FACTORS[1], DIM_FACTORS[1], 4)
    dropped = triton_tt.tt_bag([cores[0], identity.contiguous(), cores[2]], indices, offsets)
    expected = _expected64([core.double() for core in cores], indices, offsets, None, "sum")
    bound = _bound(cores, indices, offsets, None, "sum", "fp32", expected)
    assert compare(triton_tt.tt_bag(cores, indices, offsets), expected, bound).passed
    assert not compare(dropped, expected, bound).passed


def test_planted_ignored_cache_map_fails():
    """The kernel given an empty map (every lookup a miss) against the cache's expectation."""
    cores = _cores()
    indices, offsets, weights = _inputs()
    cache = _cache(cores)
    ignored = torch.full_like(cache[0], -1)
    assert not compare(*_run(cores, indices, offsets, weights, "sum", cache,
                             slot_map=ignored)).passed
    assert _all_pass(*_gradients(cores, indices, offsets, None, "sum", cache))
    assert not _all_pass(*_gradients(cores, indices, offsets, None, "sum", cache,
                                     slot_map=ignored))


# ---------------------------------------------------------------- shapes and inputs refused

def test_shapes_the_kernel_cannot_take_are_refused_in_one_line():
    cores = _cores()
    with pytest.raises(ValueError, match="takes 3 cores, got 2"):
        triton_tt.ChainShape.of(cores[:2])
    with pytest.raises(ValueError, match="one dtype"):
        triton_tt.ChainShape.of([cores[0].double(), cores[1], cores[2]])
    with pytest.raises(ValueError, match="on-chip chain"):
        triton_tt.ChainShape.checked((10, 10, 10), (4, 4, 8), (64, 64))
    assert triton_tt.table_problem(1000, 64, 16) == ""
    assert "use a lower rank" in triton_tt.table_problem(1000, 128, 64)
    indices, offsets, weights = _inputs()
    with pytest.raises(ValueError, match="pooling mode"):
        triton_tt.tt_bag(cores, indices, offsets, mode="max")
    with pytest.raises(ValueError, match="no gradient to per_sample_weights"):
        triton_tt.tt_bag(cores, indices, offsets, weights.requires_grad_())


def test_preset_shapes_fit_on_chip_at_the_default_rank():
    for preset in ("smoke", "kaggle", "terabyte", "terabyte-10m", "mlperf"):
        workload = presets.PRESETS[preset]()
        table = workload.tables[workload.largest_table()]
        assert triton_tt.table_problem(table.rows, table.dim, 16) == "", preset


# ---------------------------------------------------------------- the module and the impls

@pytest.mark.parametrize("policy, sparse", [("lfu", False), ("lfu", True), ("none", False)])
def test_module_equals_the_reference_kernel_forward_backward_and_counters(policy, sparse):
    # 10 cache rows for 20 hot rows and 40 cold draws: hits and misses.
    reference = TTEmbeddingBag(500, 8, rank=4, cache_rows=10, cache_policy=policy,
                               validate_indices=False, sparse_cache_gradient=sparse)
    mine = copy.deepcopy(reference)
    mine.kernel = "triton"
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 500, (60,), generator=generator)
    indices[:30] %= 20  # hot rows, so the cache serves repeats
    offsets = torch.arange(0, 60, 3)
    outputs = []
    for module in (reference, mine):
        module.warm_up_cache(indices)
        module.populate_cache()
        output = module(indices, offsets)
        output.square().sum().backward()
        outputs.append(output)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-7)
    for theirs, ours in zip(reference.parameters(), mine.parameters()):
        dense = [grad.to_dense() if grad.is_sparse else grad for grad in (ours.grad, theirs.grad)]
        torch.testing.assert_close(*dense, rtol=1e-4, atol=1e-7)
    assert mine.cache_stats() == reference.cache_stats()
    assert 0 < mine.hits < 60 if policy != "none" else mine.hits == 0


@pytest.fixture
def few_rotating_batches(monkeypatch):
    """Two rotating batches: a build looks every one up once, and interpreted that is slow."""
    monkeypatch.setattr(common, "MAX_ROTATION_BATCHES", 2)
    monkeypatch.setattr(common, "MAX_ROTATION_MODEL_BATCHES", 2)


def _context(variant, precision="fp32", workload=None):
    return BuildContext(workload=workload or tiny_workload(), variant=variant,
                        precision=precision, device=CPU, seed=0, options={})


IMPL_CASES = [("tt_sls", "tt_triton", {"rank": 4}, "fp32"),
              ("tt_sls", "tt_triton", {"rank": 16}, "bf16"),
              ("tt_sls", "tt_triton_uncached", {"rank": 4}, "fp16")]


@pytest.mark.parametrize("op, impl_name, variant, precision", IMPL_CASES)
def test_impl_passes_the_worker_check_and_a_planted_digit_bug_fails(
        monkeypatch, few_rotating_batches, op, impl_name, variant, precision):
    prepared = registry.impls(op)[impl_name].build(_context(variant, precision))
    assert worker.check(prepared, ResultRow(), precision) == ""
    assert prepared.params["kernel"] == "triton" and prepared.params["triton_interpreter"]
    metrics = prepared.metrics
    assert (metrics["cache_hits"] > 0) == (impl_name == "tt_triton")
    monkeypatch.setattr(triton_tt, "digit_strides", _reversed_digit_strides)
    assert "error bound exceeded" in worker.check(prepared, ResultRow(), precision)


def test_dlrm_train_impl_passes_the_check_and_planted_backward_bug_fails(monkeypatch,
                                                                       few_rotating_batches):
    context = BuildContext(workload=tiny_workload(), variant={"tt_tables": 1, "tt_rank": 4},
                           precision="fp32", device=CPU, seed=0, options={})
    prepared = registry.impls("dlrm_train")["tt_triton"].build(context)
    assert worker.check(prepared, ResultRow(), "fp32") == ""
    assert prepared.params["tt_kernel"] == "triton"
    # A planted bug: the backward drops the core gradients (the cache still trains).
    real = triton_tt_kernels.launch_backward

    def no_core_gradients(cores, shape, indices, offsets, weights, slots, grad_out, core_grads,
                          cache_grad, mean):
        real(cores, shape, indices, offsets, weights, slots, grad_out,
             [torch.zeros_like(grad) for grad in core_grads], cache_grad, mean)

    monkeypatch.setattr(triton_tt_kernels, "launch_backward", no_core_gradients)
    assert "error bound exceeded" in worker.check(prepared, ResultRow(), "fp32")


def test_ranks_too_large_and_cpu_without_the_interpreter_are_unsupported(monkeypatch,
                                                                        few_rotating_batches):
    build = registry.impls("tt_sls")["tt_triton"].build
    with pytest.raises(Unsupported, match="use a lower rank"):
        build(_context({"rank": 64}, workload=tiny_workload(dim=128)))
    train = registry.impls("dlrm_train")["tt_triton"]
    with pytest.raises(Unsupported, match="--tt-tables"):
        train.build(_context({}))
    assert train.available("cuda", {}) == ttrec_triton.TT_TRITON_NEEDS
    assert train.available("cuda", {"tt_tables": 2}) == ""
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(Unsupported, match="TRITON_INTERPRET=1"):
        build(_context({"rank": 4}))
    assert registry.impls("tt_sls")["tt_triton"].available("cpu", {}) == ttrec_triton.CPU_SKIP


# ---------------------------------------------------------------- compiled for the GPU

# Compiles the kernels (not interpreted) for an H200's sm_90 through Triton's own ptxas, with
# no GPU, at the warps a launch uses: what the interpreter accepts but a compiled kernel
# refuses (types across a branch, shapes of a reduction) fails here.
COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from bench.models.ttrec import triton_tt_kernels as kernels
from bench.models.ttrec.triton_tt import ChainShape

assert not kernels.INTERPRETED
POINTERS = {"indices_ptr": "*i64", "offsets_ptr": "*i64", "slots_ptr": "*i32",
            "hits_ptr": "*i64"}
for row_factors, dims, ranks in ((200, 220, 250), (2, 2, 4), (16, 16)), \\
        ((100, 200, 200), (4, 4, 8), (32, 32)):
    shape = ChainShape.checked(row_factors, dims, ranks)
    for kernel, blocks, warps in ((kernels.tt_bag_forward_kernel, shape.forward_blocks(),
                                   shape.forward_warps()),
                                  (kernels.tt_bag_backward_kernel, shape.backward_blocks(),
                                   shape.backward_warps())):
        for storage, cached, weighted, mean in (("fp32", True, False, False),
                                                ("bf16", False, True, False),
                                                ("fp16", True, False, True)):
            constants = dict(zip(("D1", "D2", "D3", "R1", "R2"), dims + ranks), **blocks,
                             HAS_CACHE=cached, WEIGHTED=weighted, MEAN=mean)
            if "BF16" in kernel.arg_names:
                constants["BF16"] = storage == "bf16"
            signature = {}
            for name in kernel.arg_names:
                if name in constants:
                    signature[name] = "constexpr"
                elif name.endswith("_ptr"):
                    core = name.startswith("core") or name in ("cache_ptr", "out_ptr",
                                                               "grad_out_ptr")
                    signature[name] = POINTERS.get(name, "*" + storage if core else "*fp32")
                else:
                    signature[name] = "i32"
            source = triton.compiler.ASTSource(kernel, signature, constexprs=constants)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": warps})
            assert compiled.asm["cubin"] and compiled.metadata.num_warps == warps
            print(kernel.__name__, dims, ranks, storage, warps)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    environment = {key: value for key, value in os.environ.items()
                   if key != "TRITON_INTERPRET"}
    environment.update(PYTHONPATH=str(REPO_ROOT), TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=REPO_ROOT,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("tt_bag_") == 12
