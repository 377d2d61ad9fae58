#!/usr/bin/env python
"""dlrm-bench: measure DLRM operators on this machine, write results.csv, env.json and a report."""

from __future__ import annotations

import sys

# The modules of pyproject.toml's dependencies: without one of them the project is not installed.
BASE_DEPENDENCIES = ("torch", "numpy", "pandas", "matplotlib", "scipy", "psutil", "cpuinfo",
                     "pynvml", "tqdm")
INSTALL_COMMAND = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ."


def run(argv: list[str]) -> int:
    """The command line, or one line naming a missing base dependency and the install (exit 2)."""
    try:
        from bench.commands import main

        return main(argv)
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if missing not in BASE_DEPENDENCIES:
            raise
        print(f"run_bench.py: error: {missing} is not installed for {sys.executable}; install "
              f"the project as the README says: {INSTALL_COMMAND} (then run "
              ".venv/bin/python run_bench.py)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
