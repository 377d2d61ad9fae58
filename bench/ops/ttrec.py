"""TT-Rec lookups (`tt_sls`): a tensor-train embedding bag, cached or not, beside the dense one."""

from __future__ import annotations

import functools

import torch

from bench.ops.common import (InputMemo, PooledTable, checked_bags, cycling, float_dtype,
                              lookup_bound, lookup_bytes, mean_lookups, rotation_metrics,
                              shared_rotation, shared_table_weight, workload_rotation_plan)
from bench.precisions import BYTES_PER_VALUE
from bench.compare_outputs import UNDERFLOW, UNIT_ROUNDOFF, pooled_lookup_bound, rounding_error
from bench.references import table_lookup64, tt_lookup64
from bench.registry import BuildContext, Op, Prepared, Unsupported, impl, register_op
from bench.models.ttrec import TTEmbeddingBag, reconstruct_tt_rows
from workloads.generators import make_table_batch

DEFAULT_RANKS = (16,)
DEFAULT_CACHE_FRACTION = 0.1
WARM_UP_BATCHES = 4  # LFU counts frequencies over these batches, then populates the cache


def _tt_variants(workload, options) -> list[dict]:
    return [{"rank": rank} for rank in (options.get("tt_ranks") or DEFAULT_RANKS)]


register_op(Op("tt_sls", "TT-Rec tensor-train embedding bag over the workload's largest table "
                         "(10% LFU hot-row cache, uncached, and the dense table for comparison)",
               _tt_variants, memory_factor=2.0, single_table=True, report_order=30))


def tt_reference(module: TTEmbeddingBag, indices, offsets, weights) -> torch.Tensor:
    """Float64 pooled lookup of the rows the cores define (what a fresh cache also holds),
    contracted right to left from the cores themselves, not by the module's reconstruction."""
    return tt_lookup64(list(module.cores), module.row_factors, indices, offsets, weights)


def tt_bound(module: TTEmbeddingBag, indices, offsets, precision: str) -> torch.Tensor:
    """Per-element error bound of a TT bag at a precision. Each reconstructed element is a sum
    over rank indices of products of core entries (the reference uses the same stored cores),
    rounded once per chained matmul (K - 1), into the cache and into the output. A rounded
    intermediate enters the rest of the chain with random-sign core factors, so each stage adds
    about u sqrt(sum of the squared products), not u sum|products| (R times larger at rank R):
    delta = u ((K + 1) sqrt(sum (G_1 ... G_K)^2) + |x|)."""
    cores64 = [core.detach().to("cpu", torch.float64) for core in module.cores]
    rows, positions = torch.unique(indices.cpu(), return_inverse=True)
    rows64 = reconstruct_tt_rows(cores64, rows, module.row_factors)
    squares = reconstruct_tt_rows([core ** 2 for core in cores64], rows, module.row_factors)
    stored_error = (UNIT_ROUNDOFF[precision] * (len(cores64) + 1) * squares.sqrt()
                    + (len(cores64) + 1) * UNDERFLOW[precision]
                    + rounding_error(rows64, precision))
    return pooled_lookup_bound(rows64, positions, offsets.cpu(), "sum", None, precision,
                               stored_error=stored_error)


def _rotating_inputs(context: BuildContext, table_index: int) -> tuple[list[tuple], dict]:
    """(indices, offsets) of the distinct batches every impl cycles through, and the plan."""
    rotation = workload_rotation_plan(context.workload, [table_index], context.precision)
    batches = shared_rotation(context.workload, table_index, context.seed,
                              rotation["rotation_batches"], context.device)
    return [batch[:2] for batch in batches], rotation


def tt_row_flops(module: TTEmbeddingBag) -> float:
    """FLOPs to reconstruct one row: a chain of [prefix x r_k] @ [r_k x d_k+1 r_k+1] matmuls."""
    flops, prefix, ranks = 0.0, module.dim_factors[0], module.ranks
    for core in range(1, module.num_cores):
        flops += 2.0 * prefix * ranks[core] * module.dim_factors[core] * ranks[core + 1]
        prefix *= module.dim_factors[core]
    return flops


def tt_slice_bytes(module: TTEmbeddingBag) -> float:
    """Bytes of the core slices gathered to reconstruct one row (one slice of every core)."""
    return float(sum(module.ranks[core] * module.dim_factors[core] * module.ranks[core + 1]
                     for core in range(module.num_cores)) * module.element_bytes)


def tt_unique_counts(module: TTEmbeddingBag, batches_indices) -> dict:
    """Mean per batch of lookups, distinct ids, and distinct ids the cache does not hold: the
    forward reconstructs each distinct uncached id once per batch (torch.unique)."""
    totals = {"lookups": 0.0, "unique_ids": 0.0, "unique_uncached_ids": 0.0, "cache_hits": 0.0}
    count = 0
    with torch.no_grad():
        for indices in batches_indices:
            unique_ids, repeats = torch.unique(
                indices.reshape(-1).long().to(module.cores[0].device), return_counts=True)
            uncached, hits = unique_ids.numel(), 0
            if module.cache is not None:
                cached = module.cache.slots_for(unique_ids) >= 0
                uncached -= int(cached.sum())
                hits = int(repeats[cached].sum())
            totals["lookups"] += indices.numel()
            totals["unique_ids"] += unique_ids.numel()
            totals["unique_uncached_ids"] += uncached
            totals["cache_hits"] += hits
            count += 1
    return {name: value / max(count, 1) for name, value in totals.items()}


def tt_lookup_cost(module: TTEmbeddingBag, counts: dict) -> dict:
    """FLOPs and bytes of the TT rows of one batch: reconstructions of the distinct uncached
    ids (core slices gathered), distinct cached rows read (and their row->slot entries)."""
    cached = counts["unique_ids"] - counts["unique_uncached_ids"]
    cache_map_bytes = counts["unique_ids"] * 4 if module.cache is not None else 0.0  # int32
    return {"flops": counts["unique_uncached_ids"] * tt_row_flops(module),
            "bytes": (counts["unique_uncached_ids"] * tt_slice_bytes(module)
                      + cached * module.dim * module.element_bytes + cache_map_bytes)}


def tt_per_lookup_cost(module: TTEmbeddingBag, counts: dict) -> dict:
    """FLOPs and bytes of the TT rows of one batch for a kernel that does not deduplicate (the
    Triton one): a chain per missed lookup, a cached row read per hit, a slot read per lookup."""
    misses = counts["lookups"] - counts["cache_hits"]
    cache_map_bytes = counts["lookups"] * 4 if module.cache is not None else 0.0  # int32
    return {"flops": misses * tt_row_flops(module),
            "bytes": (misses * tt_slice_bytes(module)
                      + counts["cache_hits"] * module.dim * module.element_bytes
                      + cache_map_bytes)}


# Which rows a TT cache holds after its warm-up (LFU) or after settling over the rotation (LRU),
# and its counters over one pass of the rotation, follow from the indices alone, not from the
# precision, the rank or which torch kernel reconstructs rows. The first configuration of a
# worker that needs them runs the passes; the others load the cache's row map and rebuild its
# values from their own cores (what admission would have stored: the cores never change here).
TT_CACHE_MEMO = InputMemo(max_entries=4)
CACHE_STATE = ("row_to_slot", "slot_to_row", "last_used", "clock", "evictions")
TORCH_KERNELS = ("reference", "fused")  # count hits alike (per distinct id or per lookup)


def _settle_cache(context: BuildContext, module: TTEmbeddingBag, table_index: int,
                  inputs) -> dict:
    """Warm the cache (LFU) and count one pass over the rotation, the way FBGEMM's cache stats
    report them: {"cache": its row map, "stats": cache_stats(), "counts": tt_unique_counts}."""
    workload, device = context.workload, context.device
    if module.cache_policy == "lfu":
        # Warm-up batches are drawn after the timed one, as a serving system learns its hot rows.
        for batch_index in range(1, WARM_UP_BATCHES + 1):
            warm = make_table_batch(workload, table_index, context.seed, batch_index)
            module.warm_up_cache(torch.from_numpy(warm.indices).to(device))
        module.populate_cache()
    # Timing cycles through every rotating batch: charge their mean counts. The LFU cache is
    # fixed after populate, so its hit rate over the rotation is counted without a forward.
    if module.cache_policy == "lru":
        # LRU admits rows as it looks them up: one pass over the rotation settles the cache,
        # and the counts below describe the state the timed calls cycle through.
        with torch.no_grad():
            for pair in inputs:
                module(*pair)
    module.reset_cache_stats()
    with torch.no_grad():
        for pair in inputs:
            module(*pair)
    cache = module.cache
    return {"cache": {} if cache is None else {name: getattr(cache, name).clone()
                                                for name in CACHE_STATE},
            "stats": module.cache_stats(),
            "counts": tt_unique_counts(module, [pair[0] for pair in inputs])}


def shared_cache_state(context: BuildContext, module: TTEmbeddingBag, table_index: int,
                       inputs) -> dict:
    """_settle_cache's result for this module, computed once per worker for every precision
    and rank (per torch kernel family): a later module loads the row map, rebuilds values."""
    cache = module.cache
    family = "torch" if module.kernel in TORCH_KERNELS else module.kernel
    key = ("tt_cache", table_index, context.seed, module.cache_policy,
           0 if cache is None else cache.capacity, len(inputs), str(context.device), family)
    fresh = []

    def settle():
        fresh.append(True)
        return _settle_cache(context, module, table_index, inputs)

    state = TT_CACHE_MEMO.get(context.workload, key, settle)
    if not fresh and cache is not None:
        with torch.no_grad():
            for name in CACHE_STATE:
                getattr(cache, name).copy_(state["cache"][name])
        module.populate_cache()  # every cached row's value from this module's own cores
    return state


def build_tt(context: BuildContext, cache_policy: str, kernel: str = "reference") -> Prepared:
    """A tt_sls impl: the workload's largest table as a TTEmbeddingBag with this cache policy
    and kernel, cycling through the rotating batches, checked against float64."""
    workload, device = context.workload, context.device
    table_index = workload.largest_table()
    table = workload.tables[table_index]
    module = TTEmbeddingBag(table.rows, table.dim, rank=context.variant["rank"],
                            cache_fraction=DEFAULT_CACHE_FRACTION, cache_policy=cache_policy,
                            dtype=float_dtype(context.precision), device=device,
                            seed=context.seed, validate_indices=False, kernel=kernel)
    inputs, rotation = _rotating_inputs(context, table_index)
    indices, offsets = inputs[0]
    value_bytes = BYTES_PER_VALUE[context.precision]
    state = shared_cache_state(context, module, table_index, inputs)
    cache_stats, counts = state["stats"], state["counts"]
    lookups, bags = counts["lookups"], offsets.numel()
    checked = checked_bags(bags, indices.numel(), table.rows, table.dim)
    check_indices, check_offsets, _ = checked.batch(indices, offsets)
    hit_rate = counts["cache_hits"] / lookups if lookups else 0.0
    rows = (tt_per_lookup_cost if kernel == "triton" else tt_lookup_cost)(module, counts)
    ranks = module.ranks

    def lookup(indices, offsets):
        with torch.no_grad():
            return module(indices, offsets)

    calls = [functools.partial(lookup, *pair) for pair in inputs]
    return Prepared(
        run=cycling(calls),
        check=checked.checked_call(calls[0]),
        reference=lambda: tt_reference(module, check_indices, check_offsets, None),
        error_bound=lambda expected: tt_bound(module, check_indices, check_offsets,
                                              context.precision),
        samples=bags,
        # Pooling adds per lookup plus one reconstruction per distinct uncached id.
        flops=lookups * table.dim + rows["flops"],
        # What the kernel touches: indices, offsets, TT rows (see tt_lookup_cost), the output.
        bytes_moved=lookup_bytes(lookups, bags, table.dim, 0.0, value_bytes)
        + rows["bytes"],
        params={"table": table_index, "rows": table.rows, "dim": table.dim,
                "distribution": table.distribution.label(), "cache": cache_policy,
                "row_factors": list(module.row_factors), "dim_factors": list(module.dim_factors),
                "ranks": list(ranks), "rotation_batches": len(inputs), "kernel": kernel},
        metrics={"hit_rate": hit_rate,
                 **{f"cache_{name}": value for name, value in cache_stats.items()
                    if name != "policy"}, "tt_parameters": module.tt_parameter_count,
                 "tt_bytes": module.tt_bytes, "cache_bytes": module.cache_bytes,
                 "dense_bytes": module.dense_bytes,
                 "compression": module.dense_bytes / (module.tt_bytes + module.cache_bytes),
                 **{f"mean_{name}": value for name, value in counts.items()},
                 # The dense table's row traffic for the same lookups: not what TT reads,
                 # kept (labelled) to compare with the dense impl's bytes.
                 "dense_equivalent_bytes": lookup_bytes(lookups, bags, table.dim,
                                                        table.dim * value_bytes, value_bytes),
                 **rotation_metrics(rotation), **checked.metrics()},
        flush_between_reps=True,
    )


@impl("tt_sls", "tt_cached", ("fp32", "fp16", "bf16"),
      description="TT cores + 10% LFU hot-row cache (warm-up counts, then populate)")
def build_tt_cached(context: BuildContext) -> Prepared:
    """TT embedding bag with the hot-row cache."""
    return build_tt(context, "lfu")


@impl("tt_sls", "tt_cached_lru", ("fp32", "fp16", "bf16"),
      description="TT cores + 10% LRU hot-row cache (rows admitted as they are looked up)")
def build_tt_cached_lru(context: BuildContext) -> Prepared:
    """TT embedding bag with an LRU hot-row cache."""
    return build_tt(context, "lru")


@impl("tt_sls", "tt_fused", ("fp32", "fp16", "bf16"),
      description="TT cores + 10% LFU cache, fused kernel: per-lookup cache read, misses "
                  "rebuilt by one bmm chain (no torch.unique)")
def build_tt_fused(context: BuildContext) -> Prepared:
    """TT embedding bag with the LFU cache and the fused TT kernel."""
    return build_tt(context, "lfu", kernel="fused")


@impl("tt_sls", "tt_uncached", ("fp32", "fp16", "bf16"),
      description="TT cores only: every distinct row reconstructed per batch")
def build_tt_uncached(context: BuildContext) -> Prepared:
    """TT embedding bag without a cache."""
    return build_tt(context, "none")


@impl("tt_sls", "dense", ("fp32", "fp16", "bf16"), baseline=True,
      description="the uncompressed table (EmbeddingBag), the speed TT-Rec is judged against")
def build_dense(context: BuildContext) -> Prepared:
    """Dense EmbeddingBag on the same table and indices."""
    workload, device = context.workload, context.device
    table_index = workload.largest_table()
    table = workload.tables[table_index]
    if context.precision not in ("fp32", "fp16", "bf16"):
        raise Unsupported(f"tt_sls compares float tables; {context.precision} is not one")
    weight = shared_table_weight(table, context.seed, table_index)  # read, never written
    pooled = PooledTable(weight, context.precision, device)
    inputs, rotation = _rotating_inputs(context, table_index)
    calls = [functools.partial(pooled, *pair) for pair in inputs]
    indices, offsets = inputs[0]
    lookups, bags = mean_lookups(pair[0] for pair in inputs), offsets.numel()
    checked = checked_bags(bags, indices.numel(), table.rows, table.dim)
    check_indices, check_offsets, _ = checked.batch(indices, offsets)
    return Prepared(
        run=cycling(calls),
        check=checked.checked_call(calls[0]),
        reference=lambda: table_lookup64(weight, check_indices, check_offsets, "sum", None),
        error_bound=lambda expected: lookup_bound(weight, check_indices, check_offsets, "sum",
                                                  None, context.precision),
        samples=bags, flops=lookups * table.dim,
        bytes_moved=lookup_bytes(lookups, bags, table.dim, pooled.bytes_per_row,
                                 BYTES_PER_VALUE[context.precision]),
        params={"table": table_index, "rows": table.rows, "dim": table.dim,
                "distribution": table.distribution.label(), "cache": "n/a",
                "rotation_batches": len(inputs)},
        metrics={"dense_bytes": int(table.rows * pooled.bytes_per_row),
                 **rotation_metrics(rotation), **checked.metrics()},
        flush_between_reps=True,
    )
