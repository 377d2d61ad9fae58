"""A DLRM built from a workload spec: bottom MLP, pooled embeddings, interaction, top MLP."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bench.ops.common import table_weight
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


class DotInteraction(nn.Module):
    """Pairwise dot products of the feature vectors (bmm + lower-triangle gather), then concat."""

    def __init__(self, num_features: int):
        super().__init__()
        rows, cols = torch.tril_indices(num_features, num_features, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, dense: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """dense [B, D], features [B, F, D] (dense first) -> [B, D + F(F-1)/2]."""
        products = torch.bmm(features, features.transpose(1, 2))
        return torch.cat([dense, products[:, self.rows, self.cols]], dim=1)


class CatInteraction(nn.Module):
    """The concat variant: the feature vectors side by side."""

    def forward(self, dense: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """features [B, F, D] -> [B, F * D]."""
        return features.flatten(1)


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

    def forward(self, dense: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """features [B, F, D] -> [B, F * D]."""
        first = features.flatten(1)
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


class BatchedEmbeddings(nn.Module):
    """All tables concatenated into one EmbeddingBag, looked up in one call."""

    def __init__(self, weights: list[torch.Tensor], sparse: bool):
        super().__init__()
        self.bag = nn.EmbeddingBag.from_pretrained(torch.cat(weights), freeze=False, mode="sum",
                                                   sparse=sparse)
        starts = np.concatenate(([0], np.cumsum([weight.shape[0] for weight in weights])[:-1]))
        self.register_buffer("row_starts", torch.as_tensor(starts, dtype=torch.int64),
                             persistent=False)
        self.num_tables = len(weights)

    def forward(self, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        """Per-table inputs -> [B, T, D]; bags are table-major, which keeps each table's rows
        together in memory order (sample-major order was slower on big tables)."""
        counts = torch.tensor([table_indices.numel() for table_indices in indices])
        shifted = torch.cat(indices) + torch.repeat_interleave(
            self.row_starts, counts.to(self.row_starts.device))
        lookup_starts = torch.cumsum(counts, 0) - counts
        bag_starts = (torch.stack(offsets) + lookup_starts.to(shifted.device).unsqueeze(1))
        pooled = self.bag(shifted, bag_starts.flatten())
        return pooled.view(self.num_tables, -1, pooled.shape[-1]).transpose(0, 1)


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
        features = torch.cat([bottom.unsqueeze(1), pooled], dim=1)
        return self.top(self.interaction(bottom, features)).squeeze(1)


def top_input_width(workload: WorkloadSpec) -> int:
    """Width of the interaction output that feeds the top MLP."""
    if workload.interaction == "dot":
        return workload.interaction_width
    return workload.dim * workload.num_features


def build_dlrm(workload: WorkloadSpec, seed: int, embeddings: str = "batched",
               sparse: bool = True) -> DLRM:
    """A seeded fp32 DLRM for the workload with the chosen embedding layout."""
    weights = [table_weight(table, seed, index) for index, table in enumerate(workload.tables)]
    return DLRM(
        workload,
        bottom=mlp(workload.num_dense, workload.bottom_mlp, final_relu=True, seed=seed),
        embeddings=EMBEDDINGS[embeddings](weights, sparse),
        interaction=interaction_module(workload, seed),
        top=mlp(top_input_width(workload), workload.top_mlp, final_relu=False, seed=seed + 1),
    )


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
