"""Whole-model ops: DLRM inference (`dlrm_infer`) and one training step (`dlrm_train`)."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from torch import nn

from bench import quality
from bench.compare_outputs import whole_model_bound
from bench.model import (DLRM, batch_tensors, build_dlrm, flatten_tables, flops_per_sample,
                         parameter_bytes, row_starts_of)
from bench.ops.common import (BYTES_PER_VALUE, FLOAT_DTYPES, ROW_OVERHEAD_BYTES, PooledTable)
from bench.ops.fc import at_precision, input_dtype
from bench.registry import BuildContext, Op, Prepared, Unsupported, impl, register_op
from bench.teacher import calibrate, evaluation_set, label_batches, teacher_model
from workloads.generators import make_batch

# Quantized whole-model inference compounds int8 activation rounding over every layer; these
# bounds on the logits' relative error still catch a broken kernel (which gives about 1).
WHOLE_MODEL_TOLERANCE = {"int8": 0.15, "int4": 0.3}
EVAL_BATCHES = 8  # 8 x 2048 = 16384 teacher-labelled samples per accuracy measurement
LEARNING_RATE = 0.1  # the DLRM Kaggle config's SGD rate
TRAIN_BATCH_INDEX = 0

TT_WARM_UP_BATCHES = 4  # batches whose row counts populate the TT-Rec LFU caches


def _model_variants(workload, options) -> list[dict]:
    """Dense tables, or with --tt-tables K one variant per TT rank."""
    tt_tables = options.get("tt_tables") or 0
    if not tt_tables:
        return [{}]
    return [{"tt_tables": tt_tables, "tt_rank": rank} for rank in options.get("tt_ranks") or [16]]


register_op(Op("dlrm_infer", "whole-model inference: logits for one batch", _model_variants))
register_op(Op("dlrm_train", "one training step: forward, BCE loss, backward and SGD update",
               _model_variants))


class QuantizedEmbeddings(nn.Module):
    """Row-wise int8/int4 tables behind the same interface as the float embedding modules."""

    def __init__(self, weights: list[torch.Tensor], precision: str, layout: str):
        super().__init__()
        self.layout = layout
        cpu = torch.device("cpu")
        if layout == "per_table":
            self.tables = [PooledTable(weight, precision, cpu) for weight in weights]
        else:
            self.tables = [PooledTable(torch.cat(weights), precision, cpu)]
            self.row_starts = row_starts_of(weights)
        self.num_tables = len(weights)

    def forward(self, indices, offsets) -> torch.Tensor:
        """Per-table inputs -> [B, T, D] (fp32)."""
        if self.layout == "per_table":
            return torch.stack([table(table_indices, table_offsets) for table, table_indices,
                                table_offsets in zip(self.tables, indices, offsets)], dim=1)
        pooled = self.tables[0](*flatten_tables(indices, offsets, self.row_starts))
        return pooled.view(self.num_tables, -1, pooled.shape[-1]).transpose(0, 1)


def model_at_precision(model: DLRM, precision: str, layout: str, device: torch.device) -> DLRM:
    """An inference copy of an fp32 DLRM: float casts, or int8 MLPs with int8/int4 tables."""
    if precision in FLOAT_DTYPES:
        return copy.deepcopy(model).to(device=device, dtype=FLOAT_DTYPES[precision])
    if device.type != "cpu":
        raise Unsupported(f"{precision} DLRM inference uses CPU-only quantized kernels")
    return DLRM(model.workload,
                bottom=at_precision(model.bottom, "int8", device),
                embeddings=QuantizedEmbeddings(model.embeddings.table_weights(), precision,
                                               layout),
                interaction=copy.deepcopy(model.interaction),
                top=at_precision(model.top, "int8", device))


def reference_logits(model: DLRM, dense, indices, offsets) -> torch.Tensor:
    """Float64 logits of an fp32 DLRM, widening only the embedding rows the batch uses."""
    pooled = model.embeddings.reference_pooled(indices, offsets)
    bottom64 = copy.deepcopy(model.bottom).to("cpu", torch.float64)
    top64 = copy.deepcopy(model.top).to("cpu", torch.float64)
    interaction64 = copy.deepcopy(model.interaction).to("cpu", torch.float64)
    with torch.no_grad():
        bottom = bottom64(dense.cpu().double())
        return top64(interaction64(bottom, pooled)).squeeze(1)


def _tt_settings(context: BuildContext) -> dict:
    """build_dlrm arguments for the variant's TT tables (none for dense variants)."""
    if not context.variant.get("tt_tables"):
        return {}
    if context.precision not in ("fp32", "fp16", "bf16"):
        raise Unsupported(f"TT-Rec tables have no {context.precision} form here")
    return {"tt_tables": context.variant["tt_tables"], "tt_rank": context.variant["tt_rank"]}


def warm_up_tt(model: DLRM, workload, seed: int) -> None:
    """Count row frequencies on a few batches and populate the TT-Rec caches (no-op if dense)."""
    if not hasattr(model.embeddings, "populate"):
        return
    for batch_index in range(1, TT_WARM_UP_BATCHES + 1):
        batch = make_batch(workload, seed, batch_index)
        model.embeddings.warm_up([torch.from_numpy(table.indices) for table in batch.tables])
    model.embeddings.populate()


def _tt_metrics_after_lookup(model: DLRM, indices, offsets) -> dict:
    """TT-Rec figures with the cache hit rate of one lookup of the timed batch (on a copy,
    so the timed model's counters and caches are untouched)."""
    if not hasattr(model.embeddings, "memory"):
        return {}
    probe = copy.deepcopy(model.embeddings).cpu()
    for module in probe.tt:
        module.reset_cache_stats()
    with torch.no_grad():
        probe([table.cpu() for table in indices], [table.cpu() for table in offsets])
    return {**_tt_metrics(model), "tt_hit_rate": probe.hit_rate()}


def _tt_metrics(model: DLRM) -> dict:
    """TT-Rec memory and cache figures of a model (empty for dense tables)."""
    embeddings = model.embeddings
    if not hasattr(embeddings, "memory"):
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


def _precision_params(precision: str) -> dict:
    if precision in ("int8", "int4"):
        return {"mlp": "int8 dynamic", "tables": f"{precision} row-wise"}
    return {"mlp": precision, "tables": precision}


def _predict(model: nn.Module, labelled, precision: str, device: torch.device) -> np.ndarray:
    """Predicted CTRs over labelled batches."""
    outputs = []
    with torch.inference_mode():
        for item in labelled:
            dense, indices, offsets = batch_tensors(item.batch, device)
            logits = model(dense.to(input_dtype(precision)), indices, offsets)
            outputs.append(torch.sigmoid(logits.double()).cpu().numpy())
    return np.concatenate(outputs)


def build_infer(context: BuildContext, layout: str) -> Prepared:
    """Inference of the calibrated teacher DLRM at a precision, plus its accuracy effects."""
    workload, device, precision = context.workload, context.device, context.precision
    tt = _tt_settings(context)
    if tt:
        # A TT model is a different function from the dense teacher: calibrate it alone.
        fp32_model = build_dlrm(workload, context.seed, embeddings=layout, sparse=False, **tt)
        warm_up_tt(fp32_model, workload, context.seed)
        fp32_model = calibrate(fp32_model, workload, context.seed)
    else:
        fp32_model = teacher_model(workload, context.seed, embeddings=layout)
    model = model_at_precision(fp32_model, precision, layout, device).eval()
    batch = label_batches(fp32_model, workload, context.seed, [TRAIN_BATCH_INDEX],
                          workload.batch_size)[0].batch
    dense, indices, offsets = batch_tensors(batch, device)
    dense = dense.to(input_dtype(precision))

    def run():
        with torch.inference_mode():
            return model(dense, indices, offsets)

    def accuracy() -> dict:
        labelled = evaluation_set(workload, context.seed, EVAL_BATCHES)
        labels = np.concatenate([item.labels for item in labelled])
        predicted = _predict(model, labelled, precision, device)
        fp32_predicted = _predict(fp32_model.to(device), labelled, "fp32", device)
        return {"auc": quality.auc(labels, predicted),
                "logloss": quality.logloss(labels, predicted),
                "ctr_abs_diff": float(np.mean(np.abs(predicted - fp32_predicted))),
                "metrics": {"fp32_auc": quality.auc(labels, fp32_predicted),
                            "eval_samples": int(len(labels))}}

    batch_size = workload.batch_size
    return Prepared(
        run=run,
        reference=lambda: reference_logits(fp32_model, *batch_tensors(batch, torch.device("cpu"))),
        samples=batch_size,
        flops=batch_size * flops_per_sample(workload),
        bytes_moved=_inference_bytes(workload, model, precision),
        params={"layout": layout, **_precision_params(precision), **tt},
        metrics={"model_bytes": _model_bytes(model),
                 **_tt_metrics_after_lookup(model, indices, offsets)},
        tolerance=WHOLE_MODEL_TOLERANCE.get(precision),
        error_bound=lambda expected: whole_model_bound(expected, precision),
        # A TT model is not the teacher, so its accuracy is measured after training
        # (the TT-Rec study), not here.
        accuracy=None if tt else accuracy,
    )


def _model_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights, including packed quantized tables."""
    total = parameter_bytes(model)
    for module in model.modules():
        for table in getattr(module, "tables", ()):
            total += table.weight.numel() * table.weight.element_size()
    return total


def _inference_bytes(workload, model: nn.Module, precision: str) -> float:
    """Compulsory traffic per batch: MLP weights once, looked-up rows, and inputs."""
    lookups = workload.batch_size * sum(table.pooling.mean for table in workload.tables)
    row_bytes = workload.dim * BYTES_PER_VALUE[precision] + ROW_OVERHEAD_BYTES.get(precision, 0)
    mlp_parameters = sum(parameter.numel() for name, parameter in model.named_parameters()
                         if not name.startswith("embeddings"))
    mlp_bytes = mlp_parameters * (BYTES_PER_VALUE[precision] if precision in FLOAT_DTYPES else 1)
    inputs = workload.batch_size * workload.num_dense * 4 + lookups * 8
    return float(mlp_bytes + lookups * row_bytes + inputs)


@impl("dlrm_infer", "per_table", ("fp32", "fp16", "bf16", "int8", "int4"), baseline=True,
      description="the DLRM reference's structure: one EmbeddingBag per table in a loop")
def build_infer_per_table(context: BuildContext) -> Prepared:
    """Inference with per-table embedding lookups."""
    return build_infer(context, "per_table")


@impl("dlrm_infer", "batched", ("fp32", "fp16", "bf16", "int8", "int4"),
      description="all tables in one EmbeddingBag, one lookup call per batch")
def build_infer_batched(context: BuildContext) -> Prepared:
    """Inference with one batched embedding lookup."""
    return build_infer(context, "batched")


def _autocast(dtype, device: torch.device):
    """Mixed precision for training: autocast the matmuls, keep fp32 master weights."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(model: DLRM, optimizer, dense, indices, offsets, labels, autocast_dtype=None):
    """Forward, BCE loss, backward and optimizer step; returns the step's logits."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(autocast_dtype, dense.device):
        logits = model(dense, indices, offsets)
    loss = nn.functional.binary_cross_entropy_with_logits(logits.to(labels.dtype), labels)
    loss.backward()
    optimizer.step()
    return logits


def _after_step(model: DLRM, indices, offsets) -> tuple:
    """What a step must update correctly: first bottom and last top layer weights, and the
    pooled embeddings of the batch's rows."""
    with torch.no_grad():
        pooled = model.embeddings(indices, offsets).detach().clone()
    return (model.bottom[0].weight.detach().clone(), model.top[-1].weight.detach().clone(),
            pooled)


def build_train(context: BuildContext, layout: str) -> Prepared:
    """One SGD step of a student DLRM on teacher labels."""
    workload, device, precision = context.workload, context.device, context.precision
    if precision not in ("fp32", "fp16", "bf16"):
        raise Unsupported(f"training at {precision} needs quantization-aware training, "
                          "which this op does not model; use fp32, bf16 or fp16 (autocast)")
    autocast_dtype = None if precision == "fp32" else FLOAT_DTYPES[precision]
    teacher = teacher_model(workload, context.seed)
    labelled = label_batches(teacher, workload, context.seed, [TRAIN_BATCH_INDEX],
                             workload.batch_size)[0]
    tt = _tt_settings(context)
    if tt and layout == "fused_sgd":
        raise Unsupported("fused_sgd has no TT-Rec tables; use per_table or batched with TT")
    initial = build_dlrm(workload, context.seed + 1, embeddings=layout, sparse=True,
                         learning_rate=LEARNING_RATE, **tt)
    warm_up_tt(initial, workload, context.seed)
    student = copy.deepcopy(initial).to(device)
    dense, indices, offsets = batch_tensors(labelled.batch, device)
    labels = torch.from_numpy(labelled.labels).to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=LEARNING_RATE)

    def check():
        model = copy.deepcopy(initial).to(device)
        logits = train_step(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
                            dense, indices, offsets, labels, autocast_dtype)
        return (logits.detach(),) + _after_step(model, indices, offsets)

    def reference():
        model = copy.deepcopy(initial).double()
        dense64, indices64, offsets64 = batch_tensors(labelled.batch, torch.device("cpu"))
        logits = train_step(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
                            dense64.double(), indices64, offsets64, labels.cpu().double())
        return (logits.detach(),) + _after_step(model, indices64, offsets64)

    batch_size = workload.batch_size
    return Prepared(
        run=lambda: train_step(student, optimizer, dense, indices, offsets, labels,
                               autocast_dtype),
        check=check, reference=reference, samples=batch_size,
        error_bound=lambda expected: whole_model_bound(expected, precision),
        # Backward costs about twice the forward's FLOPs (two GEMMs per forward GEMM).
        flops=3.0 * batch_size * flops_per_sample(workload),
        bytes_moved=3.0 * _inference_bytes(workload, student, "fp32"),
        params={"layout": layout, "optimizer": "SGD", "lr": LEARNING_RATE,
                "autocast": precision if autocast_dtype is not None else "none", **tt},
        metrics=_tt_metrics_after_lookup(initial, indices, offsets),
    )


@impl("dlrm_train", "per_table", ("fp32", "fp16", "bf16", "int8", "int4"), baseline=True,
      description="the DLRM reference's structure: per-table sparse EmbeddingBags + SGD")
def build_train_per_table(context: BuildContext) -> Prepared:
    """Training step with per-table embeddings."""
    return build_train(context, "per_table")


@impl("dlrm_train", "batched", ("fp32", "fp16", "bf16", "int8", "int4"),
      description="one concatenated sparse EmbeddingBag + SGD")
def build_train_batched(context: BuildContext) -> Prepared:
    """Training step with one batched embedding."""
    return build_train(context, "batched")


@impl("dlrm_train", "fused_sgd", ("fp32", "fp16", "bf16", "int8", "int4"),
      description="one concatenated table whose SGD update is fused into backward "
                  "(index_add_ of per-lookup gradients; no sparse gradient tensor)")
def build_train_fused(context: BuildContext) -> Prepared:
    """Training step with the embedding update fused into backward."""
    return build_train(context, "fused_sgd")
