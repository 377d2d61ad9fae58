"""The DLRM on our Triton table-batched embedding bag (bench/models/triton_tbe.py): `dlrm_infer`
with every table in one Triton TBE (fp32 / fp16 / bf16, row-wise int8 / int4), and `dlrm_train`
with the exact SGD step fused into its backward. MLPs and interaction are per_table's."""

from __future__ import annotations

import copy
from types import ModuleType
from typing import Optional

import torch
from torch import nn

from bench.models.dlrm import DLRM, batch_tensors, tbe_inputs
from bench.ops.common import FLOAT_DTYPES, float_dtype, lookup_bound
from bench.ops.dlrm import (COPIED_INFERENCE, CUDA_TRAIN, LEARNING_RATE, TRAIN_PRECISIONS,
                            after_step, build_infer, build_train, dense_only, train_step)
from bench.ops.dlrm_batches import checked_part, rotating_batches, rotating_labelled_batches
from bench.ops.dlrm_fbgemm import reference_tbe_step
from bench.ops.sls import ALL_PRECISIONS
from bench.ops.sls_triton import TRITON_INSTALL, runs_here, triton_tbe_module
from bench.references import table_lookup64
from bench.registry import BuildContext, Prepared, Unsupported, impl

CPU = torch.device("cpu")
POOLING = "sum"  # the DLRM's pooling (a module constant so a test can plant another)
NO_TT = ("triton_tbe has no TT-Rec tables; use per_table or batched with --tt-tables")


class TritonEmbeddings(nn.Module):
    """All tables in one Triton TBE, with the per-table interface of the other embedding
    modules; with a learning_rate, backward applies exact SGD to the looked-up rows (the rows
    are a buffer, so no optimizer steps them again)."""

    def __init__(self, triton_tbe: ModuleType, weights: list[torch.Tensor], precision: str,
                 device: torch.device, learning_rate: Optional[float] = None):
        super().__init__()
        try:
            self.tbe = triton_tbe.TritonTableBatchedEmbeddingBag(
                weights, precision, POOLING, device=device, learning_rate=learning_rate)
        except ValueError as error:  # shapes or formats the kernels do not take
            raise Unsupported(f"triton_tbe: {error}") from None
        self.num_tables, self.dim = len(weights), weights[0].shape[1]

    def forward(self, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        """Per-table inputs -> [B, T, D]; under autograd, backward updates the rows."""
        pooled = self.tbe(*tbe_inputs(indices, offsets))  # [B, T * D]
        return pooled.view(pooled.shape[0], self.num_tables, self.dim)

    def table_weights(self) -> list[torch.Tensor]:
        """Each table's stored rows (views into the TBE's buffer)."""
        return self.tbe.table_weights()

    def stored_bytes(self) -> int:
        """Bytes of the stored tables, row-wise scales and biases included."""
        buffers = [self.tbe.weights] + ([self.tbe.scale_bias]
                                        if self.tbe.scale_bias is not None else [])
        return sum(buffer.numel() * buffer.element_size() for buffer in buffers)


def triton_model(triton_tbe: ModuleType, fp32_model: DLRM, precision: str,
                 device: torch.device, learning_rate: Optional[float] = None) -> DLRM:
    """A copy of an fp32 DLRM with its tables in one Triton TBE at precision and its MLPs and
    interaction at that float precision (fp32 beside int8 / int4 tables: int8 MLPs are
    CPU-only kernels)."""
    dtype = FLOAT_DTYPES.get(precision, torch.float32)

    def part(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module).to(device=device, dtype=dtype)

    embeddings = TritonEmbeddings(triton_tbe, fp32_model.embeddings.table_weights(), precision,
                                  device, learning_rate)
    return DLRM(fp32_model.workload, bottom=part(fp32_model.bottom), embeddings=embeddings,
                interaction=part(fp32_model.interaction), top=part(fp32_model.top))


def _refuse_tt(context: BuildContext) -> ModuleType:
    """The Triton TBE module for the context's device (Unsupported where it cannot run)."""
    if context.variant.get("tt_tables"):
        raise Unsupported(NO_TT)
    return triton_tbe_module(context.device)


def _kernel_params(embeddings: TritonEmbeddings, precision: str) -> dict:
    quantized = "" if precision in FLOAT_DTYPES else " row-wise"
    return {"layout": "triton_tbe", "tables": f"{precision}{quantized} triton_tbe",
            "row_bytes": embeddings.tbe.bytes_per_row, "embedding_launches_per_call": 1,
            "triton_interpreter": embeddings.tbe.interpreted}


def build_triton_infer(context: BuildContext) -> Prepared:
    """build_infer with the teacher's tables in one Triton TBE; the check reads the pooled
    rows beside the logits, each against its own lookup bound at the table precision (the
    whole-model bound of the logits alone is loose at bf16, int8 and int4)."""
    triton_tbe = _refuse_tt(context)
    workload, precision, device = context.workload, context.precision, context.device
    models = {}

    def at_precision(fp32_model: DLRM, at: str, layout: str, on: torch.device) -> DLRM:
        models["fp32"] = fp32_model
        models["run"] = triton_model(triton_tbe, fp32_model, at, on)
        return models["run"]

    prepared = build_infer(context, "per_table", at_precision=at_precision)
    embeddings = models["run"].embeddings
    weights = models["fp32"].embeddings.table_weights()
    # The batch build_infer checks: the first of its rotation (a cached prefix, not rebuilt),
    # or its first samples where the whole would not fit the float64 check.
    batch = checked_part(rotating_batches(workload, context.seed, 1)[0], workload)
    _, indices, offsets = batch_tensors(batch, CPU)
    _, device_indices, device_offsets = batch_tensors(batch, device)
    logits_check, logits_reference, logits_bound = (prepared.check, prepared.reference,
                                                    prepared.error_bound)

    def check():
        with torch.inference_mode():
            return logits_check(), embeddings(device_indices, device_offsets)

    def reference():  # the DLRM's sum pooling, whatever POOLING the kernel was given
        return logits_reference(), torch.stack(
            [table_lookup64(weight, table_indices, table_offsets) for weight, table_indices,
             table_offsets in zip(weights, indices, offsets)], dim=1)

    def error_bound(expected):
        return logits_bound(expected[0]), torch.stack(
            [lookup_bound(weight, table_indices, table_offsets, "sum", None, precision)
             for weight, table_indices, table_offsets in zip(weights, indices, offsets)], dim=1)

    prepared.check, prepared.reference, prepared.error_bound = check, reference, error_bound
    prepared.params.update({**_kernel_params(embeddings, precision),
                            "mlp": precision if precision in FLOAT_DTYPES else "fp32"})
    # model_bytes counts parameters: the Triton tables are a buffer.
    prepared.metrics["model_bytes"] += embeddings.stored_bytes()
    return prepared


def looked_up_rows(embeddings: TritonEmbeddings, indices: list[torch.Tensor]) -> torch.Tensor:
    """Each table's distinct looked-up rows as stored, table after table (a copy)."""
    return torch.cat([weight[torch.unique(table_indices)] for weight, table_indices
                      in zip(embeddings.table_weights(), indices)]).clone()


def build_triton_train(context: BuildContext,
                       table_learning_rate: float = LEARNING_RATE) -> Prepared:
    """build_train with the student's tables in one fp32 Triton TBE whose backward steps the
    looked-up rows (at table_learning_rate: tests plant a wrong one); torch.optim.SGD steps
    the MLPs only, the tables being no parameters. Checked against dlrm_fbgemm's float64 SGD
    step, which reads the tables through table_weights(), looked-up rows included."""
    triton_tbe = _refuse_tt(context)
    workload, precision, device = context.workload, context.precision, context.device
    models = {}

    def to_triton(initial: DLRM) -> DLRM:
        # The model build_train times; the check below trains a copy of it, and the
        # reference reads it before any timed step.
        models["initial"] = triton_model(triton_tbe, initial, "fp32", device, table_learning_rate)
        return models["initial"]

    prepared = build_train(context, "per_table", prepare=to_triton)
    initial = models["initial"]
    # The batch build_train checks: the first of its rotation (cached, not relabelled), or
    # its first samples where the whole would not fit the float64 check.
    labelled = checked_part(rotating_labelled_batches(
        workload, context.seed, prepared.params["rotation_batches"], device)[0], workload)
    dense, indices, offsets = batch_tensors(labelled.batch, device)
    labels = torch.from_numpy(labelled.labels)
    autocast_dtype = None if precision == "fp32" else float_dtype(precision)

    def check():
        model = copy.deepcopy(initial).to(device)
        logits = train_step(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
                            dense, indices, offsets, labels.to(device), autocast_dtype)
        return ((logits.detach(),) + after_step(model, indices, offsets)
                + (looked_up_rows(model.embeddings, indices),))

    def reference():
        return reference_tbe_step(initial, labelled.batch, labels, "sgd", LEARNING_RATE)

    prepared.check, prepared.reference = check, reference
    prepared.params.update({**_kernel_params(initial.embeddings, "fp32"),
                            "optimizer": "SGD (MLPs), exact SGD fused into the Triton "
                                         "backward (tables)"})
    prepared.metrics["model_bytes"] += initial.embeddings.stored_bytes()
    return prepared


@impl("dlrm_infer", "triton_tbe", ALL_PRECISIONS, available=runs_here,
      gpu_memory_factors=COPIED_INFERENCE,
      requires={"triton": TRITON_INSTALL}, pairs=dense_only,
      description="every table in our Triton table-batched embedding bag (one launch; "
                  "row-wise int8/int4 tables beside fp32 MLPs), MLPs as per_table's")
def build_infer_triton(context: BuildContext) -> Prepared:
    """Inference with the tables in one Triton TBE."""
    return build_triton_infer(context)


@impl("dlrm_train", "triton_tbe", TRAIN_PRECISIONS, device_precisions=CUDA_TRAIN,
      available=runs_here, requires={"triton": TRITON_INSTALL}, pairs=dense_only,
      # On the device: per_table's student while its TBE is made, then the TBE and the
      # check's copy of it.
      gpu_memory_factors=(2.25, 0.05),
      description="every table in one fp32 Triton TBE, exact SGD fused into its backward; "
                  "MLPs by SGD as per_table's")
def build_train_triton(context: BuildContext) -> Prepared:
    """Training step with the tables in one Triton TBE (fused exact SGD)."""
    return build_triton_train(context)
