"""The settings every worker of a sweep shares, passed from the sweep down to each worker."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

from bench.run.callgrind import CountPolicy
from bench.run.timing import TimingPolicy

DEFAULT_TASK_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """The run, how rows are measured, where workers log, how long one task may take."""

    run_id: str
    policy: TimingPolicy
    # Set: workers run under callgrind and count instructions instead of timing.
    count_policy: Optional[CountPolicy] = None
    counting: Optional[dict] = None  # the counting facts rows' fingerprints record instead
    log_path: Optional[Path] = None  # the workers' stdout and stderr (None: not kept)
    task_timeout_s: float = DEFAULT_TASK_TIMEOUT_S

    @property
    def fingerprint_policy(self) -> Union[TimingPolicy, dict]:
        """What a fingerprint records of how rows were measured: the counting facts or timing."""
        # Instruction counts and times are never comparable, and neither depends on the
        # other's policy: an instruction run's fingerprint carries its counting facts instead.
        return self.counting if self.counting is not None else self.policy

    def to_json(self) -> str:
        """The settings as one JSON text (a worker's command line carries it)."""
        return json.dumps({
            "run_id": self.run_id, "policy": dataclasses.asdict(self.policy),
            "count_policy": (dataclasses.asdict(self.count_policy)
                             if self.count_policy is not None else None),
            "counting": self.counting,
            "log_path": str(self.log_path) if self.log_path is not None else None,
            "task_timeout_s": self.task_timeout_s})

    @classmethod
    def from_json(cls, text: str) -> "WorkerSettings":
        """Inverse of to_json."""
        values = json.loads(text)
        return cls(run_id=values["run_id"], policy=TimingPolicy(**values["policy"]),
                   count_policy=(CountPolicy(**values["count_policy"])
                                 if values["count_policy"] is not None else None),
                   counting=values["counting"],
                   log_path=Path(values["log_path"]) if values["log_path"] else None,
                   task_timeout_s=float(values["task_timeout_s"]))
