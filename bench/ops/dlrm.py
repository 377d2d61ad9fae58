"""Whole-model ops: DLRM inference (`dlrm_infer`) and one training step (`dlrm_train`)."""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from bench.compare_outputs import whole_model_bound
from bench.models import quality
from bench.models.dlrm import (DLRM, batch_tensors, build_dlrm, flatten_tables, flops_per_sample,
                               parameter_bytes, row_start_values)
from bench.ops import common
from bench.ops.common import (BYTES_PER_VALUE, FLOAT_DTYPES, INDEX_BYTES, ROW_OVERHEAD_BYTES,
                              PooledTable, cycling, float_dtype, rotation_metrics, rotation_plan)
from bench.ops.fc import at_precision, input_dtype, linear_parameters64, stored_weight_bytes
from bench.references import (as64, binary_cross_entropy64, cat_interaction64,
                              cross_interaction64, dot_interaction64, linear_stack64, pool_rows64,
                              sgd_update, tt_rows64)
from bench.registry import BuildContext, Op, Prepared, Unsupported, impl, register_op
from bench.models.teacher import LabelledBatch, calibrate, evaluation_set, teacher_model
from workloads.generators import Batch, TableBatch, label_stream, make_batch

# Quantized whole-model inference compounds int8 activation rounding over every layer; these
# bounds on the logits' relative error still catch a broken kernel (which gives about 1).
WHOLE_MODEL_TOLERANCE = {"int8": 0.15, "int4": 0.3}
EVAL_BATCHES = 8  # 8 x 2048 = 16384 teacher-labelled samples per accuracy measurement
LEARNING_RATE = 0.1  # the DLRM Kaggle config's SGD rate
TRAIN_BATCH_INDEX = 0
# The other rotating batches are drawn from batch_index 1000 on: clear of the TT warm-up
# batches (1-4), the calibration batch (10,000) and the evaluation set (20,000 on).
ROTATION_FIRST_BATCH = 1000
LABEL_CHUNK_SAMPLES = 16384  # samples per teacher forward when labelling rotating batches
# Training runs in float formats only (fp16/bf16 by autocast): int8/int4 training would need
# quantization-aware training, which this op does not model.
TRAIN_PRECISIONS = ("fp32", "fp16", "bf16")

TT_WARM_UP_BATCHES = 4  # batches whose row counts populate the TT-Rec LFU caches


def _model_variants(workload, options) -> list[dict]:
    """Dense tables, and with --tt-tables K one variant per TT rank beside them (TT against
    dense in one run)."""
    tt_tables = options.get("tt_tables") or 0
    if not tt_tables:
        return [{}]
    return [{}] + [{"tt_tables": tt_tables, "tt_rank": rank}
                   for rank in options.get("tt_ranks") or [16]]


# Memory: fp32 tables, a precision or fused copy, and the float64 reference copies.
register_op(Op("dlrm_infer", "whole-model inference: logits for one batch", _model_variants,
               memory_factor=4.0, ci=True, report_order=60))
register_op(Op("dlrm_train", "one training step: forward, BCE loss, backward and SGD update",
               _model_variants, memory_factor=6.0, report_order=70))


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
            self.row_starts = row_start_values(weights)
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
    return {"tt_tables": context.variant["tt_tables"], "tt_rank": context.variant["tt_rank"],
            "tt_kernel": context.variant.get("tt_kernel", "reference")}


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
    # Per TT table (workload order of tt_positions): the probe lookup's cache counters.
    per_table = [{"table": position, **module.cache_stats()}
                 for position, module in zip(probe.tt_positions, probe.tt)]
    return {**_tt_metrics(model), "tt_hit_rate": probe.hit_rate(), "tt_cache_stats": per_table}


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


def model_rotation_plan(workload, precision: str) -> dict:
    """How many distinct whole-model batches to cycle through (see common.rotation_plan)."""
    lookups = workload.batch_size * sum(table.pooling.mean for table in workload.tables)
    row_bytes = workload.dim * BYTES_PER_VALUE[precision] + ROW_OVERHEAD_BYTES.get(precision, 0)
    # A rotating batch holds int64 indices and offsets, fp32 per-sample weights and dense
    # features, and fp32 labels with float64 probabilities.
    batch = workload.batch_size
    memory = (lookups * (INDEX_BYTES + 4) + batch * len(workload.tables) * INDEX_BYTES
              + batch * (workload.num_dense * 4 + 12))
    maximum = common.MAX_ROTATION_MODEL_BATCHES
    if workload.data_path:
        # A data file wraps around: batches beyond its length repeat earlier samples.
        from workloads.criteo_workload import load

        maximum = min(maximum, max(1, len(load(workload.data_path).labels) // batch))
    return rotation_plan(lookups * row_bytes, memory, maximum)


def rotation_batch_indices(parts: int, workload=None) -> list[int]:
    """batch_index of each rotating batch: the checked batch first. A data file's batch k is
    its samples from k x batch_size on, wrapping: consecutive ones are the distinct ones."""
    if workload is not None and workload.data_path:
        return list(range(TRAIN_BATCH_INDEX, TRAIN_BATCH_INDEX + parts))
    return [TRAIN_BATCH_INDEX] + list(range(ROTATION_FIRST_BATCH, ROTATION_FIRST_BATCH + parts - 1))


@functools.lru_cache(maxsize=2)
def rotating_batches(workload, seed: int, parts: int) -> tuple:
    """The distinct batches whole-model inference cycles through (cached per worker)."""
    return tuple(make_batch(workload, seed, index)
                 for index in rotation_batch_indices(parts, workload))


def concatenate_batches(batches) -> Batch:
    """Batches side by side as one (offsets shifted), so one forward serves them all."""
    tables = []
    for position in range(len(batches[0].tables)):
        parts = [batch.tables[position] for batch in batches]
        starts = np.cumsum([0] + [len(part.indices) for part in parts[:-1]])
        tables.append(TableBatch(
            indices=np.concatenate([part.indices for part in parts]),
            offsets=np.concatenate([part.offsets + start for part, start in zip(parts, starts)]),
            weights=np.concatenate([part.weights for part in parts])))
    return Batch(dense=np.concatenate([batch.dense for batch in batches]), tables=tables)


@functools.lru_cache(maxsize=1)
def rotating_labelled_batches(workload, seed: int, parts: int) -> tuple[LabelledBatch, ...]:
    """The distinct teacher-labelled batches training cycles through (cached per worker).

    Labels are drawn as teacher.label_batches draws them, but the teacher's forward runs over
    several batches at once: one forward per batch made building a rotation slow."""
    teacher = teacher_model(workload, seed)
    batches = rotating_batches(workload, seed, parts)
    per_forward = max(1, LABEL_CHUNK_SAMPLES // workload.batch_size)
    probabilities = []
    for start in range(0, len(batches), per_forward):
        chunk = batches[start:start + per_forward]
        with torch.no_grad():
            logits = teacher(*batch_tensors(concatenate_batches(chunk),
                                            torch.device("cpu"))).double()
        probabilities.extend(np.split(torch.sigmoid(logits).numpy(), len(chunk)))
    labelled = []
    indices = rotation_batch_indices(parts, workload)
    for batch_index, batch, batch_probabilities in zip(indices, batches, probabilities):
        draws = label_stream(seed, batch_index).random(len(batch_probabilities))
        labelled.append(LabelledBatch(batch, batch_probabilities,
                                      (draws < batch_probabilities).astype(np.float32)))
    return tuple(labelled)


def _mean_lookups_per_table(batches_tensors) -> list[float]:
    """Mean lookups of each table over the batches (dense, indices, offsets)."""
    totals = None
    for _, indices, _ in batches_tensors:
        counts = [table_indices.numel() for table_indices in indices]
        totals = counts if totals is None else [a + b for a, b in zip(totals, counts)]
    return [total / len(batches_tensors) for total in totals]


def embedding_traffic(model: DLRM, precision: str, batches_tensors) -> dict:
    """Mean per batch: looked-up rows' bytes (TT tables: what tt_lookup_cost counts), TT
    reconstruction FLOPs, lookups and distinct rows, over the batches the op cycles through."""
    from bench.ops.ttrec import tt_lookup_cost, tt_unique_counts

    workload = model.workload
    lookups = _mean_lookups_per_table(batches_tensors)
    row_bytes = workload.dim * BYTES_PER_VALUE[precision] + ROW_OVERHEAD_BYTES.get(precision, 0)
    tt_positions = list(getattr(model.embeddings, "tt_positions", ()))
    traffic = {"row_bytes": 0.0, "tt_flops": 0.0, "lookups": float(sum(lookups)),
               "unique_rows": 0.0, "unique_cached_rows": 0.0}
    for position, module in zip(tt_positions, getattr(model.embeddings, "tt", ())):
        counts = tt_unique_counts(module, [indices[position] for _, indices, _ in
                                           batches_tensors])
        cost = tt_lookup_cost(module, counts)
        traffic["row_bytes"] += cost["bytes"]
        traffic["tt_flops"] += cost["flops"]
        traffic["unique_cached_rows"] += counts["unique_ids"] - counts["unique_uncached_ids"]
    for position in range(len(workload.tables)):
        if position in tt_positions:
            continue
        traffic["row_bytes"] += lookups[position] * row_bytes
        traffic["unique_rows"] += sum(torch.unique(indices[position]).numel()
                                      for _, indices, _ in batches_tensors) / len(batches_tensors)
    return traffic


def inference_bytes(model: DLRM, precision: str, traffic: dict) -> dict:
    """Compulsory traffic of one inference batch, by part: the weights the forward reads as
    stored (packed int8 Linears included), the looked-up rows, the inputs and the logits."""
    workload = model.workload
    batch = workload.batch_size
    activation = input_dtype(precision).itemsize
    return {"weights": float(sum(stored_weight_bytes(part) for part in
                                 (model.bottom, model.interaction, model.top))),
            "rows": traffic["row_bytes"],
            "inputs": float(batch * workload.num_dense * activation
                            + traffic["lookups"] * INDEX_BYTES
                            + batch * len(workload.tables) * INDEX_BYTES),
            "output": float(batch * activation)}


def training_bytes(model: DLRM, traffic: dict) -> dict:
    """Compulsory traffic of one SGD step of an fp32 model, by part: the forward, then
    backward (weights read again, their gradients written, one gradient row per lookup) and
    the update (weights and gradients read, weights written; each distinct row read and
    written). TT cores take dense gradients, as the MLP weights do."""
    workload = model.workload
    forward = inference_bytes(model, "fp32", traffic)
    row_bytes = workload.dim * 4
    tt_cores = sum(module.tt_bytes for module in getattr(model.embeddings, "tt", ()))
    updated_rows = traffic["unique_rows"] + traffic["unique_cached_rows"]
    return {**{f"forward_{name}": value for name, value in forward.items()},
            "labels": float(workload.batch_size * 4),
            "weights_backward_update": 5.0 * forward["weights"] + 4.0 * tt_cores,
            "row_gradients": 2.0 * traffic["lookups"] * row_bytes,
            "row_updates": 2.0 * updated_rows * row_bytes}


def _model_flops(workload, traffic: dict) -> float:
    """Forward FLOPs of one batch: flops_per_sample with the lookups the batches really have,
    plus TT reconstructions of distinct uncached ids."""
    expected_lookups = workload.batch_size * sum(table.pooling.mean for table in workload.tables)
    return (workload.batch_size * flops_per_sample(workload)
            + (traffic["lookups"] - expected_lookups) * workload.dim + traffic["tt_flops"])


def serving_forward(infer, precision: str):
    """infer taking fp32 dense features (as batch_tensors makes them) at any precision."""
    dtype = input_dtype(precision)
    return lambda dense, indices, offsets: infer(dense.to(dtype), indices, offsets)


def build_infer(context: BuildContext, layout: str,
                prepare: Optional[Callable[[DLRM], DLRM]] = None) -> Prepared:
    """Inference of the calibrated teacher DLRM at a precision, plus its accuracy effects;
    prepare (if given) transforms the model that runs (e.g. swaps its Linear kernels)."""
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
    if prepare is not None:
        model = prepare(model)
    rotation = model_rotation_plan(workload, precision)
    batches = rotating_batches(workload, context.seed, rotation["rotation_batches"])
    batch = batches[0]
    inputs = []
    for item in batches:
        dense, indices, offsets = batch_tensors(item, device)
        inputs.append((dense.to(input_dtype(precision)), indices, offsets))
    dense, indices, offsets = inputs[0]
    traffic = embedding_traffic(model, precision, inputs)
    bytes_parts = inference_bytes(model, precision, traffic)

    def infer(dense, indices, offsets):
        with torch.inference_mode():
            return model(dense, indices, offsets)

    calls = [functools.partial(infer, *item) for item in inputs]

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
        run=cycling(calls),
        check=calls[0],
        forward=serving_forward(infer, precision),
        reference=lambda: reference_logits(fp32_model, *batch_tensors(batch, torch.device("cpu"))),
        samples=batch_size,
        flops=_model_flops(workload, traffic),
        bytes_moved=sum(bytes_parts.values()),
        params={"layout": layout, **_precision_params(precision), **tt,
                "rotation_batches": len(inputs)},
        metrics={"model_bytes": _model_bytes(model), "bytes_parts": bytes_parts,
                 **rotation_metrics(rotation),
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


def build_train(context: BuildContext, layout: str,
                prepare: Optional[Callable[[DLRM], DLRM]] = None) -> Prepared:
    """One SGD step of a student DLRM on teacher labels; prepare (if given) transforms the
    initial model that every timed and checked step starts from."""
    workload, device, precision = context.workload, context.device, context.precision
    if precision == "fp16" and device.type == "cuda":
        raise Unsupported("fp16 training on CUDA needs loss scaling (torch.amp.GradScaler): "
                          "without it small gradients underflow, and its step() reads the "
                          "found-inf flag on the host, a sync inside the timed step; use bf16")
    # float_dtype refuses a precision outside TRAIN_PRECISIONS (the planner never asks for one).
    autocast_dtype = None if precision == "fp32" else float_dtype(precision)
    rotation = model_rotation_plan(workload, "fp32")
    rotating = rotating_labelled_batches(workload, context.seed, rotation["rotation_batches"])
    labelled = rotating[0]
    tt = _tt_settings(context)
    if tt and layout == "fused_sgd":
        raise Unsupported("fused_sgd has no TT-Rec tables; use per_table or batched with TT")
    initial = build_dlrm(workload, context.seed + 1, embeddings=layout, sparse=True,
                         learning_rate=LEARNING_RATE, **tt)
    if prepare is not None:
        initial = prepare(initial)
    warm_up_tt(initial, workload, context.seed)
    student = copy.deepcopy(initial).to(device)
    # Each timed step trains on the next distinct batch: refitting one batch would keep its
    # rows cached and measure a step no training run takes.
    inputs = [(*batch_tensors(item.batch, device), torch.from_numpy(item.labels).to(device))
              for item in rotating]
    dense, indices, offsets, labels = inputs[0]
    optimizer = torch.optim.SGD(student.parameters(), lr=LEARNING_RATE)
    traffic = embedding_traffic(initial, "fp32", [item[:3] for item in inputs])
    bytes_parts = training_bytes(initial, traffic)

    def check():
        model = copy.deepcopy(initial).to(device)
        logits = train_step(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
                            dense, indices, offsets, labels, autocast_dtype)
        return (logits.detach(),) + _after_step(model, indices, offsets)

    def reference():
        return reference_train_step(initial, labelled.batch, labels, LEARNING_RATE)

    batch_size = workload.batch_size
    calls = [functools.partial(train_step, student, optimizer, *item,
                               autocast_dtype=autocast_dtype) for item in inputs]
    return Prepared(
        run=cycling(calls),
        check=check, reference=reference, samples=batch_size,
        error_bound=lambda expected: whole_model_bound(expected, precision),
        # Backward costs about twice the forward's FLOPs (two GEMMs per forward GEMM).
        flops=3.0 * _model_flops(workload, traffic),
        bytes_moved=sum(bytes_parts.values()),
        params={"layout": layout, "optimizer": "SGD", "lr": LEARNING_RATE,
                "autocast": precision if autocast_dtype is not None else "none", **tt,
                "rotation_batches": len(inputs)},
        metrics={"bytes_parts": bytes_parts, **rotation_metrics(rotation),
                 "model_bytes": _model_bytes(student),
                 **_tt_metrics_after_lookup(initial, indices, offsets)},
    )


@impl("dlrm_train", "per_table", TRAIN_PRECISIONS, baseline=True,
      description="the DLRM reference's structure: per-table sparse EmbeddingBags + SGD")
def build_train_per_table(context: BuildContext) -> Prepared:
    """Training step with per-table embeddings."""
    return build_train(context, "per_table")


@impl("dlrm_train", "batched", TRAIN_PRECISIONS,
      description="one concatenated sparse EmbeddingBag + SGD")
def build_train_batched(context: BuildContext) -> Prepared:
    """Training step with one batched embedding."""
    return build_train(context, "batched")


@impl("dlrm_train", "tt_fused", TRAIN_PRECISIONS,
      description="TT-Rec tables (--tt-tables) on the fused TT kernel (one autograd node, "
                  "bmm-chain backward, per-lookup cache read), the rest one batched table")
def build_train_tt_fused(context: BuildContext) -> Prepared:
    """Training step with TT tables on the fused kernel."""
    if not context.variant.get("tt_tables"):
        raise Unsupported("tt_fused trains TT-Rec tables: give --tt-tables K (the dense "
                          "variant runs under per_table / batched)")
    return build_train(replace(context, variant={**context.variant, "tt_kernel": "fused"}),
                       "batched")


@impl("dlrm_train", "fused_sgd", TRAIN_PRECISIONS,
      description="one concatenated table whose SGD update is fused into backward "
                  "(index_add_ of per-lookup gradients; no sparse gradient tensor)")
def build_train_fused(context: BuildContext) -> Prepared:
    """Training step with the embedding update fused into backward."""
    return build_train(context, "fused_sgd")
