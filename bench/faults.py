"""Faults that tests plant to prove a failure is caught: one spec, acted on at named sites."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

# What a fault does at its site.
CRASH = "crash"  # raise PlantedFaultError (the site's ordinary error handling sees it)
EXIT = "exit"  # end the process at once with EXIT_CODE: no goodbye, as a segfault would
HANG = "hang"  # sleep far past any timeout, as a deadlocked process would
SCALE = "scale"  # no failure: the site multiplies a setting by `value` (a wrong-result bug)
KINDS = (CRASH, EXIT, HANG, SCALE)

# Where the code looks for a planted fault; each site passes what it knows of its context.
SITES = {
    "dist.building": "a distributed rank, before it builds a configuration's model",
    "dist.checking": "a distributed rank, before its float64 check",
    "dist.embedding_lr": "torchrec_dmp's fused embedding learning rate (a SCALE)",
    "serve.batch": "a serving worker, before each batch (visit = batches served so far)",
}

EXIT_CODE = 70  # a planted EXIT's exit status
HANG_S = 3600.0


class PlantedFaultError(RuntimeError):
    """The error a planted CRASH raises."""


@dataclasses.dataclass(frozen=True)
class PlantedFault:
    """A fault at one site, for one configuration and rank, on one visit of the site."""

    site: str  # one of SITES
    kind: str  # one of KINDS
    task_key: str = ""  # only this configuration ("" = any)
    rank: Optional[int] = None  # only this rank (None = any)
    after: int = 0  # on the visit numbered this (the sites that count visits: serve.batch)
    value: float = 1.0  # a SCALE's factor

    def __post_init__(self):
        if self.site not in SITES:
            raise ValueError(f"planted fault: unknown site {self.site!r}; "
                             f"choose from {', '.join(SITES)}")
        if self.kind not in KINDS:
            raise ValueError(f"planted fault: unknown kind {self.kind!r}; "
                             f"choose from {', '.join(KINDS)}")

    @classmethod
    def parse(cls, text: str) -> "PlantedFault":
        """SITE:KIND[:AFTER], e.g. serve.batch:exit:5 (a command line's hidden option)."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()):
            raise ValueError(f"planted fault {text!r}: expected SITE:KIND[:AFTER]")
        return cls(parts[0], parts[1], after=int(parts[2]) if len(parts) == 3 else 0)

    def to_dict(self) -> dict:
        """The fault as JSON-ready values (a job file carries it to other processes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> Optional["PlantedFault"]:
        """Inverse of to_dict; None stays None (nothing planted)."""
        return cls(**values) if values else None


def trigger(fault: Optional[PlantedFault], site: str, task_key: str = "",
            rank: Optional[int] = None, visit: int = 0) -> float:
    """At a site: crash, exit or hang when the planted fault is for this site, configuration,
    rank and visit; returns its factor for a SCALE there, else 1.0."""
    if site not in SITES:
        raise ValueError(f"unknown fault site {site!r}")  # a typo would never fire
    if (fault is None or fault.site != site or (fault.task_key and fault.task_key != task_key)
            or (fault.rank is not None and fault.rank != rank) or fault.after != visit):
        return 1.0
    if fault.kind == CRASH:
        raise PlantedFaultError(f"planted crash at {site}")
    if fault.kind == EXIT:
        os._exit(EXIT_CODE)
    if fault.kind == HANG:
        time.sleep(HANG_S)
    return fault.value
