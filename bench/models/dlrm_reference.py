"""The float64 reference of a DLRM: logits and one SGD step by definition, from its parameters."""

# The references read the model's parameter tensors (and which rows a TT cache holds) and
# compute the DLRM by its definition with bench.references; no module of the model is run.

from __future__ import annotations

import collections
import hashlib
from typing import Any, Callable, Hashable

import torch
from torch import nn

from bench.models.dlrm import (DLRM, BatchedEmbeddings, FusedSGDEmbeddings, PerTableEmbeddings,
                               TTMixedEmbeddings, batch_tensors)
from bench.references import (as64, binary_cross_entropy64, cat_interaction64,
                              cross_interaction64, dot_interaction64, linear_stack64, pool_rows64,
                              sgd_update, tt_rows64)


class WorkloadMemo:
    """A bounded memo of values computed for one workload; a value of another workload clears
    it (a worker runs one workload's tasks together, and memory stays one workload's)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.workload: Any = None
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.hits = 0

    def get(self, workload, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value of key for workload, computed at most once while it stays in the memo."""
        if workload != self.workload:
            self.clear()
            self.workload = workload
        if key in self.entries:
            self.entries.move_to_end(key)
            self.hits += 1
            return self.entries[key]
        value = compute()
        self.entries[key] = value
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget every value."""
        self.entries.clear()
        self.workload = None


# Every impl and precision of a whole-model op checks against the same float64 output of the
# same batch: computed once per worker, keyed by the content it is computed from (so a model
# whose parameters differ, a planted fault's included, never gets another model's reference).
# Callers must treat the returned tensors as read-only.
REFERENCE_MEMO = WorkloadMemo(max_entries=8)


def _update(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def reference_key(model: DLRM, tensors, *extra) -> str:
    """A digest of what a float64 reference of model reads: the MLP and interaction
    parameters, each table's looked-up rows (TT: its cores and cache slots), the inputs."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(repr(extra).encode())
    indices = tensors[1]
    for (kind, source), table_indices in zip(reference_tables(model), indices):
        digest.update(kind.encode())
        if kind == "tt":
            for core in source.cores:
                _update(digest, core)
            cache = getattr(source, "cache", None)
            if cache is not None:
                _update(digest, cache.row_to_slot)
        else:
            rows = torch.unique(table_indices.cpu().long())
            _update(digest, rows)
            _update(digest, source[rows.to(source.device)])
    for part in (model.bottom, model.interaction, model.top):
        for parameter in part.parameters():
            _update(digest, parameter)
    for tensor in tensors:
        for item in (tensor if isinstance(tensor, (list, tuple)) else [tensor]):
            _update(digest, item)
    return digest.hexdigest()


def linear_parameters64(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Float64 (weight, bias) of each Linear of a stack, in order (read, never run)."""
    return [(as64(layer.weight), as64(layer.bias)) for layer in module.modules()
            if isinstance(layer, nn.Linear)]


def reference_tables(model: DLRM) -> list[tuple]:
    """Per table, in workload order: ("dense", fp32 weight) or ("tt", TT module), read only."""
    workload = model.workload
    embeddings = model.embeddings
    if isinstance(embeddings, TTMixedEmbeddings):
        parts: list = [None] * len(workload.tables)
        for module, position in zip(embeddings.tt, embeddings.tt_positions):
            parts[position] = ("tt", module)
        if embeddings.dense is not None:
            weights = dense_weights(embeddings.dense, [workload.tables[position].rows for
                                                       position in embeddings.dense_positions])
            for weight, position in zip(weights, embeddings.dense_positions):
                parts[position] = ("dense", weight)
        return parts
    return [("dense", weight) for weight in
            dense_weights(embeddings, [table.rows for table in workload.tables])]


def dense_weights(embeddings: nn.Module, rows: list[int]) -> list[torch.Tensor]:
    """Each table's weights: a per-table module's own, or the concatenated table split by the
    workload's row counts (not by the module's row starts)."""
    if isinstance(embeddings, PerTableEmbeddings):
        return [bag.weight.detach() for bag in embeddings.bags]
    if isinstance(embeddings, BatchedEmbeddings):
        weight = embeddings.bag.weight.detach()
    elif isinstance(embeddings, FusedSGDEmbeddings):
        weight = embeddings.weight.detach()
    else:
        raise TypeError(f"no float64 reference reads {type(embeddings).__name__} tables")
    if weight.shape[0] != sum(rows):
        raise ValueError(f"concatenated table has {weight.shape[0]} rows, the workload "
                         f"{sum(rows)}")
    return list(weight.split(rows))


def interaction64(model: DLRM, bottom: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The workload's interaction by its definition (the module's parameters for DCN)."""
    kind = model.workload.interaction
    if kind == "dot":
        return dot_interaction64(bottom, pooled)
    if kind == "cat":
        return cat_interaction64(bottom, pooled)
    module = model.interaction
    layers = [(as64(down), as64(up), as64(bias))
              for down, up, bias in zip(module.down, module.up, module.bias)]
    return cross_interaction64(bottom, pooled, layers)


def logits64(model: DLRM, bottom_layers, top_layers, dense, pooled) -> torch.Tensor:
    """DLRM logits from float64 parameters: bottom MLP (final ReLU), interaction, top MLP."""
    bottom = linear_stack64(bottom_layers, dense, final_relu=True)
    return linear_stack64(top_layers, interaction64(model, bottom, pooled),
                          final_relu=False).squeeze(1)


def reference_logits(model: DLRM, dense, indices, offsets) -> torch.Tensor:
    """Float64 logits of an fp32 DLRM, widening only the embedding rows the batch uses;
    TT rows come from the cores (what a freshly populated cache holds too). Memoized per
    worker (REFERENCE_MEMO): treat the result as read-only."""
    key = reference_key(model, (dense, indices, offsets), "logits")
    return REFERENCE_MEMO.get(model.workload, key,
                              lambda: _reference_logits(model, dense, indices, offsets))


def _reference_logits(model: DLRM, dense, indices, offsets) -> torch.Tensor:
    pooled = []
    for (kind, source), table_indices, table_offsets in zip(reference_tables(model), indices,
                                                            offsets):
        rows, positions = torch.unique(table_indices.cpu().long(), return_inverse=True)
        if kind == "tt":
            rows64 = tt_rows64([as64(core) for core in source.cores], rows, source.row_factors)
        else:
            rows64 = as64(source[rows.to(source.device)])
        pooled.append(pool_rows64(rows64, positions, table_offsets))
    with torch.no_grad():
        return logits64(model, linear_parameters64(model.bottom), linear_parameters64(model.top),
                        dense, torch.stack(pooled, dim=1))


class ReferenceTable:
    """One table's float64 training state for a batch: the rows it looks up, as SGD leaves."""

    def __init__(self, kind: str, source, indices: torch.Tensor):
        self.rows, self.positions = torch.unique(indices.cpu().long(), return_inverse=True)
        self.kind = kind
        if kind == "dense":
            # SGD on the touched rows' dense gradient is the sparse SGD step of the table.
            self.leaves = [as64(source[self.rows.to(source.device)]).requires_grad_()]
            return
        # TT-Rec semantics: a cached row trains its cache entry only (whose value, just
        # populated, is the cores' reconstruction); an uncached row trains the cores.
        self.row_factors = source.row_factors
        cached = (torch.zeros(self.rows.numel(), dtype=torch.bool) if source.cache is None
                  else source.cache.row_to_slot.cpu()[self.rows] >= 0)
        self.cached_positions = torch.nonzero(cached).reshape(-1)
        self.core_positions = torch.nonzero(~cached).reshape(-1)
        cores = [as64(core) for core in source.cores]
        cached_rows = tt_rows64(cores, self.rows[self.cached_positions], self.row_factors)
        self.leaves = [cached_rows.requires_grad_()] + [core.requires_grad_() for core in cores]

    def looked_up(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        """The batch's distinct rows [rows, dim] from (current or updated) leaves."""
        if self.kind == "dense":
            return leaves[0]
        cached_rows, cores = leaves[0], leaves[1:]
        core_rows = tt_rows64(cores, self.rows[self.core_positions], self.row_factors)
        rows = torch.zeros(self.rows.numel(), core_rows.shape[1], dtype=core_rows.dtype)
        return rows.index_copy(0, self.cached_positions, cached_rows).index_copy(
            0, self.core_positions, core_rows)


def reference_train_step(initial: DLRM, batch, labels: torch.Tensor,
                         learning_rate: float) -> tuple:
    """Float64 SGD step of an fp32 DLRM by definition: logits, BCE, autograd of the float64
    formulation, p - lr * grad; returns (logits, first bottom weight, last top weight, pooled
    rows after the update), the parts a training check reads back from the trained model.
    Memoized per worker (REFERENCE_MEMO): treat the result as read-only."""
    dense, indices, offsets = batch_tensors(batch, torch.device("cpu"))
    key = reference_key(initial, (dense, indices, offsets, labels), "train", learning_rate)
    return REFERENCE_MEMO.get(initial.workload, key, lambda: _reference_train_step(
        initial, dense, indices, offsets, labels, learning_rate))


def _reference_train_step(initial: DLRM, dense, indices, offsets, labels: torch.Tensor,
                          learning_rate: float) -> tuple:
    bottom = [(weight.requires_grad_(), bias.requires_grad_())
              for weight, bias in linear_parameters64(initial.bottom)]
    top = [(weight.requires_grad_(), bias.requires_grad_())
           for weight, bias in linear_parameters64(initial.top)]
    tables = [ReferenceTable(kind, source, table_indices) for (kind, source), table_indices
              in zip(reference_tables(initial), indices)]

    def pooled(leaves_per_table):
        return torch.stack([pool_rows64(table.looked_up(leaves), table.positions, table_offsets)
                            for table, leaves, table_offsets
                            in zip(tables, leaves_per_table, offsets)], dim=1)

    logits = logits64(initial, bottom, top, dense, pooled([table.leaves for table in tables]))
    binary_cross_entropy64(logits, labels).backward()
    updated = [sgd_update(table.leaves, learning_rate) for table in tables]
    bottom_first = sgd_update([bottom[0][0]], learning_rate)[0]
    top_last = sgd_update([top[-1][0]], learning_rate)[0]
    with torch.no_grad():
        return logits.detach(), bottom_first, top_last, pooled(updated)
