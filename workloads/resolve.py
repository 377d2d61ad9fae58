"""Command-line workload choices -> WorkloadSpecs (presets, synthetic, criteo:PATH)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from workloads import presets
from workloads.specs import IndexDistribution, PoolingDistribution, SpecError, WorkloadSpec

DEFAULT_WORKLOADS = "smoke,kaggle"
# The quick sweep caps kaggle's tables so that they build in a second (the output says so).
QUICK_MAX_ROWS = 100_000


def split(text: str) -> list[str]:
    """Comma-separated values, empty parts dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_numbers(text: str, kind: type = int) -> list:
    """Comma-separated numbers of one kind (int or float); ValueError on a part that is not one."""
    return [kind(value) for value in split(text)]


def whole_numbers(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers, or a SpecError naming the flag."""
    try:
        values = parse_numbers(text, int)
    except ValueError:
        raise SpecError(f"{flag} {text!r}: give positive whole numbers, e.g. 1,2") from None
    if not values or min(values) < 1:
        raise SpecError(f"{flag} {text!r}: values must be >= 1")
    return values


@dataclasses.dataclass(frozen=True)
class WorkloadChoices:
    """What the user chose on the command line, as text where it may be a list."""

    workloads: str = DEFAULT_WORKLOADS  # preset names, synthetic, criteo:PATH
    max_rows: Optional[int] = None  # cap on every table's rows
    dist: Optional[str] = None  # index distribution for every table
    batch_sizes: Optional[str] = None  # override the workloads' batch size(s)
    rows: str = "1000000"  # synthetic: rows per table (a list sweeps the footprint)
    dim: int = 64  # synthetic: embedding dim
    pooling: str = "32"  # synthetic: lookups per bag
    num_tables: int = 8  # synthetic: number of tables
    quick_defaults: bool = False  # cap kaggle at QUICK_MAX_ROWS when max_rows is not given
    # The devices the workloads run on: when every one is a GPU and batch_sizes is not given,
    # presets run at their GPU batch (presets.device_batch_size). A mixed list keeps the
    # presets' batches: one workload list serves every device of a sweep.
    devices: tuple[str, ...] = ("cpu",)


def resolve_workloads(choices: WorkloadChoices) -> list[WorkloadSpec]:
    """WorkloadSpecs for the choices, with the row cap, distribution and batch sizes applied."""
    if choices.max_rows is not None and choices.max_rows < 1:
        raise SpecError(f"--max-rows {choices.max_rows}: give a positive number of rows")
    distribution = IndexDistribution.parse(choices.dist) if choices.dist else None
    batch_sizes = (whole_numbers(choices.batch_sizes, "--batch-size") if choices.batch_sizes
                   else [None])
    gpus_only = all(device.startswith("cuda") for device in choices.devices)
    batch_device = "cuda" if gpus_only and choices.devices else "cpu"
    specs = []
    for name in split(choices.workloads or DEFAULT_WORKLOADS):
        if name == "synthetic":
            pooling = PoolingDistribution.parse(choices.pooling)
            bases = [presets.synthetic(rows, choices.dim, pooling, choices.num_tables,
                                       distribution or IndexDistribution())
                     for rows in whole_numbers(str(choices.rows), "--rows")]
        elif name.startswith("criteo:"):
            from workloads.criteo_workload import criteo_workload

            bases = [criteo_workload(name.partition(":")[2])]
        else:
            bases = [presets.preset(name)]
        max_rows = choices.max_rows
        if max_rows is None and choices.quick_defaults and name == "kaggle":
            max_rows = QUICK_MAX_ROWS
        for base in bases:
            spec = base.capped(max_rows).with_distribution(distribution)
            if choices.batch_sizes is None:
                spec = spec.with_batch_size(presets.device_batch_size(spec, batch_device))
            specs.extend(spec.with_batch_size(batch_size) for batch_size in batch_sizes)
    return specs
