"""Traffic, FLOP and size figures of the whole-model ops (a row's bytes, flops and metrics)."""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from bench.models.dlrm import DLRM, TTMixedEmbeddings, flops_per_sample, parameter_bytes
from bench.models.dlrm_reference import WorkloadMemo
from bench.models.quantized import QuantizedEmbeddings
from bench.ops.common import INDEX_BYTES
from bench.precisions import stored_row_bytes
from bench.ops.fc import input_dtype, stored_weight_bytes
from bench.ops.ttrec import tt_lookup_cost, tt_unique_counts


def _tt_tables(model: DLRM) -> list[tuple]:
    """(workload position, TT module) of each TT table of the model; none for dense tables."""
    embeddings = model.embeddings
    if not isinstance(embeddings, TTMixedEmbeddings):
        return []
    return list(zip(embeddings.tt_positions, embeddings.tt))


def _mean_lookups_per_table(batches_tensors) -> list[float]:
    """Mean lookups of each table over the batches (dense, indices, offsets)."""
    totals = None
    for _, indices, _ in batches_tensors:
        counts = [table_indices.numel() for table_indices in indices]
        totals = counts if totals is None else [a + b for a, b in zip(totals, counts)]
    return [total / len(batches_tensors) for total in totals]


# Distinct rows per batch of each table's rotation: every impl and precision of a workload
# cycles through the same batches, and counting them took longer than building the model.
DISTINCT_ROWS_MEMO = WorkloadMemo(max_entries=16)


def _mean_distinct_rows(workload, position: int, batches_tensors) -> float:
    """Mean distinct rows of one table over the batches (memoized on the indices' content)."""
    digest = hashlib.blake2b(digest_size=20)
    for _, indices, _ in batches_tensors:
        table_indices = indices[position].detach().to("cpu").contiguous()
        digest.update(str(table_indices.numel()).encode())
        digest.update(table_indices.view(torch.uint8).numpy().tobytes())
    return DISTINCT_ROWS_MEMO.get(
        workload, digest.hexdigest(),
        lambda: sum(torch.unique(indices[position]).numel()
                    for _, indices, _ in batches_tensors) / len(batches_tensors))


def embedding_traffic(model: DLRM, precision: str, batches_tensors) -> dict:
    """Mean per batch: looked-up rows' bytes (TT tables: what tt_lookup_cost counts), TT
    reconstruction FLOPs, lookups and distinct rows, over the batches the op cycles through."""
    workload = model.workload
    lookups = _mean_lookups_per_table(batches_tensors)
    row_bytes = stored_row_bytes(workload.dim, precision)
    tt_tables = _tt_tables(model)
    tt_positions = [position for position, _ in tt_tables]
    traffic = {"row_bytes": 0.0, "tt_flops": 0.0, "lookups": float(sum(lookups)),
               "unique_rows": 0.0, "unique_cached_rows": 0.0}
    for position, module in tt_tables:
        counts = tt_unique_counts(module, [indices[position] for _, indices, _ in
                                           batches_tensors])
        cost = tt_lookup_cost(module, counts)
        traffic["row_bytes"] += cost["bytes"]
        traffic["tt_flops"] += cost["flops"]
        traffic["unique_cached_rows"] += counts["unique_ids"] - counts["unique_uncached_ids"]
    for position in range(len(workload.tables)):
        if position in tt_positions:
            continue
        traffic["row_bytes"] += lookups[position] * row_bytes
        traffic["unique_rows"] += _mean_distinct_rows(workload, position, batches_tensors)
    return traffic


def inference_bytes(model: DLRM, precision: str, traffic: dict) -> dict:
    """Compulsory traffic of one inference batch, by part: the weights the forward reads as
    stored (packed int8 Linears included), the looked-up rows, the inputs and the logits."""
    workload = model.workload
    batch = workload.batch_size
    activation = input_dtype(precision).itemsize
    return {"weights": float(sum(stored_weight_bytes(part) for part in
                                 (model.bottom, model.interaction, model.top))),
            "rows": traffic["row_bytes"],
            "inputs": float(batch * workload.num_dense * activation
                            + traffic["lookups"] * INDEX_BYTES
                            + batch * len(workload.tables) * INDEX_BYTES),
            "output": float(batch * activation)}


def training_bytes(model: DLRM, traffic: dict) -> dict:
    """Compulsory traffic of one SGD step of an fp32 model, by part: the forward, then
    backward (weights read again, their gradients written, one gradient row per lookup) and
    the update (weights and gradients read, weights written; each distinct row read and
    written). TT cores take dense gradients, as the MLP weights do."""
    workload = model.workload
    forward = inference_bytes(model, "fp32", traffic)
    row_bytes = workload.dim * 4
    tt_cores = sum(module.tt_bytes for _, module in _tt_tables(model))
    updated_rows = traffic["unique_rows"] + traffic["unique_cached_rows"]
    return {**{f"forward_{name}": value for name, value in forward.items()},
            "labels": float(workload.batch_size * 4),
            "weights_backward_update": 5.0 * forward["weights"] + 4.0 * tt_cores,
            "row_gradients": 2.0 * traffic["lookups"] * row_bytes,
            "row_updates": 2.0 * updated_rows * row_bytes}


def model_flops(workload, traffic: dict) -> float:
    """Forward FLOPs of one batch: flops_per_sample with the lookups the batches really have,
    plus TT reconstructions of distinct uncached ids."""
    expected_lookups = workload.batch_size * sum(table.pooling.mean for table in workload.tables)
    return (workload.batch_size * flops_per_sample(workload)
            + (traffic["lookups"] - expected_lookups) * workload.dim + traffic["tt_flops"])


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights, including packed quantized tables."""
    total = parameter_bytes(model)
    for module in model.modules():
        if isinstance(module, QuantizedEmbeddings):
            total += sum(table.weight.numel() * table.weight.element_size()
                         for table in module.tables)
    return total


def tt_metrics(model: DLRM) -> dict:
    """TT-Rec memory and cache figures of a model (empty for dense tables)."""
    embeddings = model.embeddings
    if not isinstance(embeddings, TTMixedEmbeddings):
        return {}
    memory = embeddings.memory()
    mlp_bytes = sum(parameter.numel() * parameter.element_size()
                    for name, parameter in model.named_parameters()
                    if not name.startswith("embeddings"))
    return {**memory, "tt_hit_rate": embeddings.hit_rate(),
            "embedding_compression": memory["embedding_bytes_uncompressed"]
            / memory["embedding_bytes"],
            "model_compression": (memory["embedding_bytes_uncompressed"] + mlp_bytes)
            / (memory["embedding_bytes"] + mlp_bytes)}


def tt_metrics_after_lookup(model: DLRM, indices, offsets) -> dict:
    """TT-Rec figures with the cache hit rate of one lookup of the timed batch (on a copy,
    so the timed model's counters and caches are untouched); empty for dense tables."""
    if not isinstance(model.embeddings, TTMixedEmbeddings):
        return {}
    probe = copy.deepcopy(model.embeddings).cpu()
    for module in probe.tt:
        module.reset_cache_stats()
    with torch.no_grad():
        probe([table.cpu() for table in indices], [table.cpu() for table in offsets])
    # Per TT table (workload order of tt_positions): the probe lookup's cache counters.
    per_table = [{"table": position, **module.cache_stats()}
                 for position, module in zip(probe.tt_positions, probe.tt)]
    return {**tt_metrics(model), "tt_hit_rate": probe.hit_rate(), "tt_cache_stats": per_table}
