"""Explicit registry of operators and their implementations; each impl builds a timed closure."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import pkgutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")

# Largest relative L2 error against the float64 reference that still counts as a correct
# result at each precision. Wide enough for the format's rounding (bf16 keeps 8 bits of
# mantissa, int4 row-wise keeps 16 levels a row), narrow enough to catch a wrong kernel.
# A global L2 alone lets one broken bag of thousands through, so every row is also held to a
# bound (Prepared.error_bound, else this tolerance per row; see bench/compare_outputs.py).
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2, "int8": 3e-2, "int4": 0.25}

# A GPU run's (device, host) bytes per byte of fp32 tables: one pair for every precision, or
# pairs by precision with "*" for the others.
GpuMemoryFactors = Union[tuple[float, float], dict[str, tuple[float, float]]]


def factors_at(factors: GpuMemoryFactors, precision: Optional[str]) -> tuple[float, float]:
    """The (device, host) pair of factors at a precision; without one, the leanest pair (a
    workload fits some configuration of the impl if it fits that)."""
    if isinstance(factors, tuple):
        return factors
    if precision is None:
        return min(factors.values())
    return factors.get(precision, factors["*"])


class Unsupported(Exception):
    """Raised by a builder for a combination it cannot run; the message becomes the skip reason."""


@dataclasses.dataclass
class Prepared:
    """What an impl's builder returns: the closure to time and what to check it against."""

    run: Callable[[], Any]  # the timed closure; never reads a clock
    reference: Callable[[], Any]  # float64 expected output of `check`
    samples: int  # model samples (batch items) processed per call of run
    flops: float  # per call, by formula
    bytes_moved: float  # per call, by formula: compulsory memory traffic
    check: Optional[Callable[[], Any]] = None  # output to compare; defaults to run
    params: dict = dataclasses.field(default_factory=dict)  # shapes and choices to record
    metrics: dict = dataclasses.field(default_factory=dict)  # extra measured quantities
    tolerance: Optional[float] = None  # overrides TOLERANCE[precision]
    # (float64 expected output) -> bound on |check - reference| per element (tensor or parts,
    # broadcastable), from the format's rounding and the reference's magnitudes (see
    # bench/compare_outputs.py); None: the tolerance times each row's RMS.
    error_bound: Optional[Callable[[Any], Any]] = None
    accuracy: Optional[Callable[[], dict]] = None  # model-level quality (auc, logloss...)
    flush_between_reps: bool = False  # GPU: evict L2 between repetitions (lookup ops)
    # Whole-model inference: the function `check` runs, on any batch (fp32 dense as
    # batch_tensors makes it, indices and offsets per table) -> logits; serving (bench/serve)
    # feeds it the batches it forms.
    forward: Optional[Callable[..., Any]] = None


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """Everything a builder needs: the workload, the variant and the numeric/device choices."""

    workload: Any  # workloads.specs.WorkloadSpec
    variant: dict
    precision: str
    device: Any  # torch.device
    seed: int
    options: dict = dataclasses.field(default_factory=dict)  # op-specific CLI options
    # (fn, count) -> seconds of each of count calls of fn, from the measuring clock (the worker
    # passes bench.run.timing.time_each_call): builders time one-off phases with it (a
    # compile), apart from the timed closure. None: the phase is not timed.
    time_calls: Optional[Callable[[Callable[[], Any], int], list[float]]] = None


@dataclasses.dataclass(frozen=True)
class Impl:
    """One way of computing an op."""

    op: str
    name: str
    build: Callable[[BuildContext], Prepared]
    precisions: tuple[str, ...]
    baseline: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    description: str = ""
    # options -> this impl's own variant params, each crossed with the op's variants (e.g.
    # torch.compile modes); {} adds nothing. None: the op's variants only.
    variants: Optional[Callable[[dict], list[dict]]] = None
    # Plan-time facts: the planner leaves out (or plans as a skip row) what cannot run, without
    # building anything; the builder's Unsupported stays the safety net for what they miss.
    # top-level modules that must be installed (find_spec) -> the command that installs them
    requires: dict = dataclasses.field(default_factory=dict)
    # (device, options) -> why this impl cannot run there with these options, or ""
    available: Optional[Callable[[str, dict], str]] = None
    # (variant, device, options) -> why this impl cannot run one of its op's variants, or ""
    pairs: Optional[Callable[[dict, str, dict], str]] = None
    # device type -> the precisions it runs there, where fewer than `precisions`
    device_precisions: dict = dataclasses.field(default_factory=dict)
    # A GPU run's (device, host) bytes per byte of fp32 tables where this impl holds more or
    # less than its op says (Op.gpu_memory_factors, same forms); None: the op's.
    gpu_memory_factors: Optional["GpuMemoryFactors"] = None

    @property
    def code_version(self) -> str:
        """Hash of the builder's whole module source: results from changed code are not
        comparable. The module, not the function, because builders share helpers there."""
        source = inspect.getsource(inspect.getmodule(self.build)) + self.name
        return hashlib.sha256(source.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Op:
    """An operator family: its variants for a workload and its impls."""

    name: str
    description: str
    variants: Callable[[Any, dict], list[dict]]  # (workload, options) -> variant params
    precision_agnostic: bool = False  # measured once, at fp32 (machine-ceiling probes)
    default: bool = True  # part of a sweep when --ops is not given
    # Bytes one configuration holds at its peak per byte of the workload's fp32 tables: the
    # worker's cached weights (shared by a workload's configurations), the build's clone, and
    # the impl's working copies (precision, concatenated, huge-page or TBE copies). The worker
    # frees a finished configuration before the next build, so the planner's memory check
    # takes the worst op's factor, not a sum.
    memory_factor: float = 0.0
    single_table: bool = False  # looks up only the workload's largest table (else every table)
    probe: bool = False  # measures the machine, not a workload: run once per worker group
    ci: bool = False  # part of the CI regression sweep (bench/run/ci_sweep.py)
    report_order: int = 100  # position in reports (pipeline order: lookups before models)
    # A GPU run's (device, host) bytes per byte of fp32 tables: what the build makes on the
    # device, and what it still holds on the host; one pair, or pairs by precision with "*"
    # for the rest (factors_at); None: (memory_factor, 0). An impl may differ
    # (Impl.gpu_memory_factors).
    gpu_memory_factors: Optional["GpuMemoryFactors"] = None

    def __post_init__(self):
        if self.memory_factor < 0:
            raise ValueError(f"op {self.name!r}: memory_factor must be >= 0")


_OPS: dict[str, Op] = {}
_IMPLS: dict[str, dict[str, Impl]] = {}


def register_op(op: Op) -> Op:
    """Add an op; a duplicate name is a programming error."""
    if op.name in _OPS:
        raise ValueError(f"op {op.name!r} registered twice")
    _OPS[op.name] = op
    _IMPLS.setdefault(op.name, {})
    return op


def impl(op: str, name: str, precisions: tuple[str, ...], baseline: bool = False,
         devices: tuple[str, ...] = ("cpu", "cuda"), description: str = "",
         variants: Optional[Callable[[dict], list[dict]]] = None,
         requires: Optional[dict] = None,
         available: Optional[Callable[[str, dict], str]] = None,
         pairs: Optional[Callable[[dict, str, dict], str]] = None,
         device_precisions: Optional[dict] = None,
         gpu_memory_factors: Optional["GpuMemoryFactors"] = None):
    """Decorator registering a builder as an impl of op (plan-time facts: see Impl)."""
    def register(build: Callable[[BuildContext], Prepared]) -> Callable[[BuildContext], Prepared]:
        # The op may be registered by a module imported later (a peer module such as
        # ops/fbgemm.py adds impls to ops of sls.py); load_all checks that it exists.
        _IMPLS.setdefault(op, {})
        if name in _IMPLS[op]:
            raise ValueError(f"impl {op}/{name} registered twice")
        unknown = set(precisions) - set(PRECISIONS)
        if unknown:
            raise ValueError(f"impl {op}/{name}: unknown precisions {sorted(unknown)}")
        if baseline and any(other.baseline for other in _IMPLS[op].values()):
            raise ValueError(f"op {op!r} already has a baseline impl")
        _IMPLS[op][name] = Impl(op, name, build, tuple(precisions), baseline, devices,
                                description or (build.__doc__ or "").strip(), variants,
                                dict(requires or {}), available, pairs,
                                dict(device_precisions or {}), gpu_memory_factors)
        return build
    return register


def add_op_directory(directory: Union[str, os.PathLike]) -> None:
    """Also discover op modules in directory (imported as bench.ops.<name>, as if they were
    in bench/ops); sweep workers are told of it too. Tests write throw-away ops there."""
    import bench.ops

    path = str(Path(directory).resolve())
    if path not in bench.ops.__path__:
        bench.ops.__path__.append(path)


def op_directories() -> list[str]:
    """The directories added by add_op_directory, in the order they were added."""
    import bench.ops

    home = str(Path(bench.ops.__file__).resolve().parent)
    return [path for path in bench.ops.__path__ if str(Path(path).resolve()) != home]


def load_all() -> None:
    """Import every module of the bench.ops package (found by a scan of its directory and any
    added by add_op_directory) so its registrations run."""
    import bench.ops

    for module in pkgutil.iter_modules(bench.ops.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"bench.ops.{module.name}")
    orphans = {op: sorted(found) for op, found in _IMPLS.items() if op not in _OPS}
    if orphans:
        raise ValueError(f"impls name ops that no module registers: {orphans}")


def facts() -> dict[str, dict]:
    """What reports need to know of each op, recorded in a run's args.json (reports load no
    torch, so they cannot ask the registry)."""
    return {name: {"report_order": op.report_order, "probe": op.probe,
                   "single_table": op.single_table}
            for name, op in ops().items()}


# What a plan-time refusal concerns; the planner decides from it whether the user asked for
# the configuration by name (bench/run/sweep.py).
ABOUT_IMPL = "impl"  # the impl cannot run here at all: wrong device, missing module, options
ABOUT_PRECISION = "precision"  # the impl has no kernel at this precision
ABOUT_VARIANT = "variant"  # the impl cannot run this one of its op's own variants


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a configuration cannot run, known before anything is built."""

    about: str  # ABOUT_IMPL, ABOUT_PRECISION or ABOUT_VARIANT
    reason: str  # the skip row's reason
    short: str  # the same without the impl's name, for a summary grouped by reason


def missing_module(name: str) -> bool:
    """Whether a top-level module cannot be found; imports nothing."""
    return importlib.util.find_spec(name) is None


def refusal(entry: Impl, variant: dict, precision: str, device: str,
            options: dict) -> Optional[Refusal]:
    """Why entry cannot run this configuration, from registry facts alone; None if it may.
    Cheap: builds nothing and imports nothing (the planner asks it for every configuration)."""
    subject = f"{entry.op}/{entry.name}"
    device_type = device.split(":")[0]
    if device_type not in entry.devices:
        return Refusal(ABOUT_IMPL, f"{subject} does not run on {device} "
                       f"({'/'.join(entry.devices)} only)", f"does not run on {device}")
    reason = entry.available(device, options) if entry.available else ""
    if reason:
        return Refusal(ABOUT_IMPL, f"{subject}: {reason}", reason)
    for module, install in entry.requires.items():
        if missing_module(module):
            return Refusal(ABOUT_IMPL, f"{subject} needs {module}, which is not installed here; "
                           f"install it with: {install}",
                           f"{module} is not installed (install it with: {install})")
    on_device = [name for name in entry.precisions
                 if name in entry.device_precisions.get(device_type, entry.precisions)]
    if precision not in on_device:
        where = "" if precision not in entry.precisions else f" on {device_type}"
        return Refusal(ABOUT_PRECISION,
                       f"{subject} has no {precision} kernel{where}; it supports "
                       f"{', '.join(on_device)}{where}", f"no {precision} kernel{where}")
    reason = entry.pairs(variant, device, options) if entry.pairs else ""
    if reason:
        return Refusal(ABOUT_VARIANT, f"{subject}: {reason}", reason)
    return None


def reason_of(check: Callable[..., Any], *args: Any) -> str:
    """A plan-time predicate from a builder's own check: its Unsupported message, or ''."""
    try:
        check(*args)
    except Unsupported as error:
        return str(error)
    return ""


def ops() -> dict[str, Op]:
    """All registered ops by name, in report order."""
    load_all()
    return dict(sorted(_OPS.items(), key=lambda item: (item[1].report_order, item[0])))


def impls(op: str) -> dict[str, Impl]:
    """The impls of one op by name."""
    load_all()
    return dict(_IMPLS[op])


def baseline_of(op: str) -> Impl:
    """The impl flagged as the op's baseline."""
    return next(entry for entry in impls(op).values() if entry.baseline)
