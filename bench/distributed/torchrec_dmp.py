"""The same DLRM with torchrec's EmbeddingBagCollection sharded table-wise by its DMP."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench import peers
from bench.distributed.hybrid import LEARNING_RATE, bag_slice, summed_allreduce_hook
from bench.embeddings import table_weight
from bench.models.dlrm import interaction_module, mlp, top_input_width
from bench.run.timing import PhaseTimer
from workloads.specs import WorkloadSpec

# torchrec's sharded forward (input all-to-all, fused lookup, pooled all-to-all) and its
# backward (with the fused embedding update) are one call each: their parts are not timed
# apart, so a row carries only the phases that can be measured on their own.
TRAIN_PHASES = ("forward", "backward", "allreduce", "optimizer")
INFER_PHASES = ("forward",)


def torchrec_version() -> str:
    """The torchrec version these rows ran (it is the impl under test)."""
    return str(getattr(peers.require("torchrec"), "__version__", "unknown"))


def feature_name(table: int) -> str:
    """The KJT key (and table name) of a workload table."""
    return f"t{table}"


class SparseDenseDLRM(nn.Module):
    """torchrec's EmbeddingBagCollection, then the suite's bottom MLP, interaction and top
    MLP (same seeds as bench.models.dlrm.build_dlrm; the tables get theirs in load_tables)."""

    def __init__(self, workload: WorkloadSpec, seed: int):
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        configs = [EmbeddingBagConfig(name=feature_name(index), embedding_dim=workload.dim,
                                      num_embeddings=table.rows,
                                      feature_names=[feature_name(index)],
                                      pooling=PoolingType.SUM)
                   for index, table in enumerate(workload.tables)]
        # On meta: DMP allocates only each rank's own tables (load_tables then fills them);
        # it does not carry an unsharded module's values over to its shards.
        self.sparse = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        self.bottom = mlp(workload.num_dense, workload.bottom_mlp, final_relu=True, seed=seed)
        self.interaction = interaction_module(workload, seed)
        self.top = mlp(top_input_width(workload), workload.top_mlp, final_relu=False,
                       seed=seed + 1)
        self.num_tables, self.dim = len(workload.tables), workload.dim
        self.autocast_dtype: Optional[torch.dtype] = None

    def pooled(self, features) -> torch.Tensor:
        """KJT of a local batch -> pooled vectors [b, T, D] in table order."""
        # By key, not values(): a sharded collection returns its keys in shard order.
        by_key = self.sparse(features).to_dict()
        return torch.stack([by_key[feature_name(table)] for table in range(self.num_tables)],
                           dim=1)

    def forward(self, dense: torch.Tensor, features) -> torch.Tensor:
        """Local dense [b, F] and KJT -> logits [b]."""
        pooled = self.pooled(features)
        autocast = (torch.autocast(dense.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:  # the MLPs only, as the hybrid impl autocasts
            bottom = self.bottom(dense)
            return self.top(self.interaction(bottom, pooled.to(bottom.dtype))).squeeze(1)


@dataclasses.dataclass
class DmpInputs:
    """One batch as this rank sees it: its samples' dense features, labels and KJT."""

    dense: torch.Tensor
    labels: torch.Tensor
    features: object  # torchrec KeyedJaggedTensor


def local_features(batch, first: int, last: int, num_tables: int):
    """Samples [first, last) of a global batch as a KJT over every table."""
    from torchrec import KeyedJaggedTensor

    values, lengths = [], []
    for table in range(num_tables):
        indices, offsets = bag_slice(batch.tables[table].indices, batch.tables[table].offsets,
                                      first, last)
        values.append(indices)
        lengths.append(torch.diff(offsets, append=torch.tensor([indices.numel()])))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[feature_name(table) for table in range(num_tables)],
        values=torch.cat(values).long(), lengths=torch.cat(lengths).int())


def shard_table_wise(module: SparseDenseDLRM, world_size: int, learning_rate: float,
                     device: torch.device):
    """DMP over the model: the planner may only place whole tables; the tables train by
    fbgemm's fused exact SGD; the MLPs under DDP. Returns (dmp, torchrec's plan)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.comm import get_local_size
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingType

    sharders = [EmbeddingBagCollectionSharder(fused_params={
        "optimizer": EmbOptimType.EXACT_SGD, "learning_rate": learning_rate})]
    constraints = {feature_name(table): ParameterConstraints(
        sharding_types=[ShardingType.TABLE_WISE.value]) for table in range(module.num_tables)}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, local_world_size=get_local_size(world_size),
                          compute_device=device.type),
        constraints=constraints)
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module, device=device, plan=plan, sharders=sharders)
    return dmp, plan


@torch.no_grad()
def load_tables(dmp, workload: WorkloadSpec, seed: int) -> None:
    """Write the seeded table weights (bench.embeddings.table_weight) into this rank's shards."""
    state = dmp.state_dict()  # a sharded table's local shards are views of fbgemm's weights
    for index, table in enumerate(workload.tables):
        shards = state[f"sparse.embedding_bags.{feature_name(index)}.weight"].local_shards()
        if not shards:
            continue
        weight = table_weight(table, seed, index)
        for shard in shards:
            row, column = shard.metadata.shard_offsets
            rows, columns = shard.tensor.shape
            shard.tensor.copy_(weight[row:row + rows, column:column + columns])


def table_owners(plan, num_tables: int) -> dict:
    """torchrec's plan as {table: owning rank} (table-wise: one shard per table)."""
    parameters = plan.get_plan_for_module("sparse")
    owners = {}
    for table in range(num_tables):
        sharding = parameters[feature_name(table)]
        if sharding.sharding_type != "table_wise":
            raise RuntimeError(f"torchrec planned table {table} {sharding.sharding_type}")
        owners[table] = sharding.ranks[0]
    return owners


def mean_allreduce_hook(timer: PhaseTimer, bucket):  # DDP checks a real annotation; none
    """A DDP comm hook: the hybrid's blocking SUM allreduce (the allreduce phase), then DDP's
    division by the world size, since torchrec's convention is each rank's mean loss."""
    future = summed_allreduce_hook(timer, bucket)
    bucket.buffer().div_(dist.get_world_size())  # the future holds this very buffer
    return future


class TorchrecDLRM:
    """One rank's DMP-sharded DLRM and its timed train and inference steps."""

    def __init__(self, workload: WorkloadSpec, rank: int, world_size: int, seed: int,
                 device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
                 embedding_lr_scale: float = 1.0):
        if workload.batch_size % world_size:
            raise ValueError(f"global batch {workload.batch_size} is not divisible by "
                             f"{world_size} ranks; give a --batch-size that is")
        self.workload, self.rank, self.world_size, self.device = (workload, rank, world_size,
                                                                  device)
        # Unsupported (a skipped row naming the install command) where either is missing.
        peers.require("fbgemm_gpu")
        peers.require("torchrec")
        self.global_batch = workload.batch_size
        self.local_batch = workload.batch_size // world_size
        self.timer = PhaseTimer(torch.cuda.synchronize if device.type == "cuda" else None)
        module = SparseDenseDLRM(workload, seed)
        module.autocast_dtype = autocast_dtype
        # embedding_lr_scale != 1 only from the test-only planted fault (rank.py).
        self.dmp, self.plan = shard_table_wise(module, world_size,
                                               LEARNING_RATE * embedding_lr_scale, device)
        load_tables(self.dmp, workload, seed)
        self.owners = table_owners(self.plan, len(workload.tables))
        self.dense_arch = self.dmp.module  # the unwrapped model: bottom, top (for checks)
        ddp = [item for item in self.dmp.modules() if isinstance(item, DistributedDataParallel)]
        for wrapper in ddp:
            wrapper.register_comm_hook(self.timer, mean_allreduce_hook)
        self.dense_parameters = [parameter for name, parameter in
                                 self.dense_arch.named_parameters()
                                 if not name.startswith("sparse.")]
        self.dense_optimizer = torch.optim.SGD(self.dense_parameters, lr=LEARNING_RATE)

    def inputs(self, batch, labels: np.ndarray) -> DmpInputs:
        """This rank's samples of a global batch (input distribution is torchrec's, timed)."""
        first, last = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        return DmpInputs(
            dense=torch.from_numpy(batch.dense[first:last].copy()).to(self.device),
            labels=torch.from_numpy(labels[first:last].copy()).to(self.device),
            features=local_features(batch, first, last, len(self.workload.tables))
            .to(self.device))

    def gradient_bytes(self) -> int:
        """Bytes of the DDP-synchronised gradients (each allreduce step moves this much)."""
        return sum(parameter.numel() * parameter.element_size()
                   for parameter in self.dense_parameters)

    def sharding_plan(self) -> dict:
        """torchrec's plan for a row: table -> rank."""
        return {"mode": "torchrec table_wise", "world_size": self.world_size,
                "tables": [{"table": table, "kind": "table", "owner": owner}
                           for table, owner in sorted(self.owners.items())]}

    def describe(self) -> str:
        """The printed plan: one line per rank."""
        lines = [f"torchrec sharding plan (table_wise, {self.world_size} ranks):"]
        for rank in range(self.world_size):
            tables = ",".join(str(t) for t, owner in sorted(self.owners.items())
                              if owner == rank) or "-"
            lines.append(f"  rank {rank}: tables [{tables}] whole")
        return "\n".join(lines)

    def train_step(self, inputs: DmpInputs) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One SGD step; returns (local mean loss, local logits, phase seconds)."""
        timer = self.timer
        timer.reset()
        with timer.phase("forward"):
            logits = self.dmp(inputs.dense, inputs.features)
            # torchrec's convention: each rank's mean loss; its backward all-to-all divides
            # the pooled gradients by the world size (comm_ops.GRADIENT_DIVISION) as DDP's
            # mean divides the MLPs': both then are the global batch's mean-loss gradient.
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(),
                                                                  inputs.labels)
        with timer.phase("backward"):  # includes the fused embedding SGD and the allreduce
            loss.backward()
        with timer.phase("optimizer"):
            self.dense_optimizer.step()
            self.dense_optimizer.zero_grad(set_to_none=True)
        phases = dict(timer.seconds)
        phases.setdefault("allreduce", 0.0)
        phases["backward"] -= phases["allreduce"]
        return loss.detach(), logits.detach(), phases

    @torch.no_grad()
    def infer_step(self, inputs: DmpInputs) -> tuple[torch.Tensor, dict]:
        """One forward pass; returns (local logits, phase seconds)."""
        self.timer.reset()
        with self.timer.phase("forward"):
            logits = self.dmp(inputs.dense, inputs.features)
        return logits, dict(self.timer.seconds)

    @torch.no_grad()
    def local_pooled(self, inputs: DmpInputs) -> torch.Tensor:
        """The pooled vectors of this rank's samples [b, T, D] from the sharded tables."""
        return self.dense_arch.pooled(inputs.features).clone()
