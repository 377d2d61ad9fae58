"""A DLRM built from a workload spec: bottom MLP, pooled embeddings, interaction, top MLP."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bench.embeddings import concatenated, concatenated_table_weights, table_weight
from workloads.generators import Batch
from workloads.specs import WorkloadSpec

DCN_LAYERS = 3  # MLPerf DLRMv2: three low-rank cross layers
DCN_RANK = 512


def mlp(input_width: int, widths: Sequence[int], final_relu: bool, seed: int) -> nn.Sequential:
    """Linear+ReLU layers, initialised as the DLRM reference does (normal, fan-scaled)."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width_in = input_width
    for position, width_out in enumerate(widths):
        layer = nn.Linear(width_in, width_out)
        with torch.no_grad():
            layer.weight.normal_(0.0, math.sqrt(2.0 / (width_in + width_out)), generator=generator)
            layer.bias.normal_(0.0, math.sqrt(1.0 / width_out), generator=generator)
        layers.append(layer)
        if position < len(widths) - 1 or final_relu:
            layers.append(nn.ReLU(inplace=True))
        width_in = width_out
    return nn.Sequential(*layers)


def stack_features(dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The interaction's feature vectors [B, 1 + T, D]: the dense vector first."""
    return torch.cat([dense.unsqueeze(1), pooled], dim=1)


class DotInteraction(nn.Module):
    """Pairwise dot products of the feature vectors (bmm + lower-triangle gather), then concat."""

    def __init__(self, num_features: int):
        super().__init__()
        rows, cols = torch.tril_indices(num_features, num_features, offset=-1)
        # Gathering the flattened [B, F*F] products with index_select is about 1.7x faster,
        # forward plus backward, than advanced indexing products[:, rows, cols] (whose
        # backward is an accumulating index_put).
        self.register_buffer("pairs", rows * num_features + cols, persistent=False)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """dense [B, D], pooled [B, T, D] -> [B, D + F(F-1)/2] with F = T + 1."""
        features = stack_features(dense, pooled)
        products = torch.bmm(features, features.transpose(1, 2))
        return torch.cat([dense, products.flatten(1).index_select(1, self.pairs)], dim=1)


class CatInteraction(nn.Module):
    """The concat variant: the feature vectors side by side."""

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """dense [B, D], pooled [B, T, D] -> [B, (T + 1) * D]."""
        return stack_features(dense, pooled).flatten(1)


class CrossInteraction(nn.Module):
    """DCNv2 low-rank cross layers over the concatenated features: x + x0 * (U(Vx) + b)."""

    def __init__(self, width: int, layers: int, rank: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        rank = min(rank, width)
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        self.bias = nn.ParameterList()
        for _ in range(layers):
            self.down.append(nn.Parameter(torch.randn(width, rank, generator=generator)
                                          / math.sqrt(width)))
            self.up.append(nn.Parameter(torch.randn(rank, width, generator=generator)
                                        / math.sqrt(rank)))
            self.bias.append(nn.Parameter(torch.zeros(width)))

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """dense [B, D], pooled [B, T, D] -> [B, (T + 1) * D]."""
        first = stack_features(dense, pooled).flatten(1)
        current = first
        for down, up, bias in zip(self.down, self.up, self.bias):
            current = current + first * ((current @ down) @ up + bias)
        return current


def interaction_module(workload: WorkloadSpec, seed: int) -> nn.Module:
    """The workload's interaction."""
    if workload.interaction == "dot":
        return DotInteraction(workload.num_features)
    if workload.interaction == "cat":
        return CatInteraction()
    return CrossInteraction(workload.dim * workload.num_features, DCN_LAYERS, DCN_RANK, seed)


class PerTableEmbeddings(nn.Module):
    """One EmbeddingBag per table, looked up in a Python loop (the DLRM reference's way)."""

    def __init__(self, weights: list[torch.Tensor], sparse: bool):
        super().__init__()
        self.bags = nn.ModuleList(
            nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum", sparse=sparse)
            for weight in weights)

    def forward(self, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        """Per-table inputs -> [B, T, D]."""
        return torch.stack([bag(table_indices, table_offsets) for bag, table_indices,
                            table_offsets in zip(self.bags, indices, offsets)], dim=1)

    def table_weights(self) -> list[torch.Tensor]:
        """Each table's weights."""
        return [bag.weight.detach() for bag in self.bags]


def flatten_tables(indices: list[torch.Tensor], offsets: list[torch.Tensor],
                   row_starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-table inputs as one lookup into concatenated tables: shifted ids, bag starts.

    Bags are table-major, which keeps each table's rows together in memory order
    (sample-major order was slower on big tables)."""
    # Shifts are Python ints (kernel arguments) and sizes come from tensor shapes, so on a GPU
    # this makes no host-to-device copy and no sync (repeat_interleave of a device tensor of
    # counts would have to read its output size back to the host).
    shifted, bag_starts, lookup_start = [], [], 0
    for table_indices, table_offsets, row_start in zip(indices, offsets, row_starts,
                                                       strict=True):
        shifted.append(table_indices + row_start if row_start else table_indices)
        bag_starts.append(table_offsets + lookup_start)
        lookup_start += table_indices.numel()
    return torch.cat(shifted), torch.cat(bag_starts)


def tbe_inputs(indices: list[torch.Tensor],
               offsets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-table inputs as a table-batched embedding bag (FBGEMM's, ours) takes them: each
    table's own ids, table after table, and tables x batch + 1 bag offsets (the total last,
    made on the device: no host sync)."""
    flat, bag_starts = flatten_tables(indices, offsets, [0] * len(indices))
    end = torch.full((1,), flat.numel(), dtype=bag_starts.dtype, device=bag_starts.device)
    return flat, torch.cat([bag_starts, end])


def row_starts_of(weights: list[torch.Tensor]) -> torch.Tensor:
    starts = np.concatenate(([0], np.cumsum([weight.shape[0] for weight in weights])[:-1]))
    return torch.as_tensor(starts, dtype=torch.int64)


def row_start_values(weights: list[torch.Tensor]) -> list[int]:
    """Each table's first row in the concatenated table, as host ints for flatten_tables."""
    return row_starts_of(weights).tolist()


class BatchedEmbeddings(nn.Module):
    """All tables concatenated into one EmbeddingBag, looked up in one call."""

    def __init__(self, weights: list[torch.Tensor], sparse: bool):
        super().__init__()
        self.bag = nn.EmbeddingBag.from_pretrained(concatenated(weights), freeze=False,
                                                   mode="sum", sparse=sparse)
        self.register_buffer("row_starts", row_starts_of(weights), persistent=False)
        self.row_start_values = row_start_values(weights)
        self.num_tables = len(weights)

    def forward(self, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        """Per-table inputs -> [B, T, D]."""
        pooled = self.bag(*flatten_tables(indices, offsets, self.row_start_values))
        return pooled.view(self.num_tables, -1, pooled.shape[-1]).transpose(0, 1)

    def table_weights(self) -> list[torch.Tensor]:
        """Each table's weights (views into the concatenated table)."""
        sizes = torch.diff(self.row_starts, append=self.row_starts.new_tensor(
            [self.bag.weight.shape[0]])).tolist()
        return list(self.bag.weight.detach().split(sizes))


class _LookupWithSGD(torch.autograd.Function):
    """Sum-pooled lookup whose backward applies the SGD update to the table in place."""

    @staticmethod
    def forward(context, anchor, weight, indices, bag_starts, learning_rate):
        # torch.full and output_size keep this on the device: new_tensor([n]) would copy from
        # the host, and repeat_interleave without output_size reads the sum back (a sync).
        end = torch.full((1,), indices.numel(), dtype=bag_starts.dtype, device=bag_starts.device)
        lengths = torch.diff(bag_starts, append=end)
        context.save_for_backward(indices, torch.repeat_interleave(
            torch.arange(bag_starts.numel(), device=indices.device), lengths,
            output_size=indices.numel()))
        context.weight, context.learning_rate = weight, learning_rate
        return torch.nn.functional.embedding_bag(indices, weight, bag_starts, mode="sum")

    @staticmethod
    def backward(context, grad_output):
        indices, lookup_bags = context.saved_tensors
        # Each lookup's gradient is its bag's output gradient; index_add_ accumulates
        # repeated rows, so this equals a sparse-gradient SGD step without building
        # (and coalescing) the sparse gradient tensor.
        context.weight.index_add_(0, indices, grad_output.index_select(0, lookup_bags),
                                  alpha=-context.learning_rate)
        return None, None, None, None, None


class FusedSGDEmbeddings(nn.Module):
    """Concatenated tables trained by SGD fused into the backward pass (as FBGEMM's TBE does)."""

    def __init__(self, weights: list[torch.Tensor], learning_rate: float):
        super().__init__()
        # A buffer, not a Parameter: the optimizer never sees it; backward updates it.
        self.register_buffer("weight", concatenated(weights))
        self.register_buffer("row_starts", row_starts_of(weights), persistent=False)
        self.row_start_values = row_start_values(weights)
        # Autograd only calls backward for inputs that require grad: an empty anchor does.
        self.anchor = nn.Parameter(torch.zeros(0))
        self.learning_rate = learning_rate
        self.num_tables = len(weights)

    def forward(self, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        """Per-table inputs -> [B, T, D]; backward updates the rows it looked up."""
        shifted, bag_starts = flatten_tables(indices, offsets, self.row_start_values)
        if torch.is_grad_enabled():
            pooled = _LookupWithSGD.apply(self.anchor, self.weight, shifted, bag_starts,
                                          self.learning_rate)
        else:
            pooled = torch.nn.functional.embedding_bag(shifted, self.weight, bag_starts,
                                                       mode="sum")
        return pooled.view(self.num_tables, -1, pooled.shape[-1]).transpose(0, 1)

    def table_weights(self) -> list[torch.Tensor]:
        """Each table's weights (views into the concatenated table)."""
        sizes = torch.diff(self.row_starts, append=self.row_starts.new_tensor(
            [self.weight.shape[0]])).tolist()
        return list(self.weight.split(sizes))


class TTMixedEmbeddings(nn.Module):
    """TT-Rec: the largest tables as tensor-train bags with a hot-row cache, the rest dense."""

    def __init__(self, workload: WorkloadSpec, dense_weights: dict[int, torch.Tensor],
                 tt_tables: int, rank: int, layout: str, sparse: bool, seed: int,
                 cache_fraction: float = 0.1, cache_policy: str = "lfu",
                 kernel: str = "reference"):
        """dense_weights: the weights of the tables that stay dense, by workload position
        (tt_positions(workload, tt_tables) are the others)."""
        super().__init__()
        from bench.models.ttrec import TTEmbeddingBag

        self.tt_positions = tt_positions(workload, tt_tables)
        self.dense_positions = [index for index in range(len(workload.tables))
                                if index not in self.tt_positions]
        if sorted(dense_weights) != self.dense_positions:
            raise ValueError(f"dense weights for tables {sorted(dense_weights)}, expected "
                             f"{self.dense_positions}")
        tables = workload.tables
        self.tt = nn.ModuleList(
            TTEmbeddingBag(tables[index].rows, tables[index].dim, rank=rank,
                           cache_fraction=cache_fraction, cache_policy=cache_policy,
                           seed=seed * 1_000_003 + index, validate_indices=False,
                           sparse_cache_gradient=sparse, kernel=kernel)
            for index in self.tt_positions)
        self.dense = (EMBEDDINGS[layout]([dense_weights[index] for index in self.dense_positions],
                                         sparse)
                      if self.dense_positions else None)

    def warm_up(self, indices: list[torch.Tensor]) -> None:
        """Count row frequencies of one batch for the LFU caches."""
        for module, position in zip(self.tt, self.tt_positions):
            module.warm_up_cache(indices[position])

    def populate(self) -> None:
        """Fill every TT table's cache with its most frequent rows."""
        for module in self.tt:
            module.populate_cache()

    def _assemble(self, tt_parts, dense_part) -> torch.Tensor:
        parts = [None] * (len(self.tt_positions) + len(self.dense_positions))
        for position, part in zip(self.tt_positions, tt_parts):
            parts[position] = part
        for slot, position in enumerate(self.dense_positions):
            parts[position] = dense_part[:, slot]
        return torch.stack(parts, dim=1)

    def forward(self, indices, offsets) -> torch.Tensor:
        """Per-table inputs -> [B, T, D] in the workload's table order."""
        tt_parts = [module(indices[position], offsets[position])
                    for module, position in zip(self.tt, self.tt_positions)]
        dense_part = (self.dense([indices[p] for p in self.dense_positions],
                                 [offsets[p] for p in self.dense_positions])
                      if self.dense is not None else None)
        return self._assemble(tt_parts, dense_part)


    def memory(self) -> dict:
        """Bytes of the TT cores, their caches and the dense tables."""
        tt_bytes = sum(module.tt_bytes for module in self.tt)
        cache_bytes = sum(module.cache_bytes for module in self.tt)
        dense_bytes = (sum(weight.numel() * weight.element_size()
                           for weight in self.dense.table_weights()) if self.dense else 0)
        replaced = sum(module.dense_bytes for module in self.tt)
        return {"tt_bytes": tt_bytes, "cache_bytes": cache_bytes, "dense_table_bytes": dense_bytes,
                "embedding_bytes_uncompressed": replaced + dense_bytes,
                "embedding_bytes": tt_bytes + cache_bytes + dense_bytes}

    def hit_rate(self) -> float:
        """Cache hits over lookups across the TT tables."""
        lookups = sum(module.lookups for module in self.tt)
        return sum(module.hits for module in self.tt) / lookups if lookups else 0.0


EMBEDDINGS = {"per_table": PerTableEmbeddings, "batched": BatchedEmbeddings}


class DLRM(nn.Module):
    """The whole model from its parts; forward returns one logit per sample."""

    def __init__(self, workload: WorkloadSpec, bottom: nn.Module, embeddings: nn.Module,
                 interaction: nn.Module, top: nn.Module):
        super().__init__()
        self.workload = workload
        self.bottom = bottom
        self.embeddings = embeddings
        self.interaction = interaction
        self.top = top

    def forward(self, dense: torch.Tensor, indices: list[torch.Tensor],
                offsets: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B] for one batch."""
        bottom = self.bottom(dense)
        pooled = self.embeddings(indices, offsets).to(bottom.dtype)
        return self.top(self.interaction(bottom, pooled)).squeeze(1)


def top_input_width(workload: WorkloadSpec) -> int:
    """Width of the interaction output that feeds the top MLP."""
    if workload.interaction == "dot":
        return workload.interaction_width
    return workload.dim * workload.num_features


def tt_positions(workload: WorkloadSpec, tt_tables: int) -> list[int]:
    """Workload positions of the tt_tables largest tables (ties: the earlier table)."""
    order = sorted(range(len(workload.tables)), key=lambda index: -workload.tables[index].rows)
    return sorted(order[:tt_tables])


def build_dlrm(workload: WorkloadSpec, seed: int, embeddings: str = "batched",
               sparse: bool = True, tt_tables: int = 0, tt_rank: int = 16,
               learning_rate: float = 0.1, tt_cache: str = "lfu",
               tt_kernel: str = "reference", device: torch.device = torch.device("cpu")) -> DLRM:
    """A seeded fp32 DLRM on device; with tt_tables > 0 the largest tables are TT-Rec
    compressed (tt_cache: the hot-row cache policy of the TT tables, lfu, lru or none;
    tt_kernel: reference or fused, see bench.models.ttrec.tt_embedding.TT_KERNELS).

    embeddings: per_table, batched, or fused_sgd (batched, updated by SGD inside backward
    at learning_rate). Tables are made on the device, once each (bench.embeddings): a model
    whose tables fill most of a GPU is built there without a host copy."""
    if embeddings == "fused_sgd":
        embedding_module: nn.Module = FusedSGDEmbeddings(
            concatenated_table_weights(workload.tables, seed, device), learning_rate)
    elif tt_tables > 0:
        dense = {index: table_weight(workload.tables[index], seed, index, device)
                 for index in range(len(workload.tables))
                 if index not in tt_positions(workload, tt_tables)}
        embedding_module = TTMixedEmbeddings(workload, dense, tt_tables, tt_rank, embeddings,
                                             sparse, seed, cache_policy=tt_cache,
                                             kernel=tt_kernel)
    elif embeddings == "per_table":
        embedding_module = PerTableEmbeddings(
            [table_weight(table, seed, index, device)
             for index, table in enumerate(workload.tables)], sparse)
    else:
        embedding_module = EMBEDDINGS[embeddings](
            concatenated_table_weights(workload.tables, seed, device), sparse)
    return DLRM(
        workload,
        bottom=mlp(workload.num_dense, workload.bottom_mlp, final_relu=True, seed=seed),
        embeddings=embedding_module,
        interaction=interaction_module(workload, seed),
        top=mlp(top_input_width(workload), workload.top_mlp, final_relu=False, seed=seed + 1),
    ).to(device)


def batch_tensors(batch: Batch, device: torch.device) -> tuple:
    """A generated batch as (dense, indices per table, offsets per table) on a device."""
    dense = torch.from_numpy(batch.dense).to(device)
    indices = [torch.from_numpy(table.indices).to(device) for table in batch.tables]
    offsets = [torch.from_numpy(table.offsets).to(device) for table in batch.tables]
    return dense, indices, offsets


def flops_per_sample(workload: WorkloadSpec) -> float:
    """Forward FLOPs of one sample: MLP layers, the interaction and the pooling adds."""
    def mlp_flops(width_in: int, widths: Sequence[int]) -> float:
        total = 0.0
        for width_out in widths:
            total += 2.0 * width_in * width_out
            width_in = width_out
        return total

    features = workload.num_features
    if workload.interaction == "dot":
        interaction = 2.0 * features * features * workload.dim
        top_input = workload.interaction_width
    elif workload.interaction == "cat":
        interaction = 0.0
        top_input = workload.dim * features
    else:
        width = workload.dim * features
        interaction = DCN_LAYERS * 4.0 * width * min(DCN_RANK, width)
        top_input = width
    lookups = sum(table.pooling.mean for table in workload.tables)
    return (mlp_flops(workload.num_dense, workload.bottom_mlp) + interaction
            + mlp_flops(top_input, workload.top_mlp) + lookups * workload.dim)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as stored."""
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
