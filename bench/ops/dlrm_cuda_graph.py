"""CUDA graphs of the whole-model ops: `dlrm_infer` and `dlrm_train` captured once and replayed,
static input buffers filled from the rotating batches before each replay. Checked against the
same float64 references as the eager impls."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import torch
from torch import nn

from bench.compare_outputs import whole_model_bound
from bench.models.dlrm import DLRM
from bench.models.dlrm_reference import reference_train_step
from bench.ops.common import cycling, rotation_metrics
from bench.ops.dlrm import (COPIED_INFERENCE, HOST_BUILT_TRAINING, LEARNING_RATE, after_step,
                            build_infer, dense_only, host_built_training)
from bench.ops.dlrm_costs import model_bytes, model_flops
from bench.registry import BuildContext, Prepared, Unsupported, impl

INFER_PRECISIONS = ("fp32", "fp16", "bf16")
# fp16 training needs a GradScaler, whose step reads a flag on the host: no capture.
TRAIN_PRECISIONS = ("fp32", "bf16")
# Steps run on a side stream before capture, as torch's whole-network capture example does:
# they build cuBLAS handles, autotune caches and the optimizer's lazy state outside the graph.
WARM_UP_CALLS = 3
# Inference graphs kept per model, one per input shape (the timed batch, the accuracy batch,
# serving's batch sizes); beyond it a shape runs eagerly: each graph holds its own memory.
MAX_GRAPHS = 4
CPU_SKIP = ("cuda_graph captures CUDA kernels: it runs on cuda only (its capture and replay "
            "logic is tested on the CPU with an eager stand-in for the graph)")
INFER_REPLAY = ("forward; copies of the inputs into the static buffers and of the logits out "
                "included in the timed call")
TRAIN_REPLAY = ("forward, BCE, backward and SGD step (table rows updated inside backward); "
                "copies of the inputs into the static buffers included in the timed call")


@dataclasses.dataclass
class CapturedGraph:
    """A captured function: replay() reruns its kernels; outputs are the tensors it wrote."""

    replay: Callable[[], None]
    outputs: Any


def capture_cuda(function: Callable[[], Any], warm_up_calls: int) -> CapturedGraph:
    """function warmed up on a side stream, then captured into a torch.cuda.CUDAGraph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm_up_calls):
            function()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # The warm-up's stream again: libraries cache handles per stream (ROCm's hipBLASLt
    # creates one, capture-unsafe, on a stream's first use).
    with torch.cuda.graph(graph, stream=side):
        outputs = function()
    return CapturedGraph(replay=graph.replay, outputs=outputs)


def flat_tensors(inputs) -> list[torch.Tensor]:
    """The tensors of nested tuples and lists, in order."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return [tensor for item in inputs for tensor in flat_tensors(item)]


def static_copies(inputs):
    """Copies of nested tensors in the same structure: the buffers a graph reads."""
    if isinstance(inputs, torch.Tensor):
        return inputs.clone()
    return type(inputs)(static_copies(item) for item in inputs)


def fill(static, inputs) -> None:
    """Copy inputs into the static buffers (same structure and shapes)."""
    for buffer, tensor in zip(flat_tensors(static), flat_tensors(inputs), strict=True):
        if buffer.shape != tensor.shape:
            raise ValueError(f"a graph's input buffer has shape {tuple(buffer.shape)}, the "
                             f"input {tuple(tensor.shape)}")
        buffer.copy_(tensor)


def shapes(inputs) -> tuple:
    """The shapes and dtypes of nested tensors: what one graph can replay."""
    return tuple((tuple(tensor.shape), tensor.dtype) for tensor in flat_tensors(inputs))


class StaticCall:
    """function(*inputs) captured once over static copies of example inputs; each call copies
    its inputs into them, replays, and returns the graph's outputs (rewritten by each replay)."""

    def __init__(self, function: Callable[..., Any], example: tuple,
                 capture: Callable[[Callable[[], Any], int], CapturedGraph]):
        self.static = static_copies(tuple(example))
        self.graph = capture(lambda: function(*self.static), WARM_UP_CALLS)

    def __call__(self, *inputs):
        fill(self.static, inputs)
        self.graph.replay()
        return self.graph.outputs


class GraphedDLRM(DLRM):
    """The same DLRM (its modules shared) whose forward replays a graph of its forward, one
    graph per input shape up to MAX_GRAPHS, captured at a shape's first call."""

    def __init__(self, model: DLRM, capture: Callable):
        super().__init__(model.workload, model.bottom, model.embeddings, model.interaction,
                         model.top)
        self.capture = capture
        self.graphs: dict[tuple, StaticCall] = {}
        self.train(model.training)

    def forward(self, dense, indices, offsets):
        """Logits [B], a copy of the graph's output (the next replay rewrites that)."""
        inputs = (dense, indices, offsets)
        key = shapes(inputs)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                return super().forward(*inputs)
            self.graphs[key] = StaticCall(functools.partial(DLRM.forward, self), inputs,
                                          self.capture)
        return self.graphs[key](*inputs).clone()


def _timed_once(context: BuildContext, call: Callable[[], Any]) -> dict:
    """Run call (the capture) once; with the context's clock, its seconds as capture_s."""
    if context.time_calls is None:
        call()
        return {}

    def finished():
        call()
        if context.device.type == "cuda":
            torch.cuda.synchronize(context.device)

    return {"capture_s": round(context.time_calls(finished, 1)[0], 4)}


def _check_context(context: BuildContext, precisions: tuple[str, ...],
                   capture: Callable) -> None:
    if capture is capture_cuda and context.device.type != "cuda":
        raise Unsupported(CPU_SKIP)
    if context.variant.get("tt_tables"):
        raise Unsupported("cuda_graph has no TT-Rec tables (their caches count rows on the "
                          "host); use per_table or batched with --tt-tables")
    if context.precision not in precisions:
        raise Unsupported(f"cuda_graph runs at {'/'.join(precisions)} only")
    if any(table.pooling.kind != "fixed" for table in context.workload.tables):
        # Every rotating batch must fill the same static buffers.
        raise Unsupported("cuda_graph replays one set of shapes, but this workload's batches "
                          "differ in index counts (variable pooling); use fixed pooling")


def build_graphed_infer(context: BuildContext, capture: Callable = capture_cuda) -> Prepared:
    """batched inference (the teacher at a precision) through a captured graph of its forward;
    capture makes the graph (tests pass an eager stand-in)."""
    _check_context(context, INFER_PRECISIONS, capture)
    graphed: list[GraphedDLRM] = []

    def prepare(model: DLRM) -> DLRM:
        graphed.append(GraphedDLRM(model, capture))
        return graphed[0]

    prepared = build_infer(context, "batched", prepare=prepare)
    metrics = _timed_once(context, prepared.check)  # warm-up and capture of the timed shape
    return dataclasses.replace(
        prepared,
        params={**prepared.params, "graph": "torch.cuda.CUDAGraph", "replay": INFER_REPLAY,
                "warm_up_calls": WARM_UP_CALLS},
        metrics={**prepared.metrics, **metrics})


def graph_train_step(model: nn.Module, optimizer, dense, indices, offsets, labels,
                     autocast_dtype=None):
    """bench.ops.dlrm.train_step's forward, BCE, backward and SGD step, with autocast's
    weight-cast cache off: torch requires it off for autocast under graph capture."""
    optimizer.zero_grad(set_to_none=True)
    autocast = (contextlib.nullcontext() if autocast_dtype is None else
                torch.autocast(dense.device.type, dtype=autocast_dtype, cache_enabled=False))
    with autocast:
        logits = model(dense, indices, offsets)
    loss = nn.functional.binary_cross_entropy_with_logits(logits.to(labels.dtype), labels)
    loss.backward()
    optimizer.step()
    return logits


def build_graphed_train(context: BuildContext, capture: Callable = capture_cuda,
                        learning_rate: float = LEARNING_RATE,
                        reference_learning_rate: float | None = None) -> Prepared:
    """fused_sgd's SGD step (tables updated inside backward: no sparse gradient, no host
    sync) captured whole into a graph; reference_learning_rate (default learning_rate) lets
    tests plant a wrong update."""
    _check_context(context, TRAIN_PRECISIONS, capture)
    workload, precision = context.workload, context.precision
    reference_learning_rate = (learning_rate if reference_learning_rate is None
                               else reference_learning_rate)
    autocast_dtype = None if precision == "fp32" else torch.bfloat16
    setup = host_built_training(context, "fused_sgd", learning_rate)
    rotation, rotating, inputs = setup.rotation, setup.rotating, setup.inputs
    initial, student, optimizer = setup.initial, setup.student, setup.optimizer
    traffic, bytes_parts = setup.traffic, setup.bytes_parts
    dense, indices, offsets, labels = inputs[0]
    steps: list[StaticCall] = []
    metrics = _timed_once(context, lambda: steps.append(StaticCall(
        functools.partial(graph_train_step, student, optimizer, autocast_dtype=autocast_dtype),
        inputs[0], capture)))
    step = steps[0]

    def check():
        # The warm-up and capture trained the student: reset it in place (the graph reads
        # these very tensors), then replay the timed step on the checked batch.
        student.load_state_dict(initial.state_dict())
        logits = step(dense, indices, offsets, labels).detach().clone()
        return (logits,) + after_step(student, indices, offsets)

    def reference():
        return reference_train_step(initial, rotating[0].batch, labels.cpu(),
                                    reference_learning_rate)

    return Prepared(
        run=cycling([functools.partial(step, *item) for item in inputs]),
        check=check, reference=reference, samples=workload.batch_size,
        error_bound=lambda expected: whole_model_bound(expected, precision),
        # Backward costs about twice the forward's FLOPs (two GEMMs per forward GEMM).
        flops=3.0 * model_flops(workload, traffic),
        bytes_moved=sum(bytes_parts.values()),
        params={"layout": "fused_sgd", "optimizer": "SGD", "lr": learning_rate,
                "autocast": precision if autocast_dtype is not None else "none",
                "graph": "torch.cuda.CUDAGraph", "replay": TRAIN_REPLAY,
                "warm_up_calls": WARM_UP_CALLS, "rotation_batches": len(inputs)},
        metrics={"bytes_parts": bytes_parts, **rotation_metrics(rotation),
                 "model_bytes": model_bytes(student), **metrics},
    )


@impl("dlrm_infer", "cuda_graph", INFER_PRECISIONS, devices=("cuda",), pairs=dense_only,
      gpu_memory_factors=COPIED_INFERENCE,
      description="batched inference captured once into a CUDA graph and replayed (inputs "
                  "copied into static buffers each call)")
def build_infer_cuda_graph(context: BuildContext) -> Prepared:
    """Inference replaying a CUDA graph of the batched model's forward."""
    return build_graphed_infer(context)


@impl("dlrm_train", "cuda_graph", TRAIN_PRECISIONS, devices=("cuda",), pairs=dense_only,
      gpu_memory_factors=HOST_BUILT_TRAINING,
      description="fused_sgd's whole step (forward, backward, SGD in backward) captured once "
                  "into a CUDA graph and replayed (inputs copied into static buffers)")
def build_train_cuda_graph(context: BuildContext) -> Prepared:
    """Training step replaying a CUDA graph of fused_sgd's step."""
    return build_graphed_train(context)
