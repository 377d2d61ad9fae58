"""Running the public DLRM reference (dlrm_s_pytorch.py): its flags, its timing, its rows."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import PROJECT_ROOT
from bench.commands.common import UsageError
from bench.records import (STATUS_ERROR, STATUS_OK, ResultRow, dumps_compact, record_summary,
                           summarize, utc_timestamp)
from bench.run import devices
from bench.run.tasks import Task
from bench.run.timing import TimingPolicy
from workloads.specs import WorkloadSpec

REFERENCE_IMPL = "dlrm_reference"
SCRIPT_NAME = "dlrm_s_pytorch.py"
DATA_MODULE_NAME = "dlrm_data_pytorch.py"
MODE_OPS = {"train": "dlrm_train", "infer": "dlrm_infer"}
# The reference's precision: it runs fp32 only; its rows are fp32 rows of the op.
REFERENCE_PRECISION = "fp32"
REFERENCE_ISA = "native"  # no SIMD cap: the reference runs as a user would run it
LEARNING_RATE = 0.1  # as our dlrm_train impls (bench.ops.dlrm.LEARNING_RATE)
LOSS_FUNCTION = "bce"  # ours trains with BCE too
# The child marks its one result line, as the reference's module prints to stdout on import.
RESULT_MARKER = "DLRM_BENCH_RESULT "
# What the reference prints per iteration with --print-time --print-freq=1 (its run(), the
# "Finished {} it {}/{} of epoch {}, {:.2f} ms/it," line, then " loss {:.6f}" and optionally a
# wall-clock time). ms/it is the mean over the iterations since the last print: with
# --print-freq=1 each line is one iteration, timed from after the batch is loaded to after
# optimizer.step() (time.time()).
ITERATION_LINE = re.compile(
    r"^Finished (?P<kind>training|inference) it (?P<iteration>\d+)/(?P<total>\d+) of epoch "
    r"(?P<epoch>\d+), (?P<ms>-?\d+(?:\.\d+)?) ms/it,")
# What its run() prints once it has chosen a device: with --use-gpu but no GPU that torch can
# use, it falls back to the CPU and says so, and a CPU time must not pass for a GPU one.
DEVICE_LINE = re.compile(r"^Using (?:(?P<gpus>\d+) GPU\(s\)|CPU)\.\.\.", re.MULTILINE)


class ReferenceError(Exception):
    """The reference ran but gave no usable times; the message is one line."""


# ---------------------------------------------------------------- parsing its output

def parse_iteration_times(text: str) -> list[float]:
    """Seconds of each training iteration the reference printed, in order of iteration."""
    times = []
    for line in text.splitlines():
        match = ITERATION_LINE.match(line.strip())
        if not match:
            continue
        milliseconds = float(match["ms"])
        if milliseconds < 0:
            # It prints -1 when --print-time is missing: no timing, not a negative time.
            raise ReferenceError("the reference printed no timing (-1 ms/it): it needs "
                                 "--print-time")
        times.append(milliseconds / 1e3)
    return times


def check_device_line(text: str, device: str) -> None:
    """ReferenceError unless the reference says it ran where it was asked to: one GPU on cuda
    (the child sees that GPU alone), the CPU otherwise."""
    match = DEVICE_LINE.search(text)
    if match is None:
        return  # an older checkout that does not say; its flags asked for the device
    gpus = int(match["gpus"]) if match["gpus"] else 0
    wanted = 1 if is_cuda(device) else 0
    if gpus != wanted:
        said = f"{gpus} GPU(s)" if gpus else "the CPU"
        raise ReferenceError(f"the reference ran on {said}, asked for {device}")


# ---------------------------------------------------------------- the configuration

def is_cuda(device: str) -> bool:
    """Whether a (normalized) --device names a GPU."""
    return device.startswith("cuda")

def _single_pooling(spec: WorkloadSpec) -> int:
    """The one fixed lookups-per-bag count of every table (the reference has a single one)."""
    poolings = {(table.pooling.kind, table.pooling.mean) for table in spec.tables}
    if len(poolings) != 1 or next(iter(poolings))[0] != "fixed":
        raise UsageError(f"workload {spec.name}: the reference takes one fixed number of "
                         "lookups per bag for all tables (--num-indices-per-lookup-fixed); "
                         "this workload has "
                         + ", ".join(sorted(f"{kind}:{mean:g}" for kind, mean in poolings)))
    return int(next(iter(poolings))[1])


def check_workload(spec: WorkloadSpec) -> None:
    """Refuse a workload the reference cannot express."""
    if spec.interaction not in ("dot", "cat"):
        raise UsageError(f"workload {spec.name}: the reference has no {spec.interaction!r} "
                         "interaction (only dot and cat)")
    if len({table.dim for table in spec.tables}) != 1:
        raise UsageError(f"workload {spec.name}: the reference takes one embedding dim")
    if spec.bottom_mlp[-1] != spec.dim:
        raise UsageError(f"workload {spec.name}: the reference needs the bottom MLP to end at "
                         f"the embedding dim {spec.dim}, not {spec.bottom_mlp[-1]}")
    _single_pooling(spec)


def reference_arguments(spec: WorkloadSpec, iterations: int, seed: int,
                        device: str = "cpu") -> list[str]:
    """dlrm_s_pytorch.py flags for the workload: its random data, our shapes, one epoch; on
    a GPU its --use-gpu (the child sees that one GPU: see child_environment)."""
    dashed = lambda values: "-".join(str(int(value)) for value in values)  # noqa: E731
    return (["--use-gpu"] if is_cuda(device) else []) + [
        "--data-generation=random", "--print-time", "--print-freq=1", "--nepochs=1",
        f"--arch-sparse-feature-size={spec.dim}",
        f"--arch-mlp-bot={dashed((spec.num_dense, *spec.bottom_mlp))}",
        # The reference prepends the interaction's width to the top MLP itself.
        f"--arch-mlp-top={dashed(spec.top_mlp)}",
        f"--arch-embedding-size={dashed(table.rows for table in spec.tables)}",
        f"--arch-interaction-op={spec.interaction}",
        f"--num-indices-per-lookup={_single_pooling(spec)}",
        # Parsed as bool(str): any non-empty value means fixed.
        "--num-indices-per-lookup-fixed=True",
        f"--mini-batch-size={spec.batch_size}", f"--num-batches={iterations}",
        f"--loss-function={LOSS_FUNCTION}", f"--learning-rate={LEARNING_RATE}",
        f"--numpy-rand-seed={seed}",
    ]


def model_arguments(spec: WorkloadSpec) -> dict:
    """DLRM_Net's layer sizes as its run() derives them from the flags above."""
    features = len(spec.tables) + 1
    if spec.interaction == "dot":  # unique pairs, without self-interaction (its default)
        interactions = features * (features - 1) // 2 + spec.dim
    else:
        interactions = features * spec.dim
    return {"m_spa": spec.dim, "ln_emb": [table.rows for table in spec.tables],
            "ln_bot": [spec.num_dense, *spec.bottom_mlp],
            "ln_top": [interactions, *spec.top_mlp], "interaction": spec.interaction,
            "lookups": _single_pooling(spec), "batch_size": spec.batch_size}


def reference_task(spec: WorkloadSpec, op: str, threads: int, seed: int,
                   device: str = "cpu") -> Task:
    """The task whose key the reference's row carries: our rows' identity, impl dlrm_reference."""
    return Task(op=op, impl=REFERENCE_IMPL, workload=spec, variant={},
                precision=REFERENCE_PRECISION, device=device, isa=REFERENCE_ISA,
                threads=threads, seed=seed)


def code_version(repo: Path) -> str:
    """Hash of the reference's script and data module: another checkout is not comparable."""
    digest = hashlib.sha256(REFERENCE_IMPL.encode())
    for name in (SCRIPT_NAME, DATA_MODULE_NAME):
        path = repo / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def checkout_commit(repo: Path) -> str:
    """The checkout's git commit, or '' when it is not a git work tree."""
    result = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL)
    return result.stdout.strip() if result.returncode == 0 else ""


def pinned_cpus(threads: int, device: str = "cpu") -> list[int]:
    """The CPUs our workers pin to (bench.run.worker.pin_threads): the first `threads`, or
    every allowed one for a GPU worker (whose launching thread must not wait for cores)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed if is_cuda(device) else allowed[:threads]


def visible_gpu(device: str, environment: dict) -> str:
    """CUDA_VISIBLE_DEVICES for a child that is to see only GPU N of this process (cuda:N):
    the N-th of this process's own visible list when it has one."""
    index = int(device.partition(":")[2] or 0)
    inherited = [part.strip() for part in environment.get("CUDA_VISIBLE_DEVICES", "").split(",")
                 if part.strip()]
    return inherited[index] if index < len(inherited) else str(index)


def child_environment(threads: int, project_path: bool = False,
                      device: str = "cpu") -> dict[str, str]:
    """Our workers' environment: SIMD knobs uncapped, thread pools sized before torch loads;
    on a GPU that GPU alone visible; with project_path our packages importable (not for the
    reference's own script: its checkout has a top-level `bench` folder of its own)."""
    environment = devices.worker_environment(REFERENCE_ISA, threads,
                                             PROJECT_ROOT if project_path else None)
    if is_cuda(device):
        # With several GPUs visible the reference spreads its tables over all of them (its
        # ndevices = the GPU count); ours run on one.
        environment["CUDA_VISIBLE_DEVICES"] = visible_gpu(device, environment)
    return environment


def _run_child(command: list[str], threads: int, cwd: Path, timeout_s: float,
               project_path: bool = False, device: str = "cpu") -> str:
    """Run a child pinned to our workers' CPUs; its stdout, or ReferenceError."""
    cpus = pinned_cpus(threads, device)
    try:
        # sched_setaffinity in the child before exec: the reference never pins itself.
        result = subprocess.run(command, cwd=cwd,
                                env=child_environment(threads, project_path, device),
                                capture_output=True, text=True, timeout=timeout_s,
                                stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    except subprocess.TimeoutExpired:
        raise ReferenceError(f"timed out after {timeout_s:.0f} s") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise ReferenceError(f"exited with code {result.returncode}: {last}"[:500])
    return result.stdout


# ---------------------------------------------------------------- timing the reference

def time_training(repo: Path, spec: WorkloadSpec, options) -> list[float]:
    """Per-iteration seconds of the reference's own training loop, warm-up dropped."""
    total = options.warmup + options.iterations
    command = [options.python, str(repo / SCRIPT_NAME),
               *reference_arguments(spec, total, options.seed, options.device)]
    # A scratch folder: the reference writes TensorBoard files into its working directory.
    with tempfile.TemporaryDirectory(prefix="dlrm-reference-") as scratch:
        output = _run_child(command, options.threads, Path(scratch), options.child_timeout,
                            device=options.device)
    check_device_line(output, options.device)
    times = parse_iteration_times(output)
    if len(times) != total:
        raise ReferenceError(f"expected {total} 'Finished training it' lines, found "
                             f"{len(times)}")
    return times[options.warmup:]


def time_inference(repo: Path, spec: WorkloadSpec, options, policy: TimingPolicy) -> dict:
    """Samples of the reference model's forward, timed by bench.run.timing in a pinned child."""
    config = {"repo": str(repo.resolve()), **model_arguments(spec), "seed": options.seed,
              "threads": options.threads, "batches": options.infer_batches,
              "policy": policy.__dict__, "cuda": is_cuda(options.device)}
    with tempfile.TemporaryDirectory(prefix="dlrm-reference-") as scratch:
        config_path = Path(scratch) / "config.json"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        command = [options.python, "-m", "bench.commands.reference_run",
                   str(config_path)]
        output = _run_child(command, options.threads, Path(scratch), options.child_timeout,
                            project_path=True, device=options.device)
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise ReferenceError("the inference child printed no result line")


# ---------------------------------------------------------------- rows

def reference_row(spec: WorkloadSpec, mode: str, options, policy: TimingPolicy, run_id: str,
                  repo: Path, commit: str) -> ResultRow:
    """One round's row of the reference for a workload and mode (ok, or error with why)."""
    op, device = MODE_OPS[mode], options.device
    task = reference_task(spec, op, options.threads, options.seed, device)
    lookups = _single_pooling(spec)
    params = {
        "script": SCRIPT_NAME, "commit": commit, "run_mode": mode,
        "data": "the reference's random data (--data-generation=random): uniform indices, "
                "deduplicated and sorted within each bag, fresh batches each iteration",
        "lookups_per_bag": lookups,
    }
    if mode == "train":
        params.update({
            "timing": "the reference's own per-iteration time (--print-time --print-freq=1, "
                      "time.time() from the loaded batch to optimizer.step()"
                      + ("; with --use-gpu it synchronizes before each reading and the time "
                         "includes its copy of each batch to the GPU" if is_cuda(device) else "")
                      + f"), {options.warmup} warm-up iterations dropped",
            "optimizer": "SGD", "lr": LEARNING_RATE, "loss": LOSS_FUNCTION,
            "iterations": options.iterations, "warmup_iterations": options.warmup,
            "arguments": reference_arguments(spec, options.warmup + options.iterations,
                                             options.seed, device)})
    else:
        params.update({
            "timing": "its --inference-only prints no time: its DLRM_Net (built from its own "
                      "module with these shapes) forward timed by bench.run.timing "
                      + ("(CUDA events) in a child that sees this GPU alone, model and batches "
                         "moved to it as its --use-gpu run moves them"
                         if is_cuda(device) else "(torch.utils.benchmark) in a pinned child")
                      + ", autograd enabled as its inference runs, on batches from its own "
                        "RandomDataset",
            "rotation_batches": options.infer_batches})
    if is_cuda(device):
        params["visible_gpu"] = visible_gpu(device, dict(os.environ))
    row = ResultRow(
        run_id=run_id, task_key=task.key(), op=op, impl=REFERENCE_IMPL, is_baseline=False,
        code_version=code_version(repo), workload=spec.name, params=dumps_compact(params),
        device=device, device_name=devices.device_name(device), isa=REFERENCE_ISA,
        threads=options.threads, precision=REFERENCE_PRECISION, batch_size=spec.batch_size,
        fingerprint=devices.fingerprint(device, REFERENCE_ISA, options.threads, policy),
        timestamp=utc_timestamp())
    try:
        if mode == "train":
            samples, calls = time_training(repo, spec, options), 1
        else:
            measured = time_inference(repo, spec, options, policy)
            samples, calls = measured["samples_s"], int(measured["calls_per_sample"])
        summary = summarize(samples, calls)
    except (ReferenceError, ValueError, KeyError) as error:
        row.status, row.error = STATUS_ERROR, f"{REFERENCE_IMPL}: {error}"[:500]
        return row
    record_summary(row, summary)
    row.samples_per_s = spec.batch_size / summary.median_s if summary.median_s > 0 else math.nan
    row.metrics = dumps_compact({"noise_iqr_over_median": round(summary.iqr_s / summary.median_s,
                                                                4) if summary.median_s else None,
                                 "noisy": summary.noisy})
    row.status = STATUS_OK
    return row


# ---------------------------------------------------------------- the inference child

def _to(tensors, device):
    """A tensor, or a list of them (its lS_o and lS_i take either form), on device."""
    if isinstance(tensors, list):
        return [tensor.to(device) for tensor in tensors]
    return tensors.to(device)


def child_main(argv: list[str]) -> int:
    """`python -m bench.commands.reference_run CONFIG.json`: time the reference model's forward.

    Runs pinned (the parent's preexec) with the thread pools sized by the environment; builds
    the reference's own DLRM_Net and RandomDataset from its checkout, then times the forward
    through bench.run.timing as any impl of ours is timed, and prints one marked result line."""
    import functools
    import importlib

    import numpy as np
    import torch

    from bench.ops.common import cycling
    from bench.run import timing

    config = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    threads, seed, count = int(config["threads"]), int(config["seed"]), int(config["batches"])
    torch.set_num_threads(threads)
    sys.path.insert(0, config["repo"])
    module = importlib.import_module(Path(SCRIPT_NAME).stem)
    data = module.dp  # its data module, as its run() uses it
    # Its run() seeds numpy (weights and data come from np.random) and torch the same way.
    np.random.seed(seed)
    torch.manual_seed(seed)
    ln_emb = np.asarray(config["ln_emb"], dtype=np.int64)
    ln_bot = np.asarray(config["ln_bot"], dtype=np.int64)
    ln_top = np.asarray(config["ln_top"], dtype=np.int64)
    model = module.DLRM_Net(
        config["m_spa"], ln_emb, ln_bot, ln_top, arch_interaction_op=config["interaction"],
        arch_interaction_itself=False, sigmoid_bot=-1, sigmoid_top=ln_top.size - 2,
        sync_dense_params=True, loss_threshold=0.0,
        # Its run() passes -1 on the CPU and the GPU count (1 here) with --use-gpu.
        ndevices=1 if config.get("cuda") else -1, loss_function=LOSS_FUNCTION)
    batch_size = int(config["batch_size"])
    dataset = data.RandomDataset(
        int(ln_bot[0]), ln_emb, batch_size * count, count, batch_size, int(config["lookups"]),
        True, 1, False, "random", "", False, reset_seed_on_access=True, rand_seed=seed)
    # On a GPU as its run() does with --use-gpu and one visible GPU: the model moved to
    # cuda:0, the batches moved before the forward (outside the timing, as ours are).
    device = torch.device("cuda", 0) if config.get("cuda") else torch.device("cpu")
    model = model.to(device)
    calls = []
    for index in range(count):
        dense, offsets, indices, _targets = data.collate_wrapper_random_offset([dataset[index]])
        calls.append(functools.partial(model, dense.to(device), _to(offsets, device),
                                       _to(indices, device)))
    # Autograd stays on: the reference's inference() calls the model without no_grad.
    policy = TimingPolicy(**config["policy"])
    if device.type == "cuda":
        samples, calls_per_sample = timing.time_cuda(cycling(calls), policy, device, False), 1
    else:
        samples = timing.time_cpu(cycling(calls), policy, threads)
        calls_per_sample = samples.calls_per_sample
    print(RESULT_MARKER + json.dumps({"samples_s": [float(value) for value in samples],
                                      "calls_per_sample": calls_per_sample}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
