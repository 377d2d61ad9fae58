"""Tests for the TT-Rec tensor-train embedding bag, its factorization and its row cache."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional

from bench.models.ttrec import (
    TTEmbeddingBag,
    embedding_compression_ratio,
    factorize_dim,
    factorize_rows,
    tt_embedding_bag,
    tt_parameter_count,
)

KAGGLE_TABLE_ROWS = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]


def dense_reference(cores: list[torch.Tensor], num_rows: int) -> torch.Tensor:
    """Contract the TT cores into the dense float64 table with einsum (module-independent)."""
    # Axes of `full` after k cores: (n_1, d_1, ..., n_k, d_k, r_k).
    full = cores[0].detach().double()[0]
    for core in cores[1:]:
        full = torch.einsum("...a,andb->...ndb", full, core.detach().double())
    full = full[..., 0]
    num_cores = len(cores)
    row_axes = [2 * core for core in range(num_cores)]
    dim_axes = [2 * core + 1 for core in range(num_cores)]
    row_capacity = math.prod(full.shape[axis] for axis in row_axes)
    dim = math.prod(full.shape[axis] for axis in dim_axes)
    return full.permute(*row_axes, *dim_axes).reshape(row_capacity, dim)[:num_rows]


def compression_from_parts(num_compressed: int, rank: int) -> float:
    """Compute the Kaggle embedding compression directly from factorize_* and the count formula."""
    largest = sorted(KAGGLE_TABLE_ROWS, reverse=True)[:num_compressed]
    dense_bytes = sum(KAGGLE_TABLE_ROWS) * 16 * 4
    uncompressed_bytes = (sum(KAGGLE_TABLE_ROWS) - sum(largest)) * 16 * 4
    tt_bytes = sum(
        4 * tt_parameter_count(factorize_rows(rows), factorize_dim(16), rank) for rows in largest
    )
    return dense_bytes / (uncompressed_bytes + tt_bytes)


# ----------------------------------------------------------------------------- factorization
def test_factorize_rows_reproduces_paper_shape_for_largest_kaggle_table() -> None:
    """10131227 rounds up to 11000000 = 200 * 220 * 250, returned in ascending order."""
    assert factorize_rows(10131227) == (200, 220, 250)
    assert factorize_rows(10131227, num_cores=3) == (200, 220, 250)


@pytest.mark.parametrize("num_cores", [2, 3, 4])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 7, 101, 1460, 142572, 2202608, 8351593])
def test_factorize_rows_covers_rows_and_is_ascending(num_rows: int, num_cores: int) -> None:
    """Row factors cover every row, are ascending, and pad by less than one rounding step."""
    factors = factorize_rows(num_rows, num_cores)
    assert len(factors) == num_cores
    assert math.prod(factors) >= num_rows
    assert list(factors) == sorted(factors)
    # Padding never exceeds rounding up to the leading decimal digit.
    leading = 10 ** (len(str(num_rows)) - 1)
    assert math.prod(factors) <= -(-num_rows // leading) * leading


def test_factorize_rows_balances_largest_kaggle_tables() -> None:
    """Every large Kaggle table gets factors within a factor 1.5 of each other."""
    for rows in sorted(KAGGLE_TABLE_ROWS, reverse=True)[:7]:
        factors = factorize_rows(rows)
        assert max(factors) / min(factors) < 1.5, (rows, factors)


def test_factorize_dim_matches_paper_and_is_exact() -> None:
    """Dims split exactly into near-balanced ascending factors."""
    assert factorize_dim(16) == (2, 2, 4)
    assert factorize_dim(64) == (4, 4, 4)
    assert factorize_dim(128) == (4, 4, 8)
    assert factorize_dim(16, num_cores=2) == (4, 4)
    assert factorize_dim(16, num_cores=4) == (2, 2, 2, 2)
    for dim in [1, 6, 13, 24, 32, 48, 96, 256]:
        for num_cores in [2, 3, 4]:
            factors = factorize_dim(dim, num_cores)
            assert math.prod(factors) == dim
            assert len(factors) == num_cores


def test_tt_parameter_count_formula() -> None:
    """The count is sum_k r_{k-1} n_k d_k r_k with r_0 = r_K = 1."""
    expected = 1 * 200 * 2 * 32 + 32 * 220 * 2 * 32 + 32 * 250 * 4 * 1
    assert tt_parameter_count((200, 220, 250), (2, 2, 4), 32) == expected == 495360
    assert tt_parameter_count((4, 5, 6), (2, 3, 4), (3, 7)) == 4 * 2 * 3 + 3 * 5 * 3 * 7 + 7 * 6 * 4
    assert tt_parameter_count((5, 6), (2, 8), (1, 4, 1)) == 5 * 2 * 4 + 4 * 6 * 8


def test_module_sizes_for_largest_kaggle_table() -> None:
    """Module size properties agree with the formula and the allocated cores."""
    table = TTEmbeddingBag(10131227, 16, rank=32, cache_policy="none")
    assert table.row_factors == (200, 220, 250)
    assert table.dim_factors == (2, 2, 4)
    assert table.tt_parameter_count == 495360
    assert sum(core.numel() for core in table.cores) == 495360
    assert table.tt_bytes == 4 * 495360
    assert table.dense_bytes == 10131227 * 16 * 4
    assert table.compression_ratio == pytest.approx(10131227 * 16 / 495360)
    assert table.cache_bytes == 0


# ----------------------------------------------------------------------------- compression
@pytest.mark.parametrize(
    ("num_compressed", "rank", "paper_ratio"),
    [(7, 32, 117.0), (7, 8, 221.0), (3, 8, 4.0), (3, 16, 4.0), (3, 32, 4.0), (3, 64, 4.0)],
)
def test_kaggle_embedding_compression_matches_paper(
    num_compressed: int, rank: int, paper_ratio: float
) -> None:
    """Embedding-only fp32 compression reproduces TT-Rec's 117x, 221x and ~4x within 3%."""
    ratio = compression_from_parts(num_compressed, rank)
    assert ratio == pytest.approx(paper_ratio, rel=0.03)
    assert embedding_compression_ratio(KAGGLE_TABLE_ROWS, 16, num_compressed, rank) == (
        pytest.approx(ratio)
    )


# ----------------------------------------------------------------------------- forward
CORE_CONFIGS = [
    # (num_rows, dim, rank, num_cores)
    (37, 6, 3, 2),
    (101, 8, (3, 5), 3),
    (50, 16, (2, 3, 2), 4),
]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("num_rows", "dim", "rank", "num_cores"), CORE_CONFIGS)
def test_lookup_matches_float64_dense_reference(
    num_rows: int, dim: int, rank: int | tuple[int, ...], num_cores: int, weighted: bool
) -> None:
    """float32 TT lookups equal float64 embedding_bag over the einsum-contracted table."""
    generator = torch.Generator().manual_seed(num_rows + dim)
    table = TTEmbeddingBag(num_rows, dim, rank=rank, num_cores=num_cores, cache_policy="none",
                           seed=num_rows, init_std=1.0)
    assert len(table.cores) == num_cores
    reference_table = dense_reference(list(table.cores), num_rows)
    torch.testing.assert_close(table.full_weight().double(), reference_table,
                               rtol=1e-5, atol=1e-5)

    indices = torch.randint(0, num_rows, (40,), generator=generator)
    indices[[0, 7, 39]] = num_rows - 1  # the last row, including in the final bag
    indices[5] = 0
    # Empty bags at the start, in the middle (two in a row) and at the end.
    offsets = torch.tensor([0, 0, 3, 9, 9, 9, 20, 40])
    weights = torch.rand(40, generator=generator) if weighted else None
    output = table(indices, offsets, per_sample_weights=weights)
    expected = functional.embedding_bag(
        indices, reference_table, offsets, mode="sum",
        per_sample_weights=None if weights is None else weights.double(),
    )
    assert output.shape == (8, dim)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    for empty_bag in [0, 3, 4, 7]:
        assert torch.count_nonzero(output[empty_bag]) == 0
    assert torch.count_nonzero(output[1]) > 0


def test_two_dimensional_indices_and_validation() -> None:
    """[bags, bag_size] indices without offsets equal explicit offsets; bad rows raise."""
    table = TTEmbeddingBag(64, 8, rank=4, cache_policy="none", init_std=1.0)
    indices = torch.tensor([[1, 63, 5], [5, 5, 0]])
    flat = table(indices.reshape(-1), torch.tensor([0, 3]))
    torch.testing.assert_close(table(indices), flat)
    with pytest.raises(IndexError):
        table(torch.tensor([64]), torch.tensor([0]))
    with pytest.raises(IndexError):
        table(torch.tensor([-1]), torch.tensor([0]))


def test_sampled_gaussian_init_matches_target_std() -> None:
    """Reconstructed entries have mean ~0 and std ~init_std (default sqrt(1 / (3 N)))."""
    num_rows = 4096
    table = TTEmbeddingBag(num_rows, 16, rank=16, cache_policy="none")
    assert table.init_std == pytest.approx(math.sqrt(1.0 / (3.0 * num_rows)))
    ratios = []
    for seed in range(4):
        seeded = TTEmbeddingBag(num_rows, 16, rank=16, cache_policy="none", seed=seed)
        weight = seeded.full_weight().detach().double()
        ratios.append(weight.std().item() / seeded.init_std)
        assert abs(weight.mean().item()) < 0.1 * seeded.init_std
    # Entries share cores, so one draw is noisy; the mean over seeds is close to 1.
    assert 0.85 < sum(ratios) / len(ratios) < 1.15
    assert all(0.6 < ratio < 1.5 for ratio in ratios)
    # Same seed, same cores; different seed, different cores.
    again = TTEmbeddingBag(num_rows, 16, rank=16, cache_policy="none", seed=0)
    other = TTEmbeddingBag(num_rows, 16, rank=16, cache_policy="none", seed=1)
    assert torch.equal(again.cores[1], TTEmbeddingBag(num_rows, 16, rank=16,
                                                       cache_policy="none").cores[1])
    assert not torch.equal(again.cores[1], other.cores[1])


# ----------------------------------------------------------------------------- gradients
def test_gradcheck_functional_cores_and_weights() -> None:
    """Autograd gradients w.r.t. cores and per-sample weights match finite differences."""
    table = TTEmbeddingBag(10, 4, rank=2, row_factors=(2, 2, 3), dim_factors=(1, 2, 2),
                           cache_policy="none", dtype=torch.float64, init_std=1.0)
    cores = [core.detach().clone().requires_grad_(True) for core in table.cores]
    indices = torch.tensor([9, 0, 3, 3, 9, 4])
    offsets = torch.tensor([0, 2, 2, 5])
    weights = torch.rand(6, dtype=torch.float64, requires_grad=True)

    def bag(*inputs: torch.Tensor) -> torch.Tensor:
        return tt_embedding_bag(inputs[:-1], table.row_factors, indices, offsets, inputs[-1])

    assert torch.autograd.gradcheck(bag, (*cores, weights))


def test_gradcheck_module_with_populated_cache() -> None:
    """Module gradients (cores and cache rows, mixed cached/uncached batch) pass gradcheck."""
    table = TTEmbeddingBag(10, 4, rank=2, row_factors=(2, 2, 3), dim_factors=(1, 2, 2),
                           cache_rows=2, cache_policy="lfu", dtype=torch.float64, init_std=1.0)
    table.warm_up_cache(torch.tensor([9, 9, 3]))
    table.populate_cache()
    names = [name for name, _ in table.named_parameters()]
    assert "cache.weight" in names
    parameters = [parameter.detach().clone().requires_grad_(True)
                  for parameter in table.parameters()]
    indices = torch.tensor([9, 0, 3, 3, 9, 4])
    offsets = torch.tensor([0, 2, 2, 5])

    def bag(*inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(table, dict(zip(names, inputs)), (indices, offsets))

    assert torch.autograd.gradcheck(bag, tuple(parameters))


def test_sgd_step_changes_cores_and_reduces_loss() -> None:
    """Plain SGD on the cores lowers a regression loss on pooled bags."""
    generator = torch.Generator().manual_seed(3)
    table = TTEmbeddingBag(200, 16, rank=4, cache_policy="none", init_std=0.5)
    indices = torch.randint(0, 200, (64,), generator=generator)
    offsets = torch.arange(0, 64, 4)
    target = torch.randn(16, 16, generator=generator)
    optimizer = torch.optim.SGD(table.parameters(), lr=0.05)
    before = [core.detach().clone() for core in table.cores]

    def loss_value() -> torch.Tensor:
        return functional.mse_loss(table(indices, offsets), target)

    initial = loss_value()
    initial.backward()
    assert all(core.grad is not None and core.grad.abs().sum() > 0 for core in table.cores)
    optimizer.step()
    after_one = loss_value().item()
    assert after_one < initial.item()
    assert all(not torch.equal(old, new) for old, new in zip(before, table.cores))
    for _ in range(20):
        optimizer.zero_grad()
        loss_value().backward()
        optimizer.step()
    assert loss_value().item() < after_one


# ----------------------------------------------------------------------------- cache
def paired_tables(policy: str, **options: object) -> tuple[TTEmbeddingBag, TTEmbeddingBag]:
    """Return an uncached and a cached table with identical cores."""
    plain = TTEmbeddingBag(20, 8, rank=3, cache_policy="none", init_std=1.0, seed=5)
    cached = TTEmbeddingBag(20, 8, rank=3, cache_policy=policy, init_std=1.0, seed=5, **options)
    for plain_core, cached_core in zip(plain.cores, cached.cores):
        assert torch.equal(plain_core, cached_core)
    return plain, cached


def cached_rows(table: TTEmbeddingBag) -> set[int]:
    """Return the set of row ids currently held by the cache."""
    assert table.cache is not None
    rows = table.cache.slot_to_row
    mapped = {int(row) for row in rows[rows >= 0]}
    slots = torch.nonzero(table.cache.row_to_slot >= 0).reshape(-1)
    assert {int(row) for row in slots} == mapped  # row->slot and slot->row agree
    return mapped


def test_lfu_populate_caches_most_frequent_rows_and_counts_hits() -> None:
    """LFU keeps the top warm-up rows (10% of 20 = 2) and counts per-lookup hits."""
    plain, table = paired_tables("lfu")
    assert table.cache is not None and table.cache.capacity == 2
    table.warm_up_cache(torch.tensor([3, 7, 3, 1, 7, 3, 9, 3, 7, 1, 3, 7]))  # 3:5, 7:4, 1:2, 9:1
    assert table.populate_cache() == 2
    assert cached_rows(table) == {3, 7}
    slots = table.cache.slots_for(torch.tensor([3, 7]))
    torch.testing.assert_close(table.cache.weight[slots],
                               table.reconstruct_rows(torch.tensor([3, 7])))

    indices = torch.tensor([3, 3, 7, 1, 9, 9, 0])
    offsets = torch.tensor([0, 3, 3, 5])
    table.reset_cache_stats()
    output = table(indices, offsets)
    assert (table.hits, table.lookups) == (3, 7)
    assert table.hit_rate == pytest.approx(3 / 7)
    torch.testing.assert_close(output, plain(indices, offsets), rtol=1e-6, atol=1e-6)
    table(torch.tensor([0, 1]), torch.tensor([0]))
    assert (table.hits, table.lookups) == (3, 9)
    table.reset_cache_stats()
    assert (table.hits, table.lookups, table.hit_rate) == (0, 0, 0.0)


def test_lfu_automatic_warm_up_populates_after_k_calls() -> None:
    """With cache_warm_up_steps=2 the first two calls only count, the third is served cached."""
    plain, table = paired_tables("lfu", cache_warm_up_steps=2)
    offsets = torch.tensor([0])
    table(torch.tensor([4, 4, 4, 2]), offsets)
    table(torch.tensor([4, 11, 11, 2, 2]), offsets)  # 4:4, 2:3, 11:2
    assert cached_rows(table) == set()
    assert table.hits == 0 and table.lookups == 9
    table.reset_cache_stats()
    output = table(torch.tensor([4, 2, 11]), offsets)
    assert cached_rows(table) == {2, 4}
    assert (table.hits, table.lookups) == (2, 3)
    torch.testing.assert_close(output, plain(torch.tensor([4, 2, 11]), offsets),
                               rtol=1e-6, atol=1e-6)


def test_lru_hand_made_stream_hits_and_evictions() -> None:
    """LRU (capacity 2) admits misses, evicts the least recently used, counts hits per lookup."""
    plain, table = paired_tables("lru")
    stream = [
        # (batch, hits in this batch, cached rows afterwards)
        ([1, 2], 0, {1, 2}),
        ([1, 3], 1, {1, 3}),  # 2 is older than 1, so 2 goes
        ([2, 2, 1], 1, {1, 2}),  # 1 was used by this batch, so 3 goes
        ([3, 1, 2], 2, {1, 2}),  # both slots in use by this batch: 3 is served from the cores
        ([2, 3], 1, {2, 3}),  # 1 is least recently used
    ]
    total_hits = total_lookups = 0
    for batch, hits, rows_after in stream:
        indices = torch.tensor(batch)
        offsets = torch.tensor([0, 1])
        output = table(indices, offsets)
        total_hits += hits
        total_lookups += len(batch)
        assert (table.hits, table.lookups) == (total_hits, total_lookups), batch
        assert cached_rows(table) == rows_after, batch
        torch.testing.assert_close(output, plain(indices, offsets), rtol=1e-6, atol=1e-6)
    assert table.hit_rate == pytest.approx(5 / 12)


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_cached_and_uncached_paths_agree_after_populate(policy: str) -> None:
    """Right after population, cached lookups equal pure TT lookups (values and gradients)."""
    generator = torch.Generator().manual_seed(11)
    plain = TTEmbeddingBag(500, 16, rank=4, cache_policy="none", init_std=1.0)
    table = TTEmbeddingBag(500, 16, rank=4, cache_policy=policy, init_std=1.0)
    warm_up = torch.randint(0, 500, (400,), generator=generator)
    table.warm_up_cache(warm_up)
    table.populate_cache()
    assert table.cache is not None and len(cached_rows(table)) == 50
    indices = torch.cat([warm_up[:100], torch.randint(0, 500, (100,), generator=generator)])
    offsets = torch.arange(0, 200, 5)
    weights = torch.rand(200, generator=generator)
    table.reset_cache_stats()
    output = table(indices, offsets, weights)
    assert 0 < table.hits < table.lookups == 200
    torch.testing.assert_close(output, plain(indices, offsets, weights), rtol=1e-6, atol=1e-6)


def test_training_updates_cache_only_and_populate_discards_updates() -> None:
    """Cached rows train in the cache, cores get no gradient from them, populate overwrites."""
    plain, table = paired_tables("lfu")
    table.warm_up_cache(torch.tensor([3, 3, 3, 7, 7]))
    table.populate_cache()
    assert table.cache is not None and cached_rows(table) == {3, 7}
    optimizer = torch.optim.SGD(table.parameters(), lr=0.5)
    row = torch.tensor([3])
    tt_row_before = table.reconstruct_rows(row).detach().clone()
    cores_before = [core.detach().clone() for core in table.cores]

    table(row, torch.tensor([0])).sum().backward()
    assert all(core.grad is None for core in table.cores)  # cores are not in the graph
    slot = int(table.cache.slots_for(row))
    assert torch.count_nonzero(table.cache.weight.grad[slot]) == 8
    optimizer.step()

    # The cache row moved, the cores (and the TT value of the row) did not.
    assert all(torch.equal(old, new) for old, new in zip(cores_before, table.cores))
    torch.testing.assert_close(table.reconstruct_rows(row), tt_row_before)
    served = table(row, torch.tensor([0])).detach()
    torch.testing.assert_close(served, tt_row_before - 0.5)
    # Re-populating (same rows: no new counts) overwrites the trained value from the cores.
    assert table.populate_cache() == 2
    torch.testing.assert_close(table(row, torch.tensor([0])), tt_row_before)

    # In a mixed batch the cores get exactly the gradient of the uncached row alone.
    optimizer.zero_grad()
    table(torch.tensor([3, 5, 7]), torch.tensor([0])).square().sum().backward()
    plain(torch.tensor([5]), torch.tensor([0])).add(
        table.cache.weight[table.cache.slots_for(torch.tensor([3, 7]))].sum(0).detach()
    ).square().sum().backward()
    for cached_core, plain_core in zip(table.cores, plain.cores):
        torch.testing.assert_close(cached_core.grad, plain_core.grad)


def test_sparse_cache_gradient_matches_dense_update() -> None:
    """sparse_cache_gradient gives a sparse cache gradient and the same SGD update as dense."""
    updated = []
    for sparse in [False, True]:
        table = TTEmbeddingBag(20, 8, rank=3, cache_policy="lfu", init_std=1.0, seed=5,
                               sparse_cache_gradient=sparse)
        table.warm_up_cache(torch.tensor([3, 3, 7]))
        table.populate_cache()
        assert table.cache is not None
        populated = table.cache.weight.detach().clone()
        optimizer = torch.optim.SGD(table.parameters(), lr=0.1)
        table(torch.tensor([3, 7, 7, 2]), torch.tensor([0, 2])).square().sum().backward()
        assert table.cache.weight.grad is not None
        assert table.cache.weight.grad.is_sparse == sparse
        optimizer.step()
        assert not torch.equal(table.cache.weight, populated)
        updated.append([parameter.detach().clone() for parameter in table.parameters()])
    for dense_value, sparse_value in zip(*updated):
        torch.testing.assert_close(dense_value, sparse_value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["none", "lfu", "lru"])
def test_cuda_matches_cpu(policy: str) -> None:
    """The same table on CUDA gives the CPU output and gradients (TF32 is off by default)."""
    indices = torch.tensor([0, 5, 5, 199, 42, 7, 5])
    offsets = torch.tensor([0, 3, 3, 6])
    outputs, gradients = [], []
    for device in ["cpu", "cuda"]:
        table = TTEmbeddingBag(200, 16, rank=4, cache_policy=policy, init_std=1.0, device=device)
        table.warm_up_cache(indices[:3].to(device))
        table.populate_cache()
        output = table(indices.to(device), offsets.to(device))
        output.square().sum().backward()
        outputs.append(output.detach().cpu())
        # Under LRU every row of this batch is admitted, so the cores may get no gradient.
        gradients.append([
            torch.zeros(parameter.shape) if parameter.grad is None else parameter.grad.cpu()
            for parameter in table.parameters()
        ])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for cpu_gradient, cuda_gradient in zip(*gradients):
        torch.testing.assert_close(cpu_gradient, cuda_gradient, rtol=1e-4, atol=1e-5)
