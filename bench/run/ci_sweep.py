"""The CI-tagged sweep: a small, fast set of configurations that the regression check times."""

from __future__ import annotations

import datetime
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import PROJECT_ROOT
from bench.run import devices


# About 36 configurations, 30-60 s on one thread: both a tiny and a Kaggle-shaped workload (capped
# so tables build in a second), the ops every DLRM step runs, the two precisions most impls have.
# 0.3 s per configuration keeps the quick policy's >= 10 samples for the rank test, and one
# pinned thread removes thread-scheduling noise. Only options that every revision's CLI knows
# go here, since `check --ab REV` runs these arguments on an older checkout too.
# The ops are those registered with ci=True (see ci_sweep_args).
CI_SWEEP_OPTIONS: tuple[str, ...] = (
    "--workload", "smoke,kaggle",
    "--max-rows", "100000",
    "--precision", "fp32,bf16",
    "--sls-modes", "sum",
    "--fc-layers", "linear,top_mlp",
    "--min-run-time", "0.3",
    "--threads", "1",
    "--no-report",
)

# The CI check's thresholds (`check --ci`). On one pinned thread of a quiet machine a row's
# median moves ~3% between runs, but a shared CI runner's neighbours slow a whole run by up to
# 3x, and every sample of that run alike, so the rank test finds such shifts "significant":
# p-values do not protect against between-run drift, only the factor does. 0.5 flags a row only
# when its median is more than 1.5x the baseline's: gross regressions (a lost fast path, a
# layout copy in the hot loop, 2x and more) get through, everyday runner drift does not. alpha
# 0.001 makes a false flag from within-run noise alone rare over ~36 rows (at most ~0.04 per
# check). Smaller changes need `check --ab REV`, which interleaves both revisions on one runner
# so that drift hits both sides; tools/checker_power.py measures both rates.
CI_FACTOR = 0.5
CI_ALPHA = 0.001

# The instruction gate (`check --metric instructions`, run by .ci/run): the CI sweep's
# configurations counted under callgrind. Counts of unchanged code barely move between runs
# (see INSTRUCTION_FACTOR), so a tight factor alone decides, with no significance test.
# The smoke workload at its batch of 64 only: under Valgrind a Kaggle-batch (2048) fp32 top
# MLP took ~4 minutes here, and even at batch 64 the Kaggle-shaped rows took 40-100 s each
# (26 capped tables and their rotating index batches are built under Valgrind too), so the
# whole CI sweep ran ~15 minutes; its smoke half exercises the same kernels in ~3.
INSTRUCTION_SWEEP_OPTIONS: tuple[str, ...] = ("--metric", "instructions", "--workload", "smoke",
                                              "--batch-size", "64")
# Flag a row whose instructions per call grew by more than 5%. Set from A/A pairs of fresh
# instruction sweeps on this project's VM (README, "Regression checks"): most rows agree to
# 0.1%, but the multi-table SLS and cat rows moved by up to 1.6% between processes (with a
# fixed hash seed and the GC held off too), so 2% would leave almost no margin; 5% is 3x the
# largest A/A change seen and a fifth of a 25% slowdown.
INSTRUCTION_FACTOR = 0.05

DEFAULT_CI_ROOT = Path("results/ci")
LOG_FILENAME = "sweep.log"
STOP_GRACE_S = 5.0


class CiSweepError(Exception):
    """The CI sweep did not produce results; the message is one line."""


def new_run_id(prefix: str = "") -> str:
    """A timestamped, collision-resistant run directory name."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{prefix}{stamp}-{secrets.token_hex(2)}"


def ci_sweep_args() -> tuple[str, ...]:
    """The CI sweep's arguments: the ops registered with ci=True, then CI_SWEEP_OPTIONS."""
    from bench import registry

    ops = [name for name, op in registry.ops().items() if op.ci]
    return ("--ops", ",".join(ops), *CI_SWEEP_OPTIONS)


def sweep_command(out_dir: Path, run_id: str, extra_args: Sequence[str] = (),
                  python: str = sys.executable,
                  sweep_args: Sequence[str] | None = None) -> list[str]:
    """The command line of one CI sweep; extra_args come last, so they override sweep_args."""
    return [python, "run_bench.py", *(ci_sweep_args() if sweep_args is None else sweep_args),
            *extra_args, "--out", str(out_dir), "--run-id", run_id]


def _last_line(path: Path) -> str:
    """The last non-empty line of a log, for a one-line error."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def _stop(process: subprocess.Popen) -> None:
    """End an interrupted sweep gently first, so that it stops its own worker processes."""
    # A terminal's Ctrl-C has reached the sweep already: give it time to finish on its own,
    # then ask it to (SIGINT), then kill it.
    for step in (lambda: None, lambda: process.send_signal(signal.SIGINT), process.kill):
        step()
        try:
            process.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_ci_sweep(out_dir: str | os.PathLike, run_id: str, extra_args: Sequence[str] = (),
                 cwd: str | os.PathLike = PROJECT_ROOT, python: str = sys.executable,
                 sweep_args: Sequence[str] | None = None, label: str = "CI sweep") -> Path:
    """Run `python run_bench.py <CI args> <extra_args> --out OUT --run-id ID`; the run dir."""
    # A subprocess of the checkout at cwd (its own run_bench.py and bench package), so another
    # revision's worktree is timed the same way; its output goes to RUN_DIR/sweep.log, and a
    # failure (or no results.csv) raises CiSweepError. sweep_args replaces ci_sweep_args().
    run_dir = Path(out_dir) / run_id
    # The child runs elsewhere (cwd), so it gets an absolute output directory.
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / LOG_FILENAME
    command = sweep_command(Path(out_dir).resolve(), run_id, extra_args, python, sweep_args)
    # The checkout at cwd must win over an editable install of another checkout.
    environment = devices.with_import_root(dict(os.environ), Path(cwd).resolve())
    started = time.monotonic()
    print(f"{label}: running into {run_dir} (log: {log_path})", file=sys.stderr, flush=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            code = process.wait()
        except BaseException:
            _stop(process)
            raise
    # Exit 3 (commands.sweep.EXIT_SOME_ERRORED): some rows errored; check reports them as failing.
    if code not in (0, 3) or not (run_dir / "results.csv").is_file():
        raise CiSweepError(f"{label} failed (exit {code}) in {cwd}: "
                           f"{_last_line(log_path) or 'no output'}; log: {log_path}")
    print(f"{label}: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return run_dir
