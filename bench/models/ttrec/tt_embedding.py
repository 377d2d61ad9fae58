"""TT-Rec tensor-train EmbeddingBag (sum pooling) in pure PyTorch ops, with a row cache."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

from bench.models.ttrec.cache import CACHE_POLICIES, RowCache
from bench.models.ttrec.fused import fused_tt_rows, stacked_digits
from bench.models.ttrec.factorize import (
    factorize_dim,
    factorize_rows,
    full_ranks,
    tt_parameter_count,
)

# How rows are reconstructed from the cores: "reference" (per-op autograd graph), "fused"
# (one autograd node with a hand-written bmm backward, bench.models.ttrec.fused) or "triton"
# (one Triton launch a batch, cache read in the kernel, bench.models.ttrec.triton_tt).
TT_KERNELS = ("reference", "fused", "triton")
PER_LOOKUP_KERNELS = ("fused", "triton")
# full_weight() reconstructs in chunks so a medium table does not need a huge bmm intermediate.
RECONSTRUCT_CHUNK_ROWS = 65536


def row_digits(row_ids: torch.Tensor, row_factors: Sequence[int]) -> list[torch.Tensor]:
    """Split row ids into mixed-radix digits (i_1, ..., i_K), i_1 the most significant."""
    digits = []
    stride = math.prod(row_factors)
    for factor in row_factors:
        stride //= factor
        digits.append(torch.div(row_ids, stride, rounding_mode="floor") % factor)
    return digits


def reconstruct_tt_rows(
    cores: Sequence[torch.Tensor], row_ids: torch.Tensor, row_factors: Sequence[int]
) -> torch.Tensor:
    """Return rows [len(row_ids), prod d_k] as the product of the gathered core slices.

    Core k has shape (r_{k-1}, n_k, d_k, r_k). The running product for a batch of B rows is kept
    as [B, d_1 * ... * d_k, r_k] and extended with one batched matmul per core, so the output
    column index is the row-major flattening of (j_1, ..., j_K), j_1 the most significant.
    """
    row_ids = row_ids.reshape(-1).long()
    batch = row_ids.numel()
    state: torch.Tensor | None = None
    prefix_dim = 1
    for core, digit in zip(cores, row_digits(row_ids, row_factors)):
        left_rank, _, core_dim, right_rank = core.shape
        slices = core.index_select(1, digit)  # [r_{k-1}, B, d_k, r_k]
        if state is None:
            # r_0 == 1, so dropping the leading axis is a free view.
            state = slices.reshape(batch, core_dim, right_rank)
        else:
            right = slices.permute(1, 0, 2, 3).reshape(batch, left_rank, core_dim * right_rank)
            state = torch.bmm(state, right).reshape(batch, prefix_dim * core_dim, right_rank)
        prefix_dim *= core_dim
    assert state is not None
    return state.reshape(batch, prefix_dim)


def tt_embedding_bag(
    cores: Sequence[torch.Tensor],
    row_factors: Sequence[int],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Functional uncached TT EmbeddingBag (sum pooling) with per-batch row deduplication."""
    unique_ids, inverse = torch.unique(indices.reshape(-1), return_inverse=True)
    rows = reconstruct_tt_rows(cores, unique_ids, row_factors)
    return functional.embedding_bag(
        inverse, rows, offsets.long(), mode="sum", per_sample_weights=per_sample_weights
    )


class TTEmbeddingBag(nn.Module):
    """Tensor-train compressed EmbeddingBag (sum pooling), TT-Rec style, with a hot-row cache.

    A [num_rows, dim] table is stored as cores G_k of shape (r_{k-1}, n_k, d_k, r_k), r_0 = r_K = 1,
    with prod n_k >= num_rows and prod d_k == dim. Row i with mixed-radix digits (i_1, ..., i_K),
    i_1 most significant, is G_1[:, i_1] @ ... @ G_K[:, i_K] flattened to dim. Defaults:
    factorize_rows / factorize_dim (ascending factors).

    Forward deduplicates the batch's row ids (torch.unique), reconstructs each distinct uncached
    row once with batched matmuls, serves cached rows from the cache, and sum-pools with
    embedding_bag over that per-batch intermediate; autograd yields dense core gradients.

    Initialization ("sampled Gaussian"): every core entry is i.i.d. N(0, s^2), with
    s = (init_std^2 / prod_k r_k)^(1 / (2K)). Each reconstructed element is a sum of
    prod_k r_k independent products of K such entries, so it has mean 0 and variance exactly
    init_std^2 (and is close to Gaussian by the central limit theorem). init_std defaults to
    sqrt(1 / (3 * num_rows)), the standard deviation of the DLRM reference embedding init
    U(-1/sqrt(num_rows), 1/sqrt(num_rows)).

    Cache consistency (TT-Rec reference semantics; no write-back): cached rows are an
    uncompressed trainable nn.Parameter (`cache.weight`). A looked-up row that is cached is served
    from the cache, so its gradient updates the cache only and the cores receive no gradient
    from it. Cached values are never written back to the cores: populate_cache() overwrites every
    cached row with the current core reconstruction (LFU without new warm-up counts refreshes the
    same rows), LRU admission loads rows from the cores, and LRU eviction drops the trained value.
    reconstruct_rows() / full_weight() always return the core (TT) values. With
    sparse_cache_gradient=True the cache gets sparse COO gradients (use an optimizer that accepts
    them, e.g. SGD or Adagrad); cores always get dense gradients. Caching assumes one forward per
    backward: LRU admission or a populate between a forward and its backward remaps slots.

    Cache policies: the cache holds cache_rows rows (default round(cache_fraction * num_rows)).
    "lfu" counts row frequencies during a warm-up (warm_up_cache(), or automatically during the
    first cache_warm_up_steps forward calls, populating on the next call) and populate_cache()
    then caches the most frequent rows; "lru" admits missed rows on every forward call, evicting
    the least recently used rows not touched by that call; "none" disables the cache. Hit
    statistics count every looked-up index (duplicates included) against the cache state before
    the call's own LRU admission. validate_indices checks the id range (one host sync per call).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        rank: int | Sequence[int] = 16,
        num_cores: int = 3,
        row_factors: Sequence[int] | None = None,
        dim_factors: Sequence[int] | None = None,
        cache_fraction: float = 0.1,
        cache_policy: str = "lfu",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
        init_std: float | None = None,
        cache_rows: int | None = None,
        cache_warm_up_steps: int = 0,
        validate_indices: bool = True,
        sparse_cache_gradient: bool = False,
        kernel: str = "reference",
    ) -> None:
        super().__init__()
        if kernel not in TT_KERNELS:
            raise ValueError(f"kernel must be one of {TT_KERNELS}, got {kernel!r}")
        self.kernel = kernel
        if cache_policy not in CACHE_POLICIES:
            raise ValueError(f"cache_policy must be one of {CACHE_POLICIES}, got {cache_policy!r}")
        # Explicit factors fix the number of cores.
        if row_factors is not None or dim_factors is not None:
            num_cores = len(row_factors if row_factors is not None else dim_factors)
        row_factors = tuple(row_factors or factorize_rows(num_rows, num_cores))
        dim_factors = tuple(dim_factors or factorize_dim(dim, num_cores))
        if len(dim_factors) != num_cores:
            raise ValueError("row_factors and dim_factors must have one entry per core")
        if math.prod(row_factors) < num_rows:
            raise ValueError(f"prod(row_factors)={math.prod(row_factors)} < num_rows={num_rows}")
        if math.prod(dim_factors) != dim:
            raise ValueError(f"prod(dim_factors)={math.prod(dim_factors)} != dim={dim}")
        self.num_rows = num_rows
        self.dim = dim
        self.num_cores = num_cores
        self.row_factors = row_factors
        self.dim_factors = dim_factors
        self.ranks = full_ranks(rank, num_cores)
        self.cache_policy = cache_policy
        self.cache_warm_up_steps = cache_warm_up_steps
        self.validate_indices = validate_indices
        self.sparse_cache_gradient = sparse_cache_gradient
        self.init_std = init_std if init_std is not None else math.sqrt(1.0 / (3.0 * num_rows))
        self.cores = nn.ParameterList(self._sampled_gaussian_cores(seed, dtype, device))

        if cache_rows is None:
            cache_rows = round(cache_fraction * num_rows)
        cache_rows = min(cache_rows, num_rows)
        self.cache: RowCache | None = None
        if cache_policy != "none" and cache_rows > 0:
            self.cache = RowCache(num_rows, dim, cache_rows, cache_policy, dtype, device)
        device_of_cores = self.cores[0].device
        self.register_buffer("_hits", torch.zeros((), dtype=torch.int64, device=device_of_cores),
                             persistent=False)
        self.register_buffer("_lookups", torch.zeros((), dtype=torch.int64,
                                                     device=device_of_cores), persistent=False)
        self._forward_calls = 0
        self._auto_populated = False

    def _sampled_gaussian_cores(
        self, seed: int, dtype: torch.dtype, device: torch.device | str | None
    ) -> list[nn.Parameter]:
        """Draw cores so reconstructed entries have mean 0 and standard deviation init_std."""
        # Drawn on CPU from a private generator so the values do not depend on the device.
        generator = torch.Generator().manual_seed(seed)
        bond_product = math.prod(self.ranks)
        core_std = (self.init_std**2 / bond_product) ** (1.0 / (2 * self.num_cores))
        cores = []
        for core in range(self.num_cores):
            shape = (self.ranks[core], self.row_factors[core], self.dim_factors[core],
                     self.ranks[core + 1])
            values = torch.randn(shape, generator=generator, dtype=torch.float64) * core_std
            cores.append(nn.Parameter(values.to(dtype=dtype, device=device)))
        return cores

    # ----------------------------------------------------------------------------- sizes
    @property
    def tt_parameter_count(self) -> int:
        """Return the number of TT core parameters."""
        return tt_parameter_count(self.row_factors, self.dim_factors, self.ranks)

    @property
    def element_bytes(self) -> int:
        """Return bytes per stored element."""
        return self.cores[0].element_size()

    @property
    def tt_bytes(self) -> int:
        """Return bytes of the TT cores (cache excluded)."""
        return self.tt_parameter_count * self.element_bytes

    @property
    def dense_bytes(self) -> int:
        """Return bytes of the equivalent uncompressed [num_rows, dim] table."""
        return self.num_rows * self.dim * self.element_bytes

    @property
    def cache_bytes(self) -> int:
        """Return bytes of the cache: values plus row->slot, slot->row and LRU-age maps."""
        if self.cache is None:
            return 0
        tensors = (self.cache.weight, self.cache.row_to_slot, self.cache.slot_to_row,
                   self.cache.last_used)
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    @property
    def compression_ratio(self) -> float:
        """Return dense_bytes / tt_bytes (cache excluded)."""
        return self.dense_bytes / self.tt_bytes

    # ----------------------------------------------------------------------------- cache stats
    @property
    def hits(self) -> int:
        """Return the number of looked-up indices served from the cache since the last reset."""
        return int(self._hits.item())

    @property
    def lookups(self) -> int:
        """Return the number of looked-up indices since the last reset."""
        return int(self._lookups.item())

    @property
    def hit_rate(self) -> float:
        """Return hits / lookups (0.0 before any lookup)."""
        lookups = self.lookups
        return self.hits / lookups if lookups else 0.0

    def cache_stats(self) -> dict:
        """Counters since the last reset, as FBGEMM's cache reports them: lookups, hits,
        misses (lookups served by the cores), hit rate and evictions."""
        lookups, hits = self.lookups, self.hits
        return {"policy": self.cache_policy, "cache_rows": 0 if self.cache is None
                else self.cache.capacity, "lookups": lookups, "hits": hits,
                "misses": lookups - hits, "hit_rate": hits / lookups if lookups else 0.0,
                "evictions": 0 if self.cache is None else int(self.cache.evictions.item())}

    def reset_cache_stats(self) -> None:
        """Zero the hit, lookup and eviction counters."""
        self._hits.zero_()
        self._lookups.zero_()
        if self.cache is not None:
            self.cache.evictions.zero_()

    # ----------------------------------------------------------------------------- rows
    def reconstruct_rows(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Return the TT (uncached) rows [len(row_ids), dim]; differentiable w.r.t. the cores."""
        row_ids = row_ids.to(self.cores[0].device)
        if self._triton_runs(row_ids.device):
            from bench.models.ttrec.triton_tt import tt_rows

            return tt_rows(list(self.cores), row_ids)
        if self.kernel in PER_LOOKUP_KERNELS:
            return fused_tt_rows(list(self.cores), stacked_digits(row_ids, self.row_factors))
        return reconstruct_tt_rows(list(self.cores), row_ids, self.row_factors)

    def _triton_runs(self, device: torch.device) -> bool:
        """kernel="triton" where its kernels run here; elsewhere (the CPU copy a GPU run builds
        and warms its cache on) the fused bmm chain computes the same rows."""
        if self.kernel != "triton":
            return False
        # Imported here: triton is optional, and its import fixes the interpreter choice.
        from bench.models.ttrec.triton_tt import runs_on

        return runs_on(device)

    def full_weight(self) -> torch.Tensor:
        """Return the dense [num_rows, dim] TT reconstruction (cache ignored; small tables)."""
        device = self.cores[0].device
        chunks = [
            self.reconstruct_rows(torch.arange(start, min(start + RECONSTRUCT_CHUNK_ROWS,
                                                          self.num_rows), device=device))
            for start in range(0, self.num_rows, RECONSTRUCT_CHUNK_ROWS)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def _reconstruct_detached(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Return TT rows without autograd history (cache fills)."""
        return self.reconstruct_rows(row_ids)

    # ----------------------------------------------------------------------------- cache control
    @torch.no_grad()
    def warm_up_cache(self, indices: torch.Tensor) -> None:
        """Feed indices to the cache: LFU counts them, LRU admits them; no-op without a cache."""
        if self.cache is None:
            return
        unique_ids, counts = torch.unique(indices.reshape(-1).long().to(self.cores[0].device),
                                          return_counts=True)
        if self.cache_policy == "lfu":
            self.cache.record(unique_ids, counts)
        else:
            self.cache.admit(unique_ids, counts, self._reconstruct_detached)

    def populate_cache(self) -> int:
        """Fill the cache from the cores (LFU: most frequent warm-up rows); returns rows cached."""
        if self.cache is None:
            return 0
        return self.cache.populate(self._reconstruct_detached)

    # ----------------------------------------------------------------------------- forward
    def forward(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return [num_bags, dim] bag sums; offsets are bag starts (or None with 2-D indices)."""
        if offsets is None:
            if indices.dim() != 2:
                raise ValueError("offsets may only be omitted for 2-D [bags, bag_size] indices")
            num_bags, bag_size = indices.shape
            offsets = torch.arange(0, num_bags * bag_size, bag_size, device=indices.device)
        indices = indices.reshape(-1).long()
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
        if self._per_lookup_path():
            return self._forward_per_lookup(indices, offsets.long(), per_sample_weights)
        unique_ids, inverse, counts = torch.unique(indices, return_inverse=True,
                                                   return_counts=True)
        if self.validate_indices and unique_ids.numel() > 0:
            # unique_ids is sorted, so only its ends need checking.
            lowest, highest = int(unique_ids[0].item()), int(unique_ids[-1].item())
            if lowest < 0 or highest >= self.num_rows:
                raise IndexError(f"row index out of range [0, {self.num_rows}): "
                                 f"min {lowest}, max {highest}")
        rows = self._unique_rows(unique_ids, counts)
        return functional.embedding_bag(inverse, rows, offsets.long(), mode="sum",
                                        per_sample_weights=per_sample_weights)

    def _per_lookup_path(self) -> bool:
        """The fused and Triton kernels skip deduplication unless LRU admission or LFU warm-up
        needs it."""
        if self.kernel not in PER_LOOKUP_KERNELS or self.validate_indices:
            return False
        if self.cache_policy == "lru":
            return False
        warming = (self.cache_policy == "lfu" and self.cache_warm_up_steps > 0
                   and not self._auto_populated)
        return not warming

    def _forward_per_lookup(self, indices: torch.Tensor, offsets: torch.Tensor,
                            per_sample_weights: torch.Tensor | None) -> torch.Tensor:
        """Fused path: rows per lookup (no torch.unique), cached ones read, misses rebuilt.

        Skipping the sort of a unique pays off when most repeats are hits (Zipf: hot rows are
        cached); a repeated miss is rebuilt once per lookup, which the bmm chain does cheaply.
        """
        self._lookups += indices.numel()
        self._forward_calls += 1
        if self._triton_runs(indices.device):
            from bench.models.ttrec.triton_tt import tt_bag

            cache = self.cache
            # The kernel reads each lookup's slot and counts the hits itself.
            return tt_bag(list(self.cores), indices, offsets, per_sample_weights,
                          slot_map=None if cache is None else cache.row_to_slot,
                          cache_weight=None if cache is None else cache.weight,
                          hits=self._hits, sparse_cache_gradient=self.sparse_cache_gradient)
        lookups = torch.arange(indices.numel(), device=indices.device)
        if self.cache is None:
            rows = self.reconstruct_rows(indices)
        else:
            slots = self.cache.slots_for(indices)
            served = slots >= 0
            self._hits += served.sum()
            missed = torch.nonzero(~served).reshape(-1)
            # Missed lookups read slot 0 and are overwritten below, so slot 0's gradient from
            # them is zero.
            rows = functional.embedding(slots.clamp(min=0), self.cache.weight,
                                        sparse=self.sparse_cache_gradient)
            if missed.numel():
                rows = rows.index_copy(0, missed,
                                       self.reconstruct_rows(indices.index_select(0, missed)))
        return functional.embedding_bag(lookups, rows, offsets, mode="sum",
                                        per_sample_weights=per_sample_weights)

    def _unique_rows(self, unique_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Return rows for sorted unique ids: cached ones from the cache, the rest from cores."""
        self._lookups += counts.sum()
        self._forward_calls += 1
        cache = self.cache
        if cache is None:
            return self.reconstruct_rows(unique_ids)
        if self.cache_policy == "lfu":
            if self.cache_warm_up_steps > 0 and not self._auto_populated:
                if self._forward_calls > self.cache_warm_up_steps:
                    self.populate_cache()
                    self._auto_populated = True
                else:
                    cache.record(unique_ids, counts)
            slots = cache.slots_for(unique_ids)
            self._hits += counts[slots >= 0].sum()
        else:
            # Hits are judged before this batch's own admissions.
            self._hits += counts[cache.slots_for(unique_ids) >= 0].sum()
            cache.admit(unique_ids, counts, self._reconstruct_detached)
            slots = cache.slots_for(unique_ids)
        served = slots >= 0
        cached_positions = torch.nonzero(served).reshape(-1)
        core_positions = torch.nonzero(~served).reshape(-1)
        if cached_positions.numel() == 0:
            return self.reconstruct_rows(unique_ids)
        # A sparse gradient avoids a dense [cache_rows, dim] gradient per step (large caches).
        cached_rows = functional.embedding(slots.index_select(0, cached_positions), cache.weight,
                                           sparse=self.sparse_cache_gradient)
        if core_positions.numel() == 0:
            return cached_rows
        core_rows = self.reconstruct_rows(unique_ids.index_select(0, core_positions))
        # Undo the cached-then-core ordering so row u of the result is unique_ids[u].
        order = torch.cat([cached_positions, core_positions])
        inverse_order = torch.empty_like(order)
        inverse_order[order] = torch.arange(order.numel(), device=order.device)
        return torch.cat([cached_rows, core_rows]).index_select(0, inverse_order)

    def extra_repr(self) -> str:
        """Return a summary of the table shape, factors, ranks and cache."""
        cache = "none" if self.cache is None else f"{self.cache_policy}:{self.cache.capacity}"
        return (f"num_rows={self.num_rows}, dim={self.dim}, row_factors={self.row_factors}, "
                f"dim_factors={self.dim_factors}, ranks={self.ranks}, cache={cache}, "
                f"kernel={self.kernel}")
