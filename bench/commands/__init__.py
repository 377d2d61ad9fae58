"""The top floor: run_bench.py's command line, one module per subcommand; nothing imports it."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

from bench.commands.common import EXIT_INTERRUPTED, EXIT_USAGE, UsageError
from bench.records import SchemaError
from bench.run.devices import DeviceError
from workloads.criteo import CriteoFormatError
from workloads.specs import SpecError

# Subcommand -> (module of this package with a main(argv) -> exit code, what it does); anything
# else is a sweep. Modules load on demand, so that `check` and `report` never import torch.
SUBCOMMANDS = {
    "report": ("report", "build the HTML report of run directories"),
    "check": ("check", "regression verdicts against a baseline, or an A/B of two revisions"),
    "analyze": ("analyze", "reuse distances of a workload's index trace"),
    "tt-study": ("tt_study", "TT-Rec size against accuracy, trained over seeds"),
    "locality": ("locality", "predicted cache hit rates against sls speed"),
    "reference": ("reference", "the public DLRM reference beside our impls"),
    "dist": ("dist", "hybrid-parallel DLRM and collectives over torchrun ranks"),
    "serve": ("serve", "DLRM inference under MLPerf LoadGen"),
}

# Bad input of any kind: one line on stderr and exit 2.
INPUT_ERRORS = (UsageError, SpecError, DeviceError, SchemaError, CriteoFormatError)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; bad input is one line on stderr and exit 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    subcommand = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    program = f"run_bench.py {subcommand}" if subcommand else "run_bench.py"
    try:
        if subcommand:
            module = importlib.import_module(f"bench.commands.{SUBCOMMANDS[subcommand][0]}")
            return module.main(argv[1:])
        from bench.commands import sweep

        return sweep.main(argv)
    except INPUT_ERRORS as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
