"""A task: one configuration to measure, serializable so a worker process can run it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Callable, TypeVar

from bench.records import dumps_compact
from workloads.specs import WorkloadSpec

Item = TypeVar("Item")


@dataclasses.dataclass(frozen=True)
class Task:
    """One (op, impl, workload, variant, precision, device, isa, threads) configuration."""

    op: str
    impl: str
    workload: WorkloadSpec
    variant: dict
    precision: str
    device: str
    isa: str
    threads: int
    seed: int
    options: dict = dataclasses.field(default_factory=dict)

    def key(self) -> str:
        """Stable identity across runs: what was measured, not when or how long."""
        identity = {
            "op": self.op, "impl": self.impl, "workload": self.workload.name,
            "shapes": self.workload.key(), "variant": self.variant,
            "precision": self.precision, "device": self.device, "isa": self.isa,
            "threads": self.threads, "batch_size": self.workload.batch_size, "seed": self.seed,
        }
        return hashlib.sha256(dumps_compact(identity).encode()).hexdigest()[:16]

    def group(self) -> tuple[str, str, int]:
        """Tasks sharing a worker process: same device, ISA level and thread count."""
        return (self.device, self.isa, self.threads)

    def to_json(self) -> str:
        """Serialize for a worker."""
        return json.dumps({**dataclasses.asdict(self), "workload": self.workload.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> "Task":
        """Inverse of to_json."""
        data = json.loads(text)
        data["workload"] = WorkloadSpec.from_dict(data["workload"])
        return cls(**data)


def worker_order(items: list[Item], task_of: Callable[[Item], Task] = lambda item: item
                 ) -> list[Item]:
    """Items in the order the workers run them: one worker group after another, and within a
    group one workload after another (each in order of first appearance), the order within a
    workload kept. A worker builds a workload's tables and inputs once for all the
    configurations on it, and drops them when the workload changes."""
    groups: dict[tuple, dict[WorkloadSpec, list[Item]]] = {}
    for item in items:
        task = task_of(item)
        groups.setdefault(task.group(), {}).setdefault(task.workload, []).append(item)
    return [item for workloads in groups.values() for batch in workloads.values()
            for item in batch]
