"""torch.compile of our per_table DLRM: the whole training step (`dlrm_train`) and the
inference forward (`dlrm_infer`), compiled at build time (in a compile mode) so the timed
closure runs compiled code. Checked against the same float64 references as per_table."""

from __future__ import annotations

import functools

import torch

from bench.compare_outputs import whole_model_bound
from bench.models.dlrm import batch_tensors
from bench.models.dlrm_reference import reference_logits, reference_train_step
from bench.models.teacher import teacher_model
from bench.ops.common import cycling, rotation_metrics
from bench.ops.dlrm import (HOST_BUILT_INFERENCE, HOST_BUILT_TRAINING, LEARNING_RATE, after_step,
                            dense_only, host_built_training, model_at_precision, precision_params,
                            serving_forward, train_step)
from bench.ops.dlrm_batches import model_rotation_plan, rotating_batches
from bench.ops.dlrm_costs import embedding_traffic, inference_bytes, model_bytes, model_flops
from bench.ops.fc import input_dtype
from bench.registry import BuildContext, Prepared, Unsupported, impl

CPU = torch.device("cpu")
PRECISIONS = ("fp32", "bf16")
# Inputs run once at build: the first compiles, the second (a new index count under variable
# pooling) makes Dynamo recompile with dynamic shapes, the third confirms it sticks.
WARM_UP_INPUTS = 3
# torch.compile's modes (--compile-mode): default; max-autotune (benchmarks GEMM and kernel
# configurations while compiling, and on CUDA captures CUDA graphs); reduce-overhead (CUDA
# graphs to cut launch overhead, a GPU mode: on a CPU it compiles as default does).
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")


def compile_variants(options: dict) -> list[dict]:
    """One variant per --compile-mode; default adds no key, so its rows keep the task keys
    they had before modes existed."""
    return [{} if mode == "default" else {"compile_mode": mode}
            for mode in options.get("compile_modes") or ["default"]]


def compile_mode(context: BuildContext) -> str:
    """The variant's compile mode (a mode outside COMPILE_MODES is refused)."""
    mode = context.variant.get("compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise Unsupported(f"unknown torch.compile mode {mode!r}; choose from "
                          f"{', '.join(COMPILE_MODES)}")
    return mode


@functools.lru_cache(maxsize=None)
def compiled_train_step(mode: str = "default"):
    """torch.compile of per_table's train_step, one per mode and process (its code cache is
    shared by every build, so compiled graphs are reused across builds of the same shapes)."""
    return torch.compile(train_step, mode=mode)


def warm_up(context: BuildContext, calls: list) -> dict:
    """Run the build's warm-up calls (the compile, outside timing); with the context's
    time_calls, the metrics of how long they took: compile_s, the first call (the compile
    itself) and each later one (recompiles for new shapes, then compiled runs)."""
    device = context.device

    def run(call):
        def finished():
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the call's kernels count in its seconds
        return finished

    if context.time_calls is None:
        for call in calls:
            call()
        return {}
    seconds = [context.time_calls(run(call), 1)[0] for call in calls]
    return {"compile_s": round(seconds[0], 4),
            "warm_up_calls_s": [round(value, 4) for value in seconds]}


def _compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def under_valgrind(device: str, options: dict) -> str:
    """Plan-time: why compiled cannot run under --metric instructions ('' otherwise)."""
    if options.get("metric") != "instructions":
        return ""
    # Inductor compiles its kernels with gcc -march=native outside Valgrind, so they hold
    # AVX-512 instructions that Valgrind cannot run (the worker dies with SIGILL).
    return ("torch.compile's kernels are built for the host CPU (AVX-512), which Valgrind "
            "cannot run; time compiled with --metric time")


def _check_context(context: BuildContext) -> None:
    if context.variant.get("tt_tables"):
        raise Unsupported("the compiled impls have no TT-Rec tables; use per_table or batched "
                          "with --tt-tables")
    if context.precision not in PRECISIONS:
        raise Unsupported(f"compiled runs at {'/'.join(PRECISIONS)} only")
    reason = under_valgrind(str(context.device), context.options)
    if reason:
        raise Unsupported(reason)


def build_compiled_train(context: BuildContext, learning_rate: float = LEARNING_RATE,
                         reference_learning_rate: float | None = None) -> Prepared:
    """per_table's SGD step (forward, BCE, backward, sparse SGD) through torch.compile.
    reference_learning_rate defaults to learning_rate (tests plant a mismatch with it)."""
    _check_context(context)
    workload, precision = context.workload, context.precision
    reference_learning_rate = (learning_rate if reference_learning_rate is None
                               else reference_learning_rate)
    autocast_dtype = None if precision == "fp32" else torch.bfloat16
    setup = host_built_training(context, "per_table", learning_rate)
    rotation, rotating, inputs = setup.rotation, setup.rotating, setup.inputs
    initial, student, optimizer = setup.initial, setup.student, setup.optimizer
    traffic, bytes_parts = setup.traffic, setup.bytes_parts
    dense, indices, offsets, labels = inputs[0]
    mode = compile_mode(context)
    step = compiled_train_step(mode)
    graphs_before = _compiled_graphs()
    # The compile (~20 s or more), outside timing.
    compile_metrics = warm_up(context, [
        functools.partial(step, student, optimizer, *item, autocast_dtype=autocast_dtype)
        for item in inputs[:WARM_UP_INPUTS]])

    def check():
        # The student itself, reset to the initial weights in place: the same module and
        # optimizer objects keep Dynamo's guards, so this runs the timed compiled code.
        student.load_state_dict(initial.state_dict())
        logits = step(student, optimizer, dense, indices, offsets, labels,
                      autocast_dtype=autocast_dtype)
        return (logits.detach(),) + after_step(student, indices, offsets)

    def reference():
        return reference_train_step(initial, rotating[0].batch, labels,
                                    reference_learning_rate)

    calls = [functools.partial(step, student, optimizer, *item, autocast_dtype=autocast_dtype)
             for item in inputs]
    return Prepared(
        run=cycling(calls), check=check, reference=reference, samples=workload.batch_size,
        error_bound=lambda expected: whole_model_bound(expected, precision),
        flops=3.0 * model_flops(workload, traffic),
        bytes_moved=sum(bytes_parts.values()),
        params={"layout": "per_table", "compile": "torch.compile(train_step)",
                "compile_mode": mode, "optimizer": "SGD", "lr": learning_rate,
                "autocast": precision if autocast_dtype is not None else "none",
                "rotation_batches": len(inputs)},
        metrics={"bytes_parts": bytes_parts, **rotation_metrics(rotation),
                 "model_bytes": model_bytes(student),
                 "compiled_graphs_at_build": _compiled_graphs() - graphs_before,
                 **compile_metrics},
    )


def build_compiled_infer(context: BuildContext) -> Prepared:
    """per_table inference of the calibrated teacher at a precision, through torch.compile."""
    _check_context(context)
    workload, device, precision = context.workload, context.device, context.precision
    fp32_model = teacher_model(workload, context.seed, embeddings="per_table")
    model = model_at_precision(fp32_model, precision, "per_table", device).eval()
    mode = compile_mode(context)
    compiled = torch.compile(model, mode=mode)
    rotation = model_rotation_plan(workload, precision)
    batches = rotating_batches(workload, context.seed, rotation["rotation_batches"])
    inputs = []
    for item in batches:
        dense, indices, offsets = batch_tensors(item, device)
        inputs.append((dense.to(input_dtype(precision)), indices, offsets))
    traffic = embedding_traffic(model, precision, inputs)
    bytes_parts = inference_bytes(model, precision, traffic)

    def infer(dense, indices, offsets):
        with torch.inference_mode():
            return compiled(dense, indices, offsets)

    graphs_before = _compiled_graphs()
    compile_metrics = warm_up(context, [functools.partial(infer, *item)  # the compile
                                        for item in inputs[:WARM_UP_INPUTS]])
    calls = [functools.partial(infer, *item) for item in inputs]
    return Prepared(
        run=cycling(calls), check=calls[0],
        forward=serving_forward(infer, precision),
        reference=lambda: reference_logits(fp32_model, *batch_tensors(batches[0], CPU)),
        samples=workload.batch_size,
        flops=model_flops(workload, traffic),
        bytes_moved=sum(bytes_parts.values()),
        params={"layout": "per_table", "compile": "torch.compile(model)",
                "compile_mode": mode, **precision_params(precision),
                "rotation_batches": len(inputs)},
        metrics={"model_bytes": model_bytes(model), "bytes_parts": bytes_parts,
                 **rotation_metrics(rotation),
                 "compiled_graphs_at_build": _compiled_graphs() - graphs_before,
                 **compile_metrics},
        error_bound=lambda expected: whole_model_bound(expected, precision),
    )


@impl("dlrm_train", "compiled", PRECISIONS, variants=compile_variants,
      pairs=dense_only, available=under_valgrind, gpu_memory_factors=HOST_BUILT_TRAINING,
      description="torch.compile of per_table's whole step (forward, backward, sparse SGD), "
                  "compiled at build")
def build_train_compiled(context: BuildContext) -> Prepared:
    """Training step of the per_table model through torch.compile."""
    return build_compiled_train(context)


@impl("dlrm_infer", "compiled", PRECISIONS, variants=compile_variants,
      gpu_memory_factors=HOST_BUILT_INFERENCE,
      pairs=dense_only, available=under_valgrind,
      description="torch.compile of per_table's inference forward, compiled at build")
def build_infer_compiled(context: BuildContext) -> Prepared:
    """Inference of the per_table model through torch.compile."""
    return build_compiled_infer(context)
