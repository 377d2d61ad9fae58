"""Whole-model ops: DLRM inference (`dlrm_infer`) and one training step (`dlrm_train`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from bench.compare_outputs import whole_model_bound
from bench.models import quality
from bench.models.dlrm import DLRM, TTMixedEmbeddings, batch_tensors, build_dlrm, row_start_values
from bench.models.dlrm_reference import (WorkloadMemo, reference_logits, reference_tables,
                                         reference_train_step)
from bench.models.quantized import QuantizedEmbeddings
from bench.models.teacher import calibrate, evaluation_batches, evaluation_set, teacher_model
from bench.ops.common import FLOAT_DTYPES, PooledTable, cycling, float_dtype, rotation_metrics
from bench.ops.dlrm_batches import (check_metrics, checked_part, model_rotation_plan,
                                    rotating_batches, rotating_labelled_batches)
from bench.ops.dlrm_costs import (embedding_traffic, inference_bytes, model_bytes, model_flops,
                                  training_bytes, tt_metrics_after_lookup)
from bench.ops.fc import at_precision, input_dtype
from bench.registry import BuildContext, Op, Prepared, Unsupported, impl, register_op
from workloads.generators import make_batch

# Quantized whole-model inference compounds int8 activation rounding over every layer; these
# bounds on the logits' relative error still catch a broken kernel (which gives about 1).
WHOLE_MODEL_TOLERANCE = {"int8": 0.15, "int4": 0.3}
EVAL_BATCHES = 8  # 8 x 2048 = 16384 teacher-labelled samples per accuracy measurement
LEARNING_RATE = 0.1  # the DLRM Kaggle config's SGD rate
# Training runs in float formats only (fp16/bf16 by autocast): int8/int4 training would need
# quantization-aware training, which this op does not model.
TRAIN_PRECISIONS = ("fp32", "fp16", "bf16")
# On CUDA without fp16: see build_train (loss scaling).
CUDA_TRAIN = {"cuda": ("fp32", "bf16")}

TT_WARM_UP_BATCHES = 4  # batches whose row counts populate the TT-Rec LFU caches


def _model_variants(workload, options) -> list[dict]:
    """Dense tables, and with --tt-tables K one variant per TT rank beside them (TT against
    dense in one run)."""
    tt_tables = options.get("tt_tables") or 0
    if not tt_tables:
        return [{}]
    return [{}] + [{"tt_tables": tt_tables, "tt_rank": rank}
                   for rank in options.get("tt_ranks") or [16]]


# Memory (bytes per byte of fp32 tables). On the CPU: the worker's cached tables, the model's,
# a precision or fused copy, and the float64 reference's rows. On a GPU, inference builds the
# teacher on the device and times it there at fp32 (no copy), or a half-precision copy beside
# it; training builds teacher and student on the device, one after the other, and the check
# shares the student's tables (table_sharing_copy): the student, its sparse gradients (up to a
# quarter of mlperf's tables at the GPU batch) and the checked rows. The host holds inputs.
register_op(Op("dlrm_infer", "whole-model inference: logits for one batch", _model_variants,
               memory_factor=4.0, ci=True, report_order=60,
               gpu_memory_factors={"fp32": (1.05, 0.05), "*": (1.55, 0.05)}))
register_op(Op("dlrm_train", "one training step: forward, BCE loss, backward and SGD update",
               _model_variants, memory_factor=6.0, report_order=70,
               gpu_memory_factors=(1.25, 0.05)))
# Inference impls that build the teacher on the host and copy it to the device, where the
# accuracy check moves the fp32 teacher too.
HOST_BUILT_INFERENCE = (2.0, 2.0)
# Inference impls that time a second model beside the device-built teacher (a converted or
# wrapped copy of it).
COPIED_INFERENCE = (2.0, 0.05)
# Training impls that build the student on the host and move copies to the device.
HOST_BUILT_TRAINING = (2.0, 4.0)


def model_at_precision(model: DLRM, precision: str, layout: str, device: torch.device) -> DLRM:
    """The fp32 DLRM itself where it already is at fp32 on device (inference never writes
    it: a second copy would not fit where the tables fill a GPU), else an inference copy:
    float casts, or int8 MLPs with int8/int4 tables."""
    if precision == "fp32" and model.top[-1].weight.device == device:
        return model
    if precision in FLOAT_DTYPES:
        return copy.deepcopy(model).to(device=device, dtype=FLOAT_DTYPES[precision])
    if device.type != "cpu":
        raise Unsupported(f"{precision} DLRM inference uses CPU-only quantized kernels")
    weights = model.embeddings.table_weights()
    cpu = torch.device("cpu")
    if layout == "per_table":
        embeddings = QuantizedEmbeddings([PooledTable(weight, precision, cpu)
                                          for weight in weights])
    else:
        embeddings = QuantizedEmbeddings([PooledTable(torch.cat(weights), precision, cpu)],
                                         row_starts=row_start_values(weights))
    return DLRM(model.workload,
                bottom=at_precision(model.bottom, "int8", device),
                embeddings=embeddings,
                interaction=copy.deepcopy(model.interaction),
                top=at_precision(model.top, "int8", device))


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
    if not isinstance(model.embeddings, TTMixedEmbeddings):
        return
    for batch_index in range(1, TT_WARM_UP_BATCHES + 1):
        batch = make_batch(workload, seed, batch_index)
        model.embeddings.warm_up([torch.from_numpy(table.indices) for table in batch.tables])
    model.embeddings.populate()


def precision_params(precision: str) -> dict:
    """The row's mlp and tables params of an inference precision."""
    if precision in ("int8", "int4"):
        return {"mlp": "int8 dynamic", "tables": f"{precision} row-wise"}
    return {"mlp": precision, "tables": precision}


def predict(model: nn.Module, labelled, precision: str, device: torch.device) -> np.ndarray:
    """Predicted CTRs over labelled batches."""
    outputs = []
    with torch.inference_mode():
        for item in labelled:
            dense, indices, offsets = batch_tensors(item.batch, device)
            logits = model(dense.to(input_dtype(precision)), indices, offsets)
            outputs.append(torch.sigmoid(logits.double()).cpu().numpy())
    return np.concatenate(outputs)


# The teacher's predictions on the evaluation set are the same for every impl and precision
# whose fp32 model is the teacher in one embedding layout: predicted once per worker. Keyed by
# what the teacher is a function of, so that no entry keeps a model (and its tables) alive.
FP32_PREDICTIONS_MEMO = WorkloadMemo(max_entries=4)


def fp32_predictions(teacher: DLRM, labelled, eval_key, device: torch.device) -> np.ndarray:
    """predict(teacher, labelled, "fp32", device), memoized per worker (read-only); teacher is
    teacher_model(workload, seed, ...) of the seed that eval_key starts with."""
    key = (eval_key, type(teacher.embeddings).__name__, str(device))
    return FP32_PREDICTIONS_MEMO.get(
        teacher.workload, key, lambda: predict(teacher.to(device), labelled, "fp32", device))


def inference_accuracy(model: nn.Module, fp32_model: DLRM, seed: int, precision: str,
                       device: torch.device) -> dict:
    """AUC and log loss of model's CTRs on the teacher-labelled evaluation set, and how far
    they move from the fp32 model's (what a precision costs in accuracy); fp32_model is the
    teacher (teacher_model of this seed)."""
    # A GPU run labels with the teacher it holds (the same calibrated function): a host
    # teacher would pass a second copy of its tables through the host.
    labelled = (evaluation_set(fp32_model.workload, seed, EVAL_BATCHES) if device.type == "cpu"
                else evaluation_batches(fp32_model, fp32_model.workload, seed, EVAL_BATCHES))
    labels = np.concatenate([item.labels for item in labelled])
    predicted = predict(model, labelled, precision, device)
    fp32_predicted = fp32_predictions(fp32_model, labelled, (seed, EVAL_BATCHES), device)
    return {"auc": quality.auc(labels, predicted),
            "logloss": quality.logloss(labels, predicted),
            "ctr_abs_diff": float(np.mean(np.abs(predicted - fp32_predicted))),
            "metrics": {"fp32_auc": quality.auc(labels, fp32_predicted),
                        "eval_samples": int(len(labels))}}


def serving_forward(infer, precision: str):
    """infer taking fp32 dense features (as batch_tensors makes them) at any precision."""
    dtype = input_dtype(precision)
    return lambda dense, indices, offsets: infer(dense.to(dtype), indices, offsets)


def build_infer(context: BuildContext, layout: str,
                prepare: Optional[Callable[[DLRM], DLRM]] = None,
                at_precision: Callable[..., DLRM] = model_at_precision) -> Prepared:
    """Inference of the calibrated teacher DLRM at a precision, plus its accuracy effects;
    prepare (if given) transforms the model that runs (e.g. swaps its Linear kernels);
    at_precision makes that model from the fp32 teacher (model_at_precision's arguments)."""
    workload, device, precision = context.workload, context.device, context.precision
    tt = _tt_settings(context)
    if tt:
        # A TT model is a different function from the dense teacher: calibrate it alone.
        fp32_model = build_dlrm(workload, context.seed, embeddings=layout, sparse=False, **tt)
        warm_up_tt(fp32_model, workload, context.seed)
        fp32_model = calibrate(fp32_model, workload, context.seed)
    else:
        # Built where it runs: a GPU run's tables never pass through the host.
        fp32_model = teacher_model(workload, context.seed, embeddings=layout, device=device)
    model = at_precision(fp32_model, precision, layout, device).eval()
    if prepare is not None:
        # prepare may change its model in place; the fp32 model is the reference's.
        model = prepare(copy.deepcopy(model) if model is fp32_model else model)
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
    check_batch, check = checked_part(batch, workload), calls[0]
    if check_batch is not batch:
        check_dense, check_indices, check_offsets = batch_tensors(check_batch, device)
        check = functools.partial(infer, check_dense.to(input_dtype(precision)), check_indices,
                                  check_offsets)

    batch_size = workload.batch_size
    return Prepared(
        run=cycling(calls),
        check=check,
        forward=serving_forward(infer, precision),
        reference=lambda: reference_logits(fp32_model,
                                           *batch_tensors(check_batch, torch.device("cpu"))),
        samples=batch_size,
        flops=model_flops(workload, traffic),
        bytes_moved=sum(bytes_parts.values()),
        params={"layout": layout, **precision_params(precision), **tt,
                "rotation_batches": len(inputs)},
        metrics={"model_bytes": model_bytes(model), "bytes_parts": bytes_parts,
                 **rotation_metrics(rotation), **check_metrics(workload),
                 **tt_metrics_after_lookup(model, indices, offsets)},
        tolerance=WHOLE_MODEL_TOLERANCE.get(precision),
        error_bound=lambda expected: whole_model_bound(expected, precision),
        # A TT model is not the teacher, so its accuracy is measured after training
        # (the TT-Rec study), not here.
        accuracy=None if tt else functools.partial(inference_accuracy, model, fp32_model,
                                                   context.seed, precision, device),
    )


@impl("dlrm_infer", "per_table", ("fp32", "fp16", "bf16", "int8", "int4"),
      device_precisions={"cuda": ("fp32", "fp16", "bf16")}, baseline=True,
      description="the DLRM reference's structure: one EmbeddingBag per table in a loop")
def build_infer_per_table(context: BuildContext) -> Prepared:
    """Inference with per-table embedding lookups."""
    return build_infer(context, "per_table")


@impl("dlrm_infer", "batched", ("fp32", "fp16", "bf16", "int8", "int4"),
      device_precisions={"cuda": ("fp32", "fp16", "bf16")},
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


def after_step(model: DLRM, indices, offsets) -> tuple:
    """What a step must update correctly: first bottom and last top layer weights, and the
    pooled embeddings of the batch's rows."""
    with torch.no_grad():
        pooled = model.embeddings(indices, offsets).detach().clone()
    return (model.bottom[0].weight.detach().clone(), model.top[-1].weight.detach().clone(),
            pooled)


def table_sharing_copy(model: DLRM) -> DLRM:
    """A deep copy of model whose dense tables are model's own tensors, not copies: one step
    of it writes the looked-up rows of model's tables (restored_tables puts them back)."""
    storages = {source.untyped_storage().data_ptr()
                for kind, source in reference_tables(model) if kind == "dense"}
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())
              if tensor.numel() and tensor.untyped_storage().data_ptr() in storages}
    return copy.deepcopy(model, shared)


@contextlib.contextmanager
def restored_tables(model: DLRM, indices: list[torch.Tensor]):
    """Keep the rows of model's dense tables that indices look up, and write them back on
    exit (with the tables' gradients dropped): what a step of table_sharing_copy(model)
    changed in model is undone, at the cost of the batch's rows, not of a table copy."""
    saved = []
    for (kind, source), table_indices in zip(reference_tables(model), indices):
        if kind == "dense":
            rows = torch.unique(table_indices.to(source.device).long())
            saved.append((source, rows, source.index_select(0, rows)))
    try:
        yield
    finally:
        with torch.no_grad():
            for source, rows, values in saved:
                source.index_copy_(0, rows, values)
        for parameter in model.embeddings.parameters():
            parameter.grad = None


@dataclasses.dataclass
class HostBuiltTraining:
    """A training set-up whose initial student is built on the host and copied to the device
    (the compiled and graphed impls: their check resets the student in place from initial,
    keeping the module objects their compiled code or graph holds)."""

    rotation: dict
    rotating: tuple  # LabelledBatch per rotating batch, the checked one first
    inputs: list  # (dense, indices, offsets, labels) per rotating batch, on the device
    initial: DLRM
    student: DLRM
    optimizer: torch.optim.Optimizer
    traffic: dict
    bytes_parts: dict


def host_built_training(context: BuildContext, layout: str,
                        learning_rate: float) -> HostBuiltTraining:
    """The teacher-labelled rotation, the initial student of a layout on the host, its device
    copy with an SGD optimizer, and the step's embedding traffic and bytes."""
    workload, device = context.workload, context.device
    rotation = model_rotation_plan(workload, "fp32")
    rotating = rotating_labelled_batches(workload, context.seed, rotation["rotation_batches"],
                                         device)
    inputs = [(*batch_tensors(item.batch, device), torch.from_numpy(item.labels).to(device))
              for item in rotating]
    initial = build_dlrm(workload, context.seed + 1, embeddings=layout, sparse=True,
                         learning_rate=learning_rate)
    student = copy.deepcopy(initial).to(device)
    traffic = embedding_traffic(initial, "fp32", [item[:3] for item in inputs])
    return HostBuiltTraining(rotation, rotating, inputs, initial, student,
                             torch.optim.SGD(student.parameters(), lr=learning_rate), traffic,
                             training_bytes(initial, traffic))


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
    rotating = rotating_labelled_batches(workload, context.seed, rotation["rotation_batches"],
                                         device)
    labelled = rotating[0]
    tt = _tt_settings(context)
    if tt and layout == "fused_sgd":
        raise Unsupported("fused_sgd has no TT-Rec tables; use per_table or batched with TT")
    # The student is built once, on the device: the check trains a copy that shares its tables
    # (table_sharing_copy) and puts back the rows it wrote, so a model whose tables fill most
    # of a GPU (mlperf: 97 GiB) is never held twice.
    student = build_dlrm(workload, context.seed + 1, embeddings=layout, sparse=True,
                         learning_rate=LEARNING_RATE, device=device, **tt)
    if prepare is not None:
        student = prepare(student)
    warm_up_tt(student, workload, context.seed)
    # Each timed step trains on the next distinct batch: refitting one batch would keep its
    # rows cached and measure a step no training run takes.
    inputs = [(*batch_tensors(item.batch, device), torch.from_numpy(item.labels).to(device))
              for item in rotating]
    _, indices, offsets, _ = inputs[0]
    optimizer = torch.optim.SGD(student.parameters(), lr=LEARNING_RATE)
    traffic = embedding_traffic(student, "fp32", [item[:3] for item in inputs])
    bytes_parts = training_bytes(student, traffic)
    tt_metrics = tt_metrics_after_lookup(student, indices, offsets)
    # A batch too large to widen to float64 on the host is checked on its first samples.
    check_batch, check_inputs = checked_part(labelled, workload), inputs[0]
    if check_batch is not labelled:
        check_inputs = (*batch_tensors(check_batch.batch, device),
                        torch.from_numpy(check_batch.labels).to(device))
    check_dense, check_indices, check_offsets, check_labels = check_inputs

    def check():
        with restored_tables(student, check_indices):
            model = table_sharing_copy(student)
            logits = train_step(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
                                check_dense, check_indices, check_offsets, check_labels,
                                autocast_dtype)
            return (logits.detach(),) + after_step(model, check_indices, check_offsets)

    def reference():
        # Before any timed step (the worker checks first): the student is still the initial
        # model, the check's rows put back.
        return reference_train_step(student, check_batch.batch, check_labels, LEARNING_RATE)

    batch_size = workload.batch_size
    calls = [functools.partial(train_step, student, optimizer, *item,
                               autocast_dtype=autocast_dtype) for item in inputs]
    return Prepared(
        run=cycling(calls),
        check=check, reference=reference, samples=batch_size,
        error_bound=lambda expected: whole_model_bound(expected, precision),
        # Backward costs about twice the forward's FLOPs (two GEMMs per forward GEMM).
        flops=3.0 * model_flops(workload, traffic),
        bytes_moved=sum(bytes_parts.values()),
        params={"layout": layout, "optimizer": "SGD", "lr": LEARNING_RATE,
                "autocast": precision if autocast_dtype is not None else "none", **tt,
                "rotation_batches": len(inputs)},
        metrics={"bytes_parts": bytes_parts, **rotation_metrics(rotation),
                 "model_bytes": model_bytes(student), **tt_metrics,
                 **check_metrics(workload)},
    )


# Plan-time facts (bench/registry.py Impl): which --tt-tables variants an impl can run.
TT_FUSED_NEEDS = ("tt_fused trains TT-Rec tables: give --tt-tables K (the dense variant runs "
                  "under per_table / batched)")


def dense_only(variant: dict, device: str, options: dict) -> str:
    """Plan-time: an impl without TT-Rec tables runs only the dense variant."""
    return "has no TT-Rec tables (its dense variant runs)" if variant.get("tt_tables") else ""


def tt_only(variant: dict, device: str, options: dict) -> str:
    """Plan-time: tt_fused runs only the TT-Rec variants."""
    return "" if variant.get("tt_tables") else "trains TT-Rec tables only (not the dense variant)"


@impl("dlrm_train", "per_table", TRAIN_PRECISIONS, device_precisions=CUDA_TRAIN, baseline=True,
      description="the DLRM reference's structure: per-table sparse EmbeddingBags + SGD")
def build_train_per_table(context: BuildContext) -> Prepared:
    """Training step with per-table embeddings."""
    return build_train(context, "per_table")


@impl("dlrm_train", "batched", TRAIN_PRECISIONS, device_precisions=CUDA_TRAIN,
      description="one concatenated sparse EmbeddingBag + SGD")
def build_train_batched(context: BuildContext) -> Prepared:
    """Training step with one batched embedding."""
    return build_train(context, "batched")


@impl("dlrm_train", "tt_fused", TRAIN_PRECISIONS, device_precisions=CUDA_TRAIN, pairs=tt_only,
      available=lambda device, options: "" if options.get("tt_tables") else TT_FUSED_NEEDS,
      description="TT-Rec tables (--tt-tables) on the fused TT kernel (one autograd node, "
                  "bmm-chain backward, per-lookup cache read), the rest one batched table")
def build_train_tt_fused(context: BuildContext) -> Prepared:
    """Training step with TT tables on the fused kernel."""
    if not context.variant.get("tt_tables"):
        raise Unsupported(TT_FUSED_NEEDS)
    fused = dataclasses.replace(context, variant={**context.variant, "tt_kernel": "fused"})
    return build_train(fused, "batched")


@impl("dlrm_train", "fused_sgd", TRAIN_PRECISIONS, device_precisions=CUDA_TRAIN, pairs=dense_only,
      description="one concatenated table whose SGD update is fused into backward "
                  "(index_add_ of per-lookup gradients; no sparse gradient tensor)")
def build_train_fused(context: BuildContext) -> Prepared:
    """Training step with the embedding update fused into backward."""
    return build_train(context, "fused_sgd")
