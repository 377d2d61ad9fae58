"""The hybrid-parallel DLRM step: sharded lookups, an all-to-all of pooled vectors, DDP MLPs."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.distributed.plan import REPLICATED, ROW_WISE, ShardingPlan
from bench.embeddings import table_weight
from bench.models.dlrm import interaction_module, mlp, top_input_width
from bench.run.timing import PhaseTimer
from workloads.generators import label_stream, make_batch
from workloads.specs import WorkloadSpec

LEARNING_RATE = 0.1  # the DLRM Kaggle config's SGD rate (as dlrm_train uses)
TRAIN_PHASES = ("lookup", "alltoall_forward", "mlp_forward", "mlp_backward", "allreduce",
                "alltoall_backward", "lookup_backward", "optimizer")
INFER_PHASES = ("lookup", "alltoall_forward", "mlp_forward")
COLLECTIVE_PHASES = ("alltoall_forward", "alltoall_backward", "allreduce")


def _bag(weight: torch.Tensor, sparse: bool) -> nn.EmbeddingBag:
    return nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum", sparse=sparse)


class ShardedTables(nn.Module):
    """This rank's embedding shards: the whole tables it owns, then its rows of each row-wise
    table; looked up for the global batch, as the DLRM reference's model-parallel part does."""

    def __init__(self, workload: WorkloadSpec, plan: ShardingPlan, rank: int, seed: int):
        super().__init__()
        self.owned = plan.owned_by(rank)
        row_wise = plan.of_kind(ROW_WISE)
        self.row_tables = [placement.table for placement in row_wise]
        self.row_ranges = [placement.row_ranges[rank] for placement in row_wise]
        weights = [table_weight(workload.tables[table], seed, table) for table in self.owned]
        for table, (start, end) in zip(self.row_tables, self.row_ranges):
            weights.append(table_weight(workload.tables[table], seed, table)[start:end].clone())
        # Sparse gradients: the owner updates only the rows the batch touched.
        self.bags = nn.ModuleList(_bag(weight, sparse=True) for weight in weights)
        self.dim = workload.dim

    @property
    def slots(self) -> int:
        """Pooled vectors per sample this rank produces."""
        return len(self.bags)

    def forward(self, indices: list[torch.Tensor], offsets: list[torch.Tensor],
                batch_size: int) -> torch.Tensor:
        """Per-shard inputs (shard order) for the global batch -> [B, slots, D]."""
        if not self.bags:
            weight = torch.zeros(0)
            return weight.new_zeros(batch_size, 0, self.dim)
        return torch.stack([bag(shard_indices, shard_offsets) for bag, shard_indices,
                            shard_offsets in zip(self.bags, indices, offsets)], dim=1)


class DenseArch(nn.Module):
    """The data-parallel part: bottom MLP, the replicated tables, interaction and top MLP."""

    def __init__(self, workload: WorkloadSpec, plan: ShardingPlan, seed: int):
        super().__init__()
        # Same seeds as bench.models.dlrm.build_dlrm, so one process's model is the same model.
        self.bottom = mlp(workload.num_dense, workload.bottom_mlp, final_relu=True, seed=seed)
        self.replicated = [placement.table for placement in plan.of_kind(REPLICATED)]
        # Dense gradients: DDP allreduces them with the MLP's (a small table's whole gradient
        # costs less than its slot in the all-to-all).
        self.bags = nn.ModuleList(_bag(table_weight(workload.tables[table], seed, table),
                                       sparse=False) for table in self.replicated)
        self.interaction = interaction_module(workload, seed)
        self.top = mlp(top_input_width(workload), workload.top_mlp, final_relu=False,
                       seed=seed + 1)
        self.sharded = [placement.table for placement in plan.placements
                        if placement.kind != REPLICATED]
        self.num_tables = len(workload.tables)

    def forward(self, dense: torch.Tensor, replicated_indices: list[torch.Tensor],
                replicated_offsets: list[torch.Tensor], received: torch.Tensor) -> torch.Tensor:
        """Local batch: dense [b, F], received pooled vectors [b, sharded tables, D] -> logits."""
        bottom = self.bottom(dense)
        parts: list[Optional[torch.Tensor]] = [None] * self.num_tables
        for slot, table in enumerate(self.sharded):
            parts[table] = received[:, slot]
        for bag, table, table_indices, table_offsets in zip(
                self.bags, self.replicated, replicated_indices, replicated_offsets):
            parts[table] = bag(table_indices, table_offsets)
        pooled = torch.stack(parts, dim=1).to(bottom.dtype)
        return self.top(self.interaction(bottom, pooled)).squeeze(1)


class PooledExchange:
    """The all-to-all of pooled vectors (forward) and of their gradients (backward).

    Rank s sends each rank d the [b, K_s, D] vectors of d's samples from its K_s shards (its
    whole tables, then its part-sums of each row-wise table); d adds the row-wise part-sums."""

    def __init__(self, plan: ShardingPlan, rank: int, local_batch: int, dim: int):
        self.world_size, self.local_batch, self.dim = plan.world_size, local_batch, dim
        sharded = [p.table for p in plan.placements if p.kind != REPLICATED]
        position = {table: slot for slot, table in enumerate(sharded)}
        row_tables = [p.table for p in plan.of_kind(ROW_WISE)]
        self.source_slots = [plan.sent_slots(source) for source in range(plan.world_size)]
        targets = [position[table] for source in range(plan.world_size)
                   for table in plan.owned_by(source) + row_tables]
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.sharded_tables = len(sharded)
        self.sent_slots = plan.sent_slots(rank)
        self.value_bytes = 4

    def _splits(self, slots_per_part: list[int]) -> list[int]:
        return [slots * self.local_batch * self.dim for slots in slots_per_part]

    def send_bytes(self) -> int:
        """Bytes this rank's forward all-to-all sends (its own share included)."""
        return self.world_size * self.local_batch * self.sent_slots * self.dim * self.value_bytes

    def receive_bytes(self) -> int:
        """Bytes this rank's forward all-to-all receives (the backward sends as many)."""
        return sum(self._splits(self.source_slots)) * self.value_bytes

    def forward(self, sent: torch.Tensor) -> torch.Tensor:
        """[B, K, D] part-sums for every rank's samples -> [b, sharded tables, D] of mine."""
        # Samples are contiguous per destination, so [B, K, D] already is [W, b, K, D].
        received = sent.new_empty(sum(self._splits(self.source_slots)))
        dist.all_to_all_single(received, sent.contiguous().view(-1),
                               output_split_sizes=self._splits(self.source_slots),
                               input_split_sizes=self._splits([self.sent_slots] * self.world_size))
        pieces = [piece.view(self.local_batch, slots, self.dim) for piece, slots in
                  zip(received.split(self._splits(self.source_slots)), self.source_slots)]
        gathered = torch.cat(pieces, dim=1)
        pooled = gathered.new_zeros(self.local_batch, self.sharded_tables, self.dim)
        # index_add: a table-wise slot lands alone; row-wise part-sums add up.
        return pooled.index_add_(1, self.targets, gathered)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient of forward's output [b, T, D] -> gradient of its input [B, K, D]."""
        # The gradient of a sum reaches every part-sum unchanged: index_select is index_add's
        # adjoint.
        selected = grad.index_select(1, self.targets)
        outgoing = torch.cat([piece.reshape(-1) for piece in
                              selected.split(self.source_slots, dim=1)])
        returned = grad.new_empty(self.world_size * self.local_batch * self.sent_slots * self.dim)
        dist.all_to_all_single(returned, outgoing,
                               output_split_sizes=self._splits([self.sent_slots]
                                                               * self.world_size),
                               input_split_sizes=self._splits(self.source_slots))
        return returned.view(self.world_size * self.local_batch, self.sent_slots, self.dim)


def summed_allreduce_hook(timer: PhaseTimer, bucket):  # DDP checks a real annotation; none
    """A DDP comm hook: a blocking SUM allreduce of the bucket, timed as the allreduce phase.

    Blocking (no overlap with backward) so that the phase is measurable on its own; SUM (not
    DDP's mean) because the loss is already divided by the global batch."""
    with timer.phase("allreduce"):
        dist.all_reduce(bucket.buffer())
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


@dataclasses.dataclass
class RankInputs:
    """One batch as this rank sees it: its samples' dense features, labels and replicated-table
    inputs, and the global batch's inputs of its shards."""

    dense: torch.Tensor
    labels: torch.Tensor
    shard_indices: list[torch.Tensor]
    shard_offsets: list[torch.Tensor]
    replicated_indices: list[torch.Tensor]
    replicated_offsets: list[torch.Tensor]


def bag_slice(indices: np.ndarray, offsets: np.ndarray, first: int, last: int):
    """Bags [first, last) of a batch as (indices, offsets starting at 0)."""
    ends = np.append(offsets, len(indices))
    start, end = ends[first], ends[last]
    return (torch.from_numpy(indices[start:end].copy()),
            torch.from_numpy((offsets[first:last] - start).copy()))


def _row_shard_inputs(indices: np.ndarray, offsets: np.ndarray, start: int, end: int):
    """A row-wise shard's inputs: the lookups that fall in [start, end), ids made local."""
    lengths = np.diff(np.append(offsets, len(indices)))
    bags = np.repeat(np.arange(len(offsets)), lengths)
    keep = (indices >= start) & (indices < end)
    counts = np.bincount(bags[keep], minlength=len(offsets))
    local_offsets = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    return torch.from_numpy(indices[keep] - start), torch.from_numpy(local_offsets)


def labels_for(seed: int, batch_index: int, batch_size: int) -> np.ndarray:
    """Click labels of a batch (Bernoulli 0.5 draws: a timing step needs no teacher)."""
    return (label_stream(seed, batch_index).random(batch_size) < 0.5).astype(np.float32)


def global_batch(workload: WorkloadSpec, seed: int, batch_index: int):
    """The global batch every rank draws alike (same seed and index, same batch)."""
    return make_batch(workload, seed, batch_index, workload.batch_size), labels_for(
        seed, batch_index, workload.batch_size)


def rank_inputs(batch, labels: np.ndarray, plan: ShardingPlan, rank: int,
                tables: ShardedTables, dense_arch: DenseArch, device: torch.device) -> RankInputs:
    """Cut a global batch into what this rank needs (input distribution is not timed: a
    sharded data loader would deliver it so)."""
    local = len(labels) // plan.world_size
    first, last = rank * local, (rank + 1) * local
    shard_indices, shard_offsets = [], []
    for table in tables.owned:
        shard_indices.append(torch.from_numpy(batch.tables[table].indices))
        shard_offsets.append(torch.from_numpy(batch.tables[table].offsets))
    for table, (start, end) in zip(tables.row_tables, tables.row_ranges):
        table_indices, table_offsets = _row_shard_inputs(
            batch.tables[table].indices, batch.tables[table].offsets, start, end)
        shard_indices.append(table_indices)
        shard_offsets.append(table_offsets)
    replicated = [bag_slice(batch.tables[table].indices, batch.tables[table].offsets, first,
                             last) for table in dense_arch.replicated]

    def move(tensors):
        return [tensor.to(device) for tensor in tensors]

    return RankInputs(
        dense=torch.from_numpy(batch.dense[first:last].copy()).to(device),
        labels=torch.from_numpy(labels[first:last].copy()).to(device),
        shard_indices=move(shard_indices), shard_offsets=move(shard_offsets),
        replicated_indices=move([pair[0] for pair in replicated]),
        replicated_offsets=move([pair[1] for pair in replicated]))


def no_buffer_sync_keywords(ddp_class=None) -> dict:
    """The DDP keyword that turns off the per-forward buffer broadcast (the dense arch has no
    buffers): torch 2.13 names it forward_sync_buffers and deprecates broadcast_buffers, which
    older torch (2.11 on the GPU machines) still needs, so the signature decides."""
    ddp_class = DistributedDataParallel if ddp_class is None else ddp_class
    parameters = inspect.signature(ddp_class.__init__).parameters
    if "forward_sync_buffers" in parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class HybridDLRM:
    """One rank's part of a hybrid-parallel DLRM and its timed train and inference steps."""

    def __init__(self, workload: WorkloadSpec, plan: ShardingPlan, rank: int, seed: int,
                 device: torch.device, autocast_dtype: Optional[torch.dtype] = None):
        if workload.batch_size % plan.world_size:
            raise ValueError(f"global batch {workload.batch_size} is not divisible by "
                             f"{plan.world_size} ranks; give a --batch-size that is")
        self.workload, self.plan, self.rank, self.device = workload, plan, rank, device
        self.global_batch = workload.batch_size
        self.local_batch = workload.batch_size // plan.world_size
        self.autocast_dtype = autocast_dtype
        self.timer = PhaseTimer(torch.cuda.synchronize if device.type == "cuda" else None)
        self.tables = ShardedTables(workload, plan, rank, seed).to(device)
        self.dense_arch = DenseArch(workload, plan, seed).to(device)
        self.dense = DistributedDataParallel(self.dense_arch, **no_buffer_sync_keywords())
        self.dense.register_comm_hook(self.timer, summed_allreduce_hook)
        self.exchange = PooledExchange(plan, rank, self.local_batch, workload.dim)
        self.dense_optimizer = torch.optim.SGD(self.dense.parameters(), lr=LEARNING_RATE)
        self.sparse_optimizer = (torch.optim.SGD(self.tables.parameters(), lr=LEARNING_RATE)
                                 if self.tables.slots else None)

    def inputs(self, batch, labels) -> RankInputs:
        """This rank's cut of a global batch."""
        return rank_inputs(batch, labels, self.plan, self.rank, self.tables, self.dense_arch,
                           self.device)

    def gradient_bytes(self) -> int:
        """Bytes of the DDP-synchronised gradients (each allreduce step moves this much)."""
        return sum(parameter.numel() * parameter.element_size()
                   for parameter in self.dense_arch.parameters())

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _pooled(self, inputs: RankInputs) -> torch.Tensor:
        return self.tables(inputs.shard_indices, inputs.shard_offsets, self.global_batch)

    def train_step(self, inputs: RankInputs) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One SGD step; returns (local loss sum / global batch, local logits, phase seconds)."""
        timer = self.timer
        timer.reset()
        with timer.phase("lookup"):
            sent = self._pooled(inputs)
        with timer.phase("alltoall_forward"):
            received = self.exchange.forward(sent.detach())
        received.requires_grad_()
        with timer.phase("mlp_forward"):
            with self._autocast():
                logits = self.dense(inputs.dense, inputs.replicated_indices,
                                    inputs.replicated_offsets, received)
            # Sum over local samples / global batch: the summed allreduce then yields the
            # gradient of the global batch's mean loss, as one process computes it.
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits.float(), inputs.labels, reduction="sum") / self.global_batch
        with timer.phase("backward"):
            loss.backward()
        with timer.phase("alltoall_backward"):
            # No sharded table (all replicated): nothing flows back, but every rank still
            # joins the collective.
            grad = received.grad if received.grad is not None else torch.zeros_like(received)
            returned = self.exchange.backward(grad)
        with timer.phase("lookup_backward"):
            if sent.requires_grad:
                sent.backward(returned)
        with timer.phase("optimizer"):
            self.dense_optimizer.step()
            self.dense_optimizer.zero_grad(set_to_none=True)
            if self.sparse_optimizer is not None:
                self.sparse_optimizer.step()
                self.sparse_optimizer.zero_grad(set_to_none=True)
        phases = dict(timer.seconds)
        phases.setdefault("allreduce", 0.0)
        phases["mlp_backward"] = phases.pop("backward") - phases["allreduce"]
        return loss.detach(), logits.detach(), phases

    @torch.no_grad()
    def infer_step(self, inputs: RankInputs) -> tuple[torch.Tensor, dict]:
        """One forward pass; returns (local logits, phase seconds)."""
        timer = self.timer
        timer.reset()
        with timer.phase("lookup"):
            sent = self._pooled(inputs)
        with timer.phase("alltoall_forward"):
            received = self.exchange.forward(sent)
        with timer.phase("mlp_forward"):
            with self._autocast():
                logits = self.dense_arch(inputs.dense, inputs.replicated_indices,
                                         inputs.replicated_offsets, received)
        return logits, dict(timer.seconds)

    @torch.no_grad()
    def local_pooled(self, inputs: RankInputs) -> torch.Tensor:
        """The pooled vectors of this rank's samples [b, T, D] in table order (for checks)."""
        received = self.exchange.forward(self._pooled(inputs))
        parts: list[Optional[torch.Tensor]] = [None] * len(self.workload.tables)
        for slot, table in enumerate(self.dense_arch.sharded):
            parts[table] = received[:, slot]
        for bag, table, table_indices, table_offsets in zip(
                self.dense_arch.bags, self.dense_arch.replicated, inputs.replicated_indices,
                inputs.replicated_offsets):
            parts[table] = bag(table_indices, table_offsets)
        return torch.stack(parts, dim=1)

    def shard_state(self) -> dict:
        """This rank's parameters as plain tensors: (table, first row, rows) per shard held,
        replicated tables included, and the dense part's state."""
        held = self.tables.owned + self.tables.row_tables
        starts = [0] * len(self.tables.owned) + [start for start, _ in self.tables.row_ranges]
        shards = [(table, start, bag.weight.detach().cpu().clone())
                  for table, start, bag in zip(held, starts, self.tables.bags)]
        shards += [(table, 0, bag.weight.detach().cpu().clone())
                   for bag, table in zip(self.dense_arch.bags, self.dense_arch.replicated)]
        return {"shards": shards,
                "dense": {name: value.detach().cpu().clone()
                          for name, value in self.dense_arch.state_dict().items()}}
