"""Whole-model ops: DLRM inference (`dlrm_infer`) and one training step (`dlrm_train`)."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from torch import nn

from bench import quality
from bench.model import (DLRM, batch_tensors, build_dlrm, flatten_tables, flops_per_sample,
                         parameter_bytes, row_starts_of)
from bench.ops.common import (BYTES_PER_VALUE, FLOAT_DTYPES, ROW_OVERHEAD_BYTES, PooledTable)
from bench.ops.fc import at_precision, input_dtype, linear_parameters64
from bench.references import (as64, binary_cross_entropy64, cat_interaction64,
                              cross_interaction64, dot_interaction64, linear_stack64, pool_rows64,
                              sgd_update, tt_rows64)
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


# ---------------------------------------------------------------- float64 references
# The references read the model's parameter tensors (and which rows a TT cache holds) and
# compute the DLRM by its definition with bench.references; no module of the model is run.

def _reference_tables(model: DLRM) -> list[tuple]:
    """Per table, in workload order: ("dense", fp32 weight) or ("tt", TT module), read only."""
    workload = model.workload
    embeddings = model.embeddings
    if hasattr(embeddings, "tt_positions"):
        parts: list = [None] * len(workload.tables)
        for module, position in zip(embeddings.tt, embeddings.tt_positions):
            parts[position] = ("tt", module)
        if embeddings.dense is not None:
            weights = _dense_weights(embeddings.dense, [workload.tables[position].rows for
                                                        position in embeddings.dense_positions])
            for weight, position in zip(weights, embeddings.dense_positions):
                parts[position] = ("dense", weight)
        return parts
    return [("dense", weight) for weight in
            _dense_weights(embeddings, [table.rows for table in workload.tables])]


def _dense_weights(embeddings: nn.Module, rows: list[int]) -> list[torch.Tensor]:
    """Each table's weights: a per-table module's own, or the concatenated table split by the
    workload's row counts (not by the module's row starts)."""
    if hasattr(embeddings, "bags"):
        return [bag.weight.detach() for bag in embeddings.bags]
    weight = (embeddings.bag.weight if hasattr(embeddings, "bag") else embeddings.weight).detach()
    if weight.shape[0] != sum(rows):
        raise ValueError(f"concatenated table has {weight.shape[0]} rows, the workload "
                         f"{sum(rows)}")
    return list(weight.split(rows))


def _interaction64(model: DLRM, bottom: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
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


def _logits64(model: DLRM, bottom_layers, top_layers, dense, pooled) -> torch.Tensor:
    """DLRM logits from float64 parameters: bottom MLP (final ReLU), interaction, top MLP."""
    bottom = linear_stack64(bottom_layers, dense, final_relu=True)
    return linear_stack64(top_layers, _interaction64(model, bottom, pooled),
                          final_relu=False).squeeze(1)


def reference_logits(model: DLRM, dense, indices, offsets) -> torch.Tensor:
    """Float64 logits of an fp32 DLRM, widening only the embedding rows the batch uses;
    TT rows come from the cores (what a freshly populated cache holds too)."""
    pooled = []
    for (kind, source), table_indices, table_offsets in zip(_reference_tables(model), indices,
                                                            offsets):
        rows, positions = torch.unique(table_indices.cpu().long(), return_inverse=True)
        if kind == "tt":
            rows64 = tt_rows64([as64(core) for core in source.cores], rows, source.row_factors)
        else:
            rows64 = as64(source[rows.to(source.device)])
        pooled.append(pool_rows64(rows64, positions, table_offsets))
    with torch.no_grad():
        return _logits64(model, linear_parameters64(model.bottom), linear_parameters64(model.top),
                         dense, torch.stack(pooled, dim=1))


class _ReferenceTable:
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
    formulation, p - lr * grad; returns what train_step's check returns (see _after_step)."""
    dense, indices, offsets = batch_tensors(batch, torch.device("cpu"))
    bottom = [(weight.requires_grad_(), bias.requires_grad_())
              for weight, bias in linear_parameters64(initial.bottom)]
    top = [(weight.requires_grad_(), bias.requires_grad_())
           for weight, bias in linear_parameters64(initial.top)]
    tables = [_ReferenceTable(kind, source, table_indices) for (kind, source), table_indices
              in zip(_reference_tables(initial), indices)]

    def pooled(leaves_per_table):
        return torch.stack([pool_rows64(table.looked_up(leaves), table.positions, table_offsets)
                            for table, leaves, table_offsets
                            in zip(tables, leaves_per_table, offsets)], dim=1)

    logits = _logits64(initial, bottom, top, dense, pooled([table.leaves for table in tables]))
    binary_cross_entropy64(logits, labels).backward()
    updated = [sgd_update(table.leaves, learning_rate) for table in tables]
    bottom_first = sgd_update([bottom[0][0]], learning_rate)[0]
    top_last = sgd_update([top[-1][0]], learning_rate)[0]
    with torch.no_grad():
        return logits.detach(), bottom_first, top_last, pooled(updated)


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
        return reference_train_step(initial, labelled.batch, labels, LEARNING_RATE)

    batch_size = workload.batch_size
    return Prepared(
        run=lambda: train_step(student, optimizer, dense, indices, offsets, labels,
                               autocast_dtype),
        check=check, reference=reference, samples=batch_size,
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
