"""The DLRM on FBGEMM's table-batched embeddings (TBE): `dlrm_train` with the TBE's fused
backward + optimizer step (exact SGD, or row-wise Adagrad), and `dlrm_infer` on the inference
TBE's fp16 / int8 / int4 tables, on the CPU or (FBGEMM's CUDA build) cuda. MLPs and
interaction are our per_table model's."""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import torch
from torch import nn

from bench import peers
from bench.compare_outputs import (ACCUMULATION_ROUNDOFF, rowwise_adagrad_bound,
                                   summed_gradient_error, whole_model_bound)
from bench.models.dlrm import DLRM, batch_tensors, build_dlrm, tbe_inputs
from bench.models.teacher import teacher_model
from bench.ops.common import cycling, lookup_bound, rotation_metrics
from bench.models.dlrm_reference import linear_parameters64, logits64, reference_logits
from bench.ops.dlrm import (CUDA_TRAIN, HOST_BUILT_INFERENCE, HOST_BUILT_TRAINING, LEARNING_RATE,
                            TRAIN_PRECISIONS, WHOLE_MODEL_TOLERANCE, after_step, dense_only,
                            inference_accuracy, train_step)
from bench.ops.fbgemm_placement import Placement, placed, placement
from bench.ops.sls_fbgemm import FBGEMM_ON, FBGEMM_PEER
from bench.ops.dlrm_batches import (model_rotation_plan, rotating_batches,
                                    rotating_labelled_batches)
from bench.ops.dlrm_costs import (embedding_traffic, inference_bytes, model_bytes, model_flops,
                                  training_bytes)
from bench.references import (as64, bag_of_lookups, binary_cross_entropy64, pool_rows64,
                              table_lookup64)
from bench.registry import BuildContext, Prepared, Unsupported, impl

CPU = torch.device("cpu")
# FBGEMM's TBE default (SplitTableBatchedEmbeddingBagsCodegen(eps=1.0e-8)), used here as is.
ADAGRAD_EPS = 1.0e-8
ADAGRAD_LEARNING_RATE = LEARNING_RATE
# The Adagrad check steps from the state one earlier step left (rotating batch 1), so that a
# kernel that drops or resets its accumulated state fails, not only one with a wrong formula.
ADAGRAD_WARM_UP_BATCH = 1
INFER_PRECISIONS = ("fp16", "int8", "int4")
# Row-wise Adagrad normalises each row's gradient, so a row whose gradient is small next to
# its error moves by O(lr) in a wrong direction; the check bounds it from the gradient's own
# error (adagrad_step_bound). Under bf16 autocast that error is no longer small: on smoke the
# pooled outputs' gradients were off by up to 0.3 of their sample's RMS (3x even the bf16
# whole-model bound) and 654 of 665 rows had a gradient within 10x its error, so a bound that
# admits them would pass a doubled learning rate. fp32 only.
ADAGRAD_PRECISIONS = ("fp32",)
# The relative L2 gate of the Adagrad step. Rows whose gradient is within its own error (the
# loss gradient sigmoid(z) - y is tiny where the student matches its teacher) move by O(lr)
# either way, so the step's relative L2 is as large as its per-element bound allows: 6.7e-4
# on dlrm-default (8 x 1M rows, 100 lookups a bag) with every element inside its bound (worst
# ratio 0.035). The per-element bound is the gate that catches a wrong rate, eps or state.
ADAGRAD_TOLERANCE = 5e-3


def _fbgemm():
    """The TBE classes and enums (Unsupported, with the install command, when absent)."""
    peers.require("fbgemm_gpu")
    training = peers.require("fbgemm_gpu.split_table_batched_embeddings_ops_training")
    inference = peers.require("fbgemm_gpu.split_table_batched_embeddings_ops_inference")
    common = peers.require("fbgemm_gpu.split_table_batched_embeddings_ops_common")
    configs = peers.require("fbgemm_gpu.split_embedding_configs")
    quantize = peers.require("fbgemm_gpu.tbe.utils")
    return training, inference, common, configs, quantize


def _check_shapes(context: BuildContext) -> Placement:
    if context.variant.get("tt_tables"):
        raise Unsupported("the FBGEMM TBE impls have no TT-Rec tables; use per_table or "
                          "batched with --tt-tables")
    where = placed(context.device, "fbgemm_gpu")
    if context.workload.dim % 4:
        raise Unsupported(f"FBGEMM TBE needs an embedding dim divisible by 4, not "
                          f"{context.workload.dim}")
    return where


class TBEEmbeddings(nn.Module):
    """All tables in one training TBE (fp32 rows, where placed); backward updates the rows it
    looked up with the TBE's optimizer. Same interface as the other embedding modules."""

    def __init__(self, weights: list[torch.Tensor], optimizer: str, learning_rate: float,
                 eps: float = ADAGRAD_EPS, where: Placement = placement(CPU)):
        super().__init__()
        training, _, common, configs, _ = _fbgemm()
        optimizers = {"sgd": configs.EmbOptimType.EXACT_SGD,
                      "rowwise_adagrad": configs.EmbOptimType.EXACT_ROWWISE_ADAGRAD}
        specs = [(weight.shape[0], weight.shape[1], *where.enums(common)) for weight in weights]
        self.optimizer = optimizer
        self.tbe = training.SplitTableBatchedEmbeddingBagsCodegen(
            specs, optimizer=optimizers[optimizer], learning_rate=learning_rate, eps=eps,
            pooling_mode=common.PoolingMode.SUM, device=where.device,
            weights_precision=configs.SparseType.FP32, output_dtype=configs.SparseType.FP32)
        with torch.no_grad():
            for target, weight in zip(self.tbe.split_embedding_weights(), weights, strict=True):
                target.copy_(weight)  # onto the device where placed there
        self.num_tables, self.dim = len(weights), weights[0].shape[1]

    def forward(self, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        """Per-table inputs -> [B, T, D]; under autograd, backward updates the rows."""
        pooled = self.tbe(*tbe_inputs(indices, offsets))  # [B, T * D]
        return pooled.view(pooled.shape[0], self.num_tables, self.dim)

    def table_weights(self) -> list[torch.Tensor]:
        """Each table's weights as the TBE holds them (views: split_embedding_weights)."""
        return [weight.detach() for weight in self.tbe.split_embedding_weights()]

    def row_states(self) -> list[torch.Tensor]:
        """Each table's row-wise Adagrad state (momentum1, one value a row)."""
        return [states[0].detach() for states in self.tbe.split_optimizer_states()]


def tbe_model(initial: DLRM, optimizer: str, learning_rate: float, eps: float = ADAGRAD_EPS,
              where: Placement = placement(CPU)) -> DLRM:
    """A copy of an fp32 DLRM whose embeddings are one TBE holding the same weights, all of it
    on the placement's device."""
    bottom, interaction, top = (copy.deepcopy(module).to(where.device) for module
                                in (initial.bottom, initial.interaction, initial.top))
    return DLRM(initial.workload, bottom=bottom, interaction=interaction, top=top,
                embeddings=TBEEmbeddings(initial.embeddings.table_weights(), optimizer,
                                         learning_rate, eps, where))


def dense_parameters(model: DLRM) -> list[nn.Parameter]:
    """What torch.optim.SGD trains: the MLPs and interaction (the TBE updates its own rows)."""
    return [parameter for name, parameter in model.named_parameters()
            if not name.startswith("embeddings.")]


# ---------------------------------------------------------------- float64 reference

def rowwise_adagrad64(rows64: torch.Tensor, grad64: torch.Tensor, state64: torch.Tensor,
                      learning_rate: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FBGEMM's EXACT_ROWWISE_ADAGRAD in float64, by its definition: per row (grad summed over
    the row's lookups), state += mean_d(grad^2); row -= lr * grad / (sqrt(state) + eps)."""
    state = state64 + grad64.pow(2).mean(dim=1)
    return rows64 - learning_rate * grad64 / (state.sqrt() + eps).unsqueeze(1), state


@dataclasses.dataclass(frozen=True)
class RowGradients:
    """One table's float64 Adagrad inputs: its looked-up rows, their summed gradients and
    states before the step, and where they came from (each bag's upstream gradient
    [bags, dim], each lookup's bag and distinct row)."""

    rows: torch.Tensor
    grad: torch.Tensor
    state: torch.Tensor
    upstream: torch.Tensor
    owners: torch.Tensor
    positions: torch.Tensor
    # d logit_b / d pooled_b of each bag [bags, dim], the logits and labels [bags]: for the
    # share of the loss gradient's own error (adagrad_step_bound).
    jacobian: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


def reference_tbe_step(model: DLRM, batch, labels: torch.Tensor, optimizer: str,
                       learning_rate: float, eps: float = ADAGRAD_EPS,
                       states: list[torch.Tensor] | None = None,
                       gradients: bool = False) -> tuple:
    """Float64 step of a DLRM read from its parameters (never run): logits, BCE, autograd of
    the float64 formulation; SGD on the MLPs, the TBE's optimizer on the looked-up rows.
    Returns what _tbe_after_step returns: (logits, first bottom weight, last top weight,
    pooled rows after the step, the looked-up rows after the step[, their Adagrad states]);
    with gradients, (that, one RowGradients a table) for the Adagrad bound."""
    dense, indices, offsets = batch_tensors(batch, CPU)
    bottom = [(weight.requires_grad_(), bias.requires_grad_())
              for weight, bias in linear_parameters64(model.bottom)]
    top = [(weight.requires_grad_(), bias.requires_grad_())
           for weight, bias in linear_parameters64(model.top)]
    lookups = [torch.unique(table_indices.long(), return_inverse=True)
               for table_indices in indices]
    leaves = [as64(weight[rows.to(weight.device)]).requires_grad_()
              for weight, (rows, _) in zip(model.embeddings.table_weights(), lookups)]

    def pooled(tables):
        return torch.stack([pool_rows64(rows64, positions, table_offsets) for rows64,
                            (_, positions), table_offsets in zip(tables, lookups, offsets)], dim=1)

    pooled_leaves = pooled(leaves)
    pooled_leaves.retain_grad()  # each lookup's gradient: its bag's, for the Adagrad bound
    logits = logits64(model, bottom, top, dense, pooled_leaves)
    # Each logit depends on its own bag only, so the gradient of their sum is per bag.
    jacobian = torch.autograd.grad(logits.sum(), pooled_leaves, retain_graph=True)[0]
    binary_cross_entropy64(logits, labels).backward()
    updated, updated_states, row_gradients = [], [], []
    for position, leaf in enumerate(leaves):
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        if optimizer == "sgd":
            updated.append((leaf - learning_rate * grad).detach())
            continue
        state = as64(states[position][lookups[position][0].to(states[position].device)])
        rows, new_state = rowwise_adagrad64(leaf.detach(), grad, state, learning_rate, eps)
        updated.append(rows)
        updated_states.append(new_state)
        positions = lookups[position][1]
        row_gradients.append(RowGradients(
            rows=leaf.detach(), grad=grad, state=state, upstream=pooled_leaves.grad[:, position],
            owners=bag_of_lookups(offsets[position], positions.numel()), positions=positions,
            jacobian=jacobian[:, position], logits=logits.detach(), labels=as64(labels)))
    with torch.no_grad():
        result = (logits.detach(), (bottom[0][0] - learning_rate * bottom[0][0].grad).detach(),
                  (top[-1][0] - learning_rate * top[-1][0].grad).detach(), pooled(updated),
                  torch.cat(updated))
    result += (torch.cat(updated_states),) if optimizer != "sgd" else ()
    return (result, row_gradients) if gradients else result


def adagrad_step_bound(row_gradients: list[RowGradients], precision: str,
                       learning_rate: float, eps: float) -> tuple[torch.Tensor, ...]:
    """Bounds on the Adagrad step's pooled rows, looked-up rows and states (the check's last
    three parts)."""
    # Each bag's upstream gradient carries the whole model's error (forward and backward at
    # the precision) as a whole-model output does: relative to its sample's RMS over all
    # tables plus the batch's, so a near-cancelling bag gradient gets the batch's scale.
    upstream = torch.stack([table.upstream for table in row_gradients], dim=1)
    bag_error = whole_model_bound(upstream, precision)
    # The BCE's logit gradient sigmoid(z) - y is small where the student agrees with its
    # teacher's soft label, so the logit's own forward error (the logits' bound) and the
    # rounding of the difference move it by far more than its size: that error reaches every
    # bag through d logit / d pooled, whatever the bag's gradient magnitude.
    # (The difference is taken in fp32 at every precision: the loss runs on fp32 logits.)
    first = row_gradients[0]
    probability = torch.sigmoid(first.logits)
    logit_error = whole_model_bound(first.logits, precision).reshape(-1)
    gradient_error = (probability * (1 - probability) * logit_error + ACCUMULATION_ROUNDOFF
                      * (probability + first.labels.abs())) / first.logits.shape[0]
    bag_error = bag_error + torch.stack([table.jacobian.abs() for table in row_gradients],
                                        dim=1) * gradient_error.reshape(-1, 1, 1)
    pooled, rows, states = [], [], []
    for position, table in enumerate(row_gradients):
        error = summed_gradient_error(bag_error[:, position], table.upstream, table.owners,
                                      table.positions, table.rows.shape[0])
        row_bound, state_bound = rowwise_adagrad_bound(table.rows, table.grad, table.state,
                                                       error, learning_rate, eps)
        # The pooled rows after the step: each lookup's row error, plus fp32 accumulation.
        after = rowwise_adagrad64(table.rows, table.grad, table.state, learning_rate, eps)[0]
        bags = torch.zeros_like(table.upstream)
        lengths = torch.bincount(table.owners, minlength=bags.shape[0]).unsqueeze(1)
        pooled.append(bags.index_add(0, table.owners, row_bound[table.positions])
                      + (lengths + 2) * ACCUMULATION_ROUNDOFF
                      * bags.index_add(0, table.owners, after[table.positions].abs()))
        rows.append(row_bound)
        states.append(state_bound)
    return torch.stack(pooled, dim=1), torch.cat(rows), torch.cat(states)


def _tbe_after_step(model: DLRM, indices, offsets) -> tuple:
    """What the step must update: after_step's parts, then the looked-up rows read back from
    the TBE (split_embedding_weights) and, for Adagrad, their states."""
    embeddings = model.embeddings
    rows = [torch.unique(table_indices.long()) for table_indices in indices]
    looked_up = torch.cat([weight[table_rows] for weight, table_rows
                           in zip(embeddings.table_weights(), rows)]).clone()
    parts = after_step(model, indices, offsets) + (looked_up,)
    if embeddings.optimizer == "sgd":
        return parts
    return parts + (torch.cat([state[table_rows] for state, table_rows
                               in zip(embeddings.row_states(), rows)]).clone(),)


def build_tbe_train(context: BuildContext, optimizer: str, learning_rate: float,
                    eps: float = ADAGRAD_EPS, reference_learning_rate: float | None = None,
                    reference_eps: float | None = None) -> Prepared:
    """One training step of a student DLRM on teacher labels, its embeddings in one TBE.
    reference_* default to the impl's own settings (tests plant a mismatch with them)."""
    where = _check_shapes(context)
    workload, precision, device = context.workload, context.precision, where.device
    reference_learning_rate = (learning_rate if reference_learning_rate is None
                               else reference_learning_rate)
    reference_eps = eps if reference_eps is None else reference_eps
    autocast_dtype = None if precision == "fp32" else {"fp16": torch.float16,
                                                       "bf16": torch.bfloat16}[precision]
    rotation = model_rotation_plan(workload, "fp32")
    rotating = rotating_labelled_batches(workload, context.seed, rotation["rotation_batches"],
                                         device)
    # The same student as per_table's: seed + 1, per-table weights, then into one TBE.
    initial = build_dlrm(workload, context.seed + 1, embeddings="per_table", sparse=True,
                         learning_rate=learning_rate)
    student = tbe_model(initial, optimizer, learning_rate, eps, where)
    sgd = torch.optim.SGD(dense_parameters(student), lr=learning_rate)
    inputs = [(*batch_tensors(item.batch, device), torch.from_numpy(item.labels).to(device))
              for item in rotating]
    dense, indices, offsets, labels = inputs[0]
    traffic = embedding_traffic(initial, "fp32", [item[:3] for item in inputs])
    bytes_parts = training_bytes(initial, traffic)
    start = tbe_model(initial, optimizer, learning_rate, eps, where)
    if optimizer == "rowwise_adagrad":
        # The row-wise state: read and written once per distinct row.
        bytes_parts["row_state_updates"] = 2.0 * traffic["unique_rows"] * 4
        warm_up = (rotating[ADAGRAD_WARM_UP_BATCH] if len(rotating) > ADAGRAD_WARM_UP_BATCH
                   else rotating_labelled_batches(workload, context.seed,
                                                  ADAGRAD_WARM_UP_BATCH + 1, device)[-1])
        dense_w, indices_w, offsets_w = batch_tensors(warm_up.batch, device)
        train_step(start, torch.optim.SGD(dense_parameters(start), lr=learning_rate),
                   dense_w, indices_w, offsets_w, torch.from_numpy(warm_up.labels).to(device),
                   autocast_dtype)

    def check():
        model = copy.deepcopy(start)
        logits = train_step(model, torch.optim.SGD(dense_parameters(model), lr=learning_rate),
                            dense, indices, offsets, labels, autocast_dtype)
        return (logits.detach(),) + _tbe_after_step(model, indices, offsets)

    gradients = {}

    def reference():
        if optimizer == "sgd":
            return reference_tbe_step(start, rotating[0].batch, labels, optimizer,
                                      reference_learning_rate, reference_eps)
        result, gradients["tables"] = reference_tbe_step(
            start, rotating[0].batch, labels, optimizer, reference_learning_rate,
            reference_eps, start.embeddings.row_states(), gradients=True)
        return result

    def error_bound(expected):
        bounds = whole_model_bound(expected, precision)
        if optimizer == "sgd":
            return bounds
        if "tables" not in gradients:
            reference()
        # The pooled and looked-up rows after the step and their states: from the gradient's
        # own error (Adagrad normalises it), not relative to the rows.
        return bounds[:3] + adagrad_step_bound(gradients["tables"], precision,
                                               reference_learning_rate, reference_eps)

    calls = [functools.partial(train_step, student, sgd, *item, autocast_dtype=autocast_dtype)
             for item in inputs]
    return Prepared(
        run=cycling(calls), check=check, reference=reference, samples=workload.batch_size,
        error_bound=error_bound,
        tolerance=ADAGRAD_TOLERANCE if optimizer != "sgd" else None,
        flops=3.0 * model_flops(workload, traffic),
        bytes_moved=sum(bytes_parts.values()),
        params={"layout": "fbgemm_tbe", "optimizer": f"SGD (MLPs), TBE {optimizer} (tables)",
                "lr": learning_rate, **({"eps": eps} if optimizer != "sgd" else {}),
                "autocast": precision if autocast_dtype is not None else "none",
                "rotation_batches": len(inputs)},
        metrics={"bytes_parts": bytes_parts, **rotation_metrics(rotation),
                 "model_bytes": model_bytes(initial)},
    )


# On cuda without fp16, as per_table (bench/ops/dlrm.py build_train: loss scaling).
@impl("dlrm_train", "fbgemm_tbe", TRAIN_PRECISIONS, device_precisions=CUDA_TRAIN,
      available=FBGEMM_ON, requires=FBGEMM_PEER, pairs=dense_only,
      gpu_memory_factors=HOST_BUILT_TRAINING,
      description="all tables in one FBGEMM training TBE (CPU, or cuda with FBGEMM's CUDA "
                  "build), EXACT_SGD fused into its backward; MLPs as per_table's")
def build_train_fbgemm_tbe(context: BuildContext) -> Prepared:
    """Training step with the embeddings in one FBGEMM TBE (exact SGD)."""
    return build_tbe_train(context, "sgd", LEARNING_RATE)


@impl("dlrm_train", "fbgemm_tbe_adagrad", ADAGRAD_PRECISIONS, available=FBGEMM_ON,
      requires=FBGEMM_PEER, pairs=dense_only, gpu_memory_factors=HOST_BUILT_TRAINING,
      description="all tables in one FBGEMM training TBE (CPU, or cuda with FBGEMM's CUDA "
                  "build), EXACT_ROWWISE_ADAGRAD fused into its backward; MLPs by SGD")
def build_train_fbgemm_tbe_adagrad(context: BuildContext) -> Prepared:
    """Training step with the embeddings in one FBGEMM TBE (row-wise Adagrad)."""
    return build_tbe_train(context, "rowwise_adagrad", ADAGRAD_LEARNING_RATE)


# ---------------------------------------------------------------- inference

def _quantized(quantize, weight: torch.Tensor, kind):
    """FBGEMM's own row-wise quantization (its torch.tensor copy warning silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        return quantize.quantize_embs(weight, kind)


class TBEInferenceEmbeddings(nn.Module):
    """All tables in one inference TBE (IntNBitTableBatchedEmbeddingBagsCodegen) at fp16,
    int8 or int4 (row-wise, fp16 scale and bias), pooled to fp32, where placed."""

    def __init__(self, weights: list[torch.Tensor], precision: str,
                 where: Placement = placement(CPU)):
        super().__init__()
        _, inference, common, configs, quantize = _fbgemm()
        kind = {"fp16": configs.SparseType.FP16, "int8": configs.SparseType.INT8,
                "int4": configs.SparseType.INT4}[precision]
        specs = [("", weight.shape[0], weight.shape[1], kind, where.enums(common)[0])
                 for weight in weights]
        self.tbe = inference.IntNBitTableBatchedEmbeddingBagsCodegen(
            specs, pooling_mode=common.PoolingMode.SUM, device=where.device,
            output_dtype=configs.SparseType.FP32, indices_dtype=torch.int64,
            weight_lists=[_quantized(quantize, weight, kind) for weight in weights])
        # What the kernel reads per looked-up row (scale and bias included, no padding).
        self.row_bytes = inference.unpadded_row_size_in_bytes(weights[0].shape[1], kind)
        self.num_tables, self.dim = len(weights), weights[0].shape[1]

    def forward(self, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        """Per-table inputs -> [B, T, D] (fp32)."""
        pooled = self.tbe(*tbe_inputs(indices, offsets))
        return pooled.view(pooled.shape[0], self.num_tables, self.dim)

    def stored_bytes(self) -> int:
        """Bytes of the packed tables."""
        return sum(weight.numel() * weight.element_size()
                   for weight, _ in self.tbe.split_embedding_weights())


def build_tbe_infer(context: BuildContext) -> Prepared:
    """Inference of the calibrated teacher with its tables in an inference TBE, fp32 MLPs."""
    where = _check_shapes(context)
    workload, precision, device = context.workload, context.precision, where.device
    fp32_model = teacher_model(workload, context.seed, embeddings="per_table")
    model = DLRM(workload, bottom=copy.deepcopy(fp32_model.bottom).to(device),
                 embeddings=TBEInferenceEmbeddings(fp32_model.embeddings.table_weights(),
                                                   precision, where),
                 interaction=copy.deepcopy(fp32_model.interaction).to(device),
                 top=copy.deepcopy(fp32_model.top).to(device)).eval()
    rotation = model_rotation_plan(workload, precision)
    batches = rotating_batches(workload, context.seed, rotation["rotation_batches"])
    inputs = [batch_tensors(item, device) for item in batches]
    traffic = embedding_traffic(fp32_model, "fp32", inputs)
    traffic["row_bytes"] = traffic["lookups"] * model.embeddings.row_bytes
    bytes_parts = inference_bytes(fp32_model, "fp32", traffic)

    def infer(dense, indices, offsets):
        with torch.inference_mode():
            return model(dense, indices, offsets)

    calls = [functools.partial(infer, *item) for item in inputs]
    _, indices, offsets = inputs[0]
    weights = fp32_model.embeddings.table_weights()

    # The logits alone are a weak check of the tables: whole-model bounds at int8/int4 let a
    # model whose lookups all hit row 0 pass. With fp32 MLPs the pooled rows are checked too,
    # each against its own lookup bound at the table precision.
    def check():
        with torch.inference_mode():
            return calls[0](), model.embeddings(indices, offsets)

    def reference():
        return (reference_logits(fp32_model, *batch_tensors(batches[0], CPU)),
                torch.stack([table_lookup64(weight, table_indices, table_offsets)
                             for weight, table_indices, table_offsets
                             in zip(weights, indices, offsets)], dim=1))

    def error_bound(expected):
        return (whole_model_bound(expected[0], precision),
                torch.stack([lookup_bound(weight, table_indices, table_offsets, "sum", None,
                                          precision) for weight, table_indices, table_offsets
                             in zip(weights, indices, offsets)], dim=1))

    return Prepared(
        run=cycling(calls), check=check, reference=reference, samples=workload.batch_size,
        forward=infer,
        flops=model_flops(workload, traffic),
        bytes_moved=sum(bytes_parts.values()),
        params={"layout": "fbgemm_tbe", "mlp": "fp32",
                "tables": f"{precision} TBE" + (" row-wise" if precision != "fp16" else ""),
                "rotation_batches": len(inputs)},
        metrics={"model_bytes": model_bytes(fp32_model) - sum(
                     weight.numel() * weight.element_size()
                     for weight in fp32_model.embeddings.table_weights())
                 + model.embeddings.stored_bytes(),
                 "bytes_parts": bytes_parts, **rotation_metrics(rotation)},
        tolerance=WHOLE_MODEL_TOLERANCE.get(precision),
        error_bound=error_bound,
        accuracy=functools.partial(inference_accuracy, model, fp32_model, context.seed,
                                   "fp32", device),
    )


@impl("dlrm_infer", "fbgemm_tbe", INFER_PRECISIONS, available=FBGEMM_ON, requires=FBGEMM_PEER,
      gpu_memory_factors=HOST_BUILT_INFERENCE,
      pairs=dense_only,
      description="all tables in one FBGEMM inference TBE (fp16 / int8 / int4 rows; CPU, or "
                  "cuda with FBGEMM's CUDA build), fp32 MLPs")
def build_infer_fbgemm_tbe(context: BuildContext) -> Prepared:
    """Inference with the tables in one FBGEMM inference TBE."""
    return build_tbe_infer(context)
