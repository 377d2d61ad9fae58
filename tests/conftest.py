"""Shared helpers for the measuring-core tests: tiny workloads, a fast timing policy, the CLI."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"
if str(REPO_ROOT) not in sys.path:  # the bare `pytest` script does not put the root on the path
    sys.path.insert(0, str(REPO_ROOT))

from bench.records import ResultsWriter  # noqa: E402
from bench.run.timing import TimingPolicy  # noqa: E402
from workloads.specs import (IndexDistribution, PoolingDistribution, TableSpec,  # noqa: E402
                             WorkloadSpec)

# Short enough that run_task finishes in a fraction of a second; tests never check speed.
FAST_POLICY = TimingPolicy(min_run_time_s=0.01, min_samples=3, max_run_time_s=1.0,
                           warmup_calls=1)


def write_run(directory: Path, rows, env: Optional[dict] = None,
              args: Optional[dict] = None) -> Path:
    """A run directory as run_bench.py writes it: results.csv, env.json and args.json."""
    directory.mkdir(parents=True, exist_ok=True)
    with ResultsWriter(directory / "results.csv") as writer:
        for row in rows:
            writer.write(row)
    (directory / "env.json").write_text(json.dumps(env or {}), encoding="utf-8")
    (directory / "args.json").write_text(json.dumps(args or {}), encoding="utf-8")
    return directory


def tiny_workload(name: str = "tiny", rows=(300, 120, 500), dim: int = 8,
                  pooling: PoolingDistribution = PoolingDistribution("fixed", 3.0),
                  distribution: IndexDistribution = IndexDistribution(),
                  interaction: str = "dot", batch_size: int = 16) -> WorkloadSpec:
    """A DLRM-shaped workload small enough to build every op in milliseconds."""
    tables = tuple(TableSpec(rows=count, dim=dim, pooling=pooling, distribution=distribution)
                   for count in rows)
    return WorkloadSpec(name=name, tables=tables, num_dense=5, bottom_mlp=(12, dim),
                        top_mlp=(10, 1), interaction=interaction, batch_size=batch_size)


def run_cli(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run `python run_bench.py ARGS` from the repository root."""
    return subprocess.run([sys.executable, "run_bench.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fast_policy() -> TimingPolicy:
    """The timing policy tests give run_task."""
    return FAST_POLICY


@contextlib.contextmanager
def triton_interpreter():
    """TRITON_INTERPRET=1 within the block (Triton reads it when a kernel module is imported,
    so the kernels run on the CPU), the previous value restored after."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


# Triton's own language helpers (the combine functions of tl.sum, ...) are jit functions made
# when triton is first imported: interpreted or compiled by TRITON_INTERPRET at that moment. Some
# torch modules import triton (torch.utils.flop_counter does), so without a GPU triton is
# imported here, under the interpreter, before any test module can: otherwise the interpreter
# tests fail whenever such a module happens to be collected first.
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    with triton_interpreter():
        import triton  # noqa: E402, F401

