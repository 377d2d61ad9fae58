"""Tests of the fused TT kernel and the TT cache counters."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.models.ttrec import TTEmbeddingBag
from bench.models.ttrec.fused import fused_tt_rows, stacked_digits
from bench.records import ResultRow
from bench.references import tt_rows64
from bench.registry import BuildContext, impls
from bench.run import worker
from workloads import presets

SHAPES = [((3, 4, 5), (2, 2, 3), (1, 3, 2, 1)), ((6, 7), (4, 2), (1, 3, 1))]


def _cores(row_factors, dim_factors, ranks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(ranks[k], row_factors[k], dim_factors[k], ranks[k + 1],
                        generator=generator, dtype=torch.float64, requires_grad=True)
            for k in range(len(row_factors))]


@pytest.mark.parametrize("row_factors, dim_factors, ranks", SHAPES)
def test_fused_rows_match_float64_reconstruction(row_factors, dim_factors, ranks):
    cores = _cores(row_factors, dim_factors, ranks)
    row_ids = torch.tensor([0, 5, 41, 17, 5, 3])
    fused = fused_tt_rows(cores, stacked_digits(row_ids, row_factors))
    expected = tt_rows64([core.detach() for core in cores], row_ids, row_factors)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("row_factors, dim_factors, ranks", SHAPES)
def test_fused_backward_passes_gradcheck(row_factors, dim_factors, ranks):
    cores = _cores(row_factors, dim_factors, ranks, seed=1)
    # Repeated ids check that backward accumulates into a shared slice.
    digits = stacked_digits(torch.tensor([1, 9, 9, 30, 2]), row_factors)
    assert torch.autograd.gradcheck(lambda *leaves: fused_tt_rows(leaves, digits), cores)


def test_fused_backward_skips_cores_that_need_no_gradient():
    cores = _cores(*SHAPES[0])
    cores[1].requires_grad_(False)
    rows = fused_tt_rows(cores, stacked_digits(torch.tensor([3, 7]), SHAPES[0][0]))
    rows.sum().backward()
    assert cores[1].grad is None and cores[0].grad is not None and cores[2].grad is not None


@pytest.mark.parametrize("policy", ["lfu", "lru", "none"])
def test_fused_bag_equals_reference_kernel_forward_backward_and_counters(policy):
    reference = TTEmbeddingBag(1000, 8, rank=4, cache_fraction=0.1, cache_policy=policy,
                               validate_indices=False, dtype=torch.float64)
    fused = copy.deepcopy(reference)
    fused.kernel = "fused"
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 1000, (300,), generator=generator)
    indices[:100] %= 20  # hot rows, so the cache serves repeats
    offsets = torch.arange(0, 300, 3)
    weights = torch.rand(300, generator=generator, dtype=torch.float64)
    outputs = []
    for module in (reference, fused):
        module.warm_up_cache(indices)
        module.populate_cache()
        output = module(indices, offsets, weights)
        output.square().sum().backward()
        outputs.append(output)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-14)
    for mine, theirs in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-14)
    assert fused.cache_stats() == reference.cache_stats()
    stats = fused.cache_stats()
    assert stats["lookups"] == 300 and stats["hits"] + stats["misses"] == 300
    assert (stats["hits"] > 0) == (policy != "none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_fused_rows_on_cuda_match_cpu():
    cores = _cores(*SHAPES[0])
    row_ids = torch.tensor([0, 5, 41, 17])
    expected = fused_tt_rows(cores, stacked_digits(row_ids, SHAPES[0][0]))
    cuda_cores = [core.detach().cuda().requires_grad_() for core in cores]
    rows = fused_tt_rows(cuda_cores, stacked_digits(row_ids.cuda(), SHAPES[0][0]))
    torch.testing.assert_close(rows.cpu(), expected.detach())
    rows.sum().backward()
    expected.sum().backward()
    for cuda_core, core in zip(cuda_cores, cores):
        torch.testing.assert_close(cuda_core.grad.cpu(), core.grad)


def test_lru_counts_hits_misses_and_evictions_exactly():
    module = TTEmbeddingBag(100, 4, rank=2, cache_policy="lru", cache_rows=2,
                            validate_indices=False)
    # Capacity 2: [0, 1] fills both slots; [2] evicts row 0 (least recent, lower slot);
    # [0] evicts row 1; [2, 0] hits both.
    for batch in ([0, 1], [2], [0], [2, 0]):
        module(torch.tensor(batch), torch.tensor([0]))
    assert module.cache_stats() == {"policy": "lru", "cache_rows": 2, "lookups": 6, "hits": 2,
                                    "misses": 4, "hit_rate": 2 / 6, "evictions": 2}
    module.reset_cache_stats()
    assert module.cache_stats()["evictions"] == 0 and module.lookups == 0


def test_lfu_repopulation_counts_only_dropped_rows_as_evictions():
    module = TTEmbeddingBag(100, 4, rank=2, cache_policy="lfu", cache_rows=2)
    module.warm_up_cache(torch.tensor([5, 5, 6, 6, 7]))
    module.populate_cache()
    assert module.cache_stats()["evictions"] == 0
    module.warm_up_cache(torch.tensor([5, 5, 8, 8, 9]))
    module.populate_cache()  # keeps 5, drops 6 for 8
    assert module.cache_stats()["evictions"] == 1
    assert set(module.cache.slot_to_row.tolist()) == {5, 8}


@pytest.mark.parametrize("op_name, impl_name, variant", [
    ("tt_sls", "tt_fused", {"rank": 4}), ("tt_sls", "tt_cached_lru", {"rank": 4}),
    ("dlrm_train", "tt_fused", {"tt_tables": 2, "tt_rank": 4})])
def test_fused_impls_pass_the_float64_check_and_report_cache_counters(op_name, impl_name,
                                                                      variant):
    context = BuildContext(workload=presets.smoke(), variant=variant, precision="fp32",
                           device=torch.device("cpu"), seed=0, options={})
    prepared = impls(op_name)[impl_name].build(context)
    row = ResultRow()
    assert worker.check(prepared, row, "fp32") == ""
    if op_name == "tt_sls":
        metrics = prepared.metrics
        assert metrics["cache_lookups"] == metrics["cache_hits"] + metrics["cache_misses"] > 0
        assert 0 < metrics["cache_hit_rate"] < 1
        assert (metrics["cache_evictions"] > 0) == (impl_name == "tt_cached_lru")
        assert prepared.params["kernel"] == ("fused" if impl_name == "tt_fused" else "reference")
    else:
        stats = prepared.metrics["tt_cache_stats"]
        assert len(stats) == 2 and all(entry["lookups"] > 0 for entry in stats)
