"""Float64 reference formulations, written independently of the kernels and modules they check."""

# Every function here takes plain tensors (parameters read from the model under test, never its
# modules or methods) and computes in float64 with elementary torch ops: index_add for pooling,
# einsum for products, explicit updates for SGD. A bug in the code under test therefore cannot
# reappear in its reference. Only torch is imported: nothing from bench.models.

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT64 = torch.float64
CPU = torch.device("cpu")
TT_CHUNK_ROWS = 16384  # rows reconstructed at a time by tt_rows64


def as64(tensor: torch.Tensor) -> torch.Tensor:
    """A detached float64 CPU copy of a tensor."""
    return tensor.detach().to(CPU, FLOAT64).clone()


def bag_of_lookups(offsets: torch.Tensor, num_lookups: int) -> torch.Tensor:
    """The bag each lookup belongs to, from bag start offsets (bag b owns [o_b, o_b+1))."""
    positions = torch.arange(num_lookups, dtype=torch.int64)
    # The last start not after a position is its bag: empty bags own no positions.
    return torch.searchsorted(offsets.cpu().long(), positions, right=True) - 1


def pool_rows64(rows64: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor,
                mode: str = "sum", weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pooled bags [bags, dim] of rows64[positions], one bag per offset (differentiable)."""
    if mode not in ("sum", "mean"):
        raise ValueError(f"no reference pooling mode {mode!r}")
    positions = positions.cpu().long().reshape(-1)
    bags = offsets.numel()
    owner = bag_of_lookups(offsets, positions.numel())
    looked_up = rows64.index_select(0, positions)
    if weights is not None:
        looked_up = looked_up * weights.detach().to(CPU, FLOAT64).reshape(-1, 1)
    pooled = torch.zeros(bags, rows64.shape[1], dtype=rows64.dtype).index_add(0, owner, looked_up)
    if mode == "mean":
        lengths = torch.bincount(owner, minlength=bags).to(FLOAT64).clamp(min=1.0)
        pooled = pooled / lengths.unsqueeze(1)
    return pooled


def table_lookup64(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                   mode: str = "sum", weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float64 pooled lookup of a table: only the rows the batch touches are widened."""
    indices = indices.cpu().long().reshape(-1)
    rows, positions = torch.unique(indices, return_inverse=True)
    rows64 = weight.detach()[rows.to(weight.device)].to(CPU, FLOAT64)
    return pool_rows64(rows64, positions, offsets, mode, weights)


def linear_stack64(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], inputs: torch.Tensor,
                   final_relu: bool) -> torch.Tensor:
    """Linear layers (weight [out, in], bias [out]) with a ReLU after each but the last,
    and after the last too when final_relu; the DLRM MLP by its definition."""
    activations = inputs.to(CPU, FLOAT64)
    for position, (weight, bias) in enumerate(layers):
        activations = torch.einsum("bi,oi->bo", activations, weight) + bias
        if position < len(layers) - 1 or final_relu:
            activations = activations.clamp(min=0.0)
    return activations


def dot_interaction64(dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """dense [B, D], pooled [B, T, D] -> [B, D + F(F-1)/2]: every pair i > j of the F = T + 1
    features (dense first), in row-major lower-triangle order, after the dense vector."""
    features = torch.cat([dense.unsqueeze(1), pooled], dim=1).to(FLOAT64)
    count = features.shape[1]
    gram = torch.einsum("bid,bjd->bij", features, features)
    rows, cols = torch.tril_indices(count, count, offset=-1)
    return torch.cat([dense.to(FLOAT64), gram[:, rows, cols]], dim=1)


def cat_interaction64(dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """dense [B, D], pooled [B, T, D] -> [B, (T + 1) D]: dense, then each table's vector."""
    batch, tables, dim = pooled.shape
    output = torch.empty(batch, (tables + 1) * dim, dtype=FLOAT64)
    output[:, :dim] = dense.to(FLOAT64)
    output[:, dim:] = pooled.to(FLOAT64).reshape(batch, tables * dim)
    return output


def cross_interaction64(dense: torch.Tensor, pooled: torch.Tensor,
                        layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                        ) -> torch.Tensor:
    """DCNv2 low-rank cross layers x <- x + x0 * (x (U V) + b) over the concatenated features;
    (down, up, bias) per layer, the two factors multiplied first (a different order)."""
    first = cat_interaction64(dense, pooled)
    current = first
    for down, up, bias in layers:
        current = current + first * (torch.einsum("bi,ij->bj", current, down @ up) + bias)
    return current


def tt_digits(row_ids: torch.Tensor, row_factors: Sequence[int]) -> list[torch.Tensor]:
    """Mixed-radix digits (i_1, ..., i_K) of row ids, i_1 most significant, by repeated
    division from the least significant end."""
    remaining = row_ids.cpu().long().reshape(-1).clone()
    digits: list[torch.Tensor] = []
    for factor in reversed(row_factors):
        digits.append(remaining % factor)
        remaining = remaining // factor
    return digits[::-1]


def tt_rows64(cores: Sequence[torch.Tensor], row_ids: torch.Tensor,
              row_factors: Sequence[int]) -> torch.Tensor:
    """Rows [len(row_ids), prod d_k] of a tensor-train table, contracted from the last core
    to the first (cores (r_k-1, n_k, d_k, r_k), row index j_1 ... j_K, j_1 most significant)."""
    row_ids = row_ids.cpu().long().reshape(-1)
    # In chunks: the gathered float64 core slices of a whole big batch would not fit.
    chunks = [_tt_rows_chunk(cores, row_ids[start:start + TT_CHUNK_ROWS], row_factors)
              for start in range(0, row_ids.numel(), TT_CHUNK_ROWS)]
    if not chunks:
        return torch.zeros(0, math.prod(core.shape[2] for core in cores), dtype=cores[0].dtype)
    return torch.cat(chunks)


def _tt_rows_chunk(cores: Sequence[torch.Tensor], row_ids: torch.Tensor,
                   row_factors: Sequence[int]) -> torch.Tensor:
    digits = tt_digits(row_ids, row_factors)
    count = row_ids.numel()
    # tail[b, (j_k ... j_K), l]: cores k..K multiplied for each row, l the bond r_k-1;
    # it starts as the empty product (r_K = 1) and grows one core at a time, leftwards.
    tail = torch.ones(count, 1, 1, dtype=cores[0].dtype)
    for core, digit in zip(reversed(list(cores)), reversed(digits)):
        slices = core[:, digit]  # [r_k-1, B, d_k, r_k]
        tail = torch.einsum("lbdr,bjr->bdjl", slices, tail).flatten(1, 2)
    return tail.reshape(count, -1)


def tt_lookup64(cores: Sequence[torch.Tensor], row_factors: Sequence[int], indices: torch.Tensor,
                offsets: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float64 sum-pooled lookup of a tensor-train table's rows (what the cores define)."""
    rows, positions = torch.unique(indices.cpu().long().reshape(-1), return_inverse=True)
    cores64 = [as64(core) for core in cores]
    return pool_rows64(tt_rows64(cores64, rows, row_factors), positions, offsets, "sum", weights)


def binary_cross_entropy64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE of logits z against labels y, as softplus(z) - y z (stable for any z)."""
    labels = labels.to(CPU, FLOAT64)
    return (torch.nn.functional.softplus(logits) - labels * logits).mean()


def sgd_update(parameters: Sequence[torch.Tensor], learning_rate: float) -> list[torch.Tensor]:
    """Plain SGD, p - lr * grad, as new detached tensors (a missing gradient leaves p as is)."""
    return [(parameter - learning_rate * parameter.grad if parameter.grad is not None
             else parameter).detach() for parameter in parameters]
