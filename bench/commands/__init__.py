"""The top floor: run_bench.py's command line, one module per subcommand; nothing imports it."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

from bench.records import SchemaError
from bench.run.devices import DeviceError
from workloads.criteo import CriteoFormatError
from workloads.specs import SpecError

# Subcommand -> module of this package with a main(argv) -> exit code; anything else is a sweep.
# Modules load on demand, so that `check` and `report` never import torch.
SUBCOMMANDS = {"report": "report", "check": "check", "analyze": "analyze",
               "tt-study": "tt_study", "locality": "locality"}
SUBCOMMANDS["reference"] = "reference"  # the public DLRM reference beside ours (issue 12)
SUBCOMMANDS["dist"] = "dist"  # hybrid-parallel DLRM over torchrun ranks (issue 13)
SUBCOMMANDS["serve"] = "serve"  # MLPerf LoadGen serving (issue 14)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit 2."""


# Bad input of any kind: one line on stderr and exit 2.
INPUT_ERRORS = (UsageError, SpecError, DeviceError, SchemaError, CriteoFormatError)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; bad input is one line on stderr and exit 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            command = importlib.import_module(f"bench.commands.{SUBCOMMANDS[argv[0]]}")
            return command.main(argv[1:])
        from bench.commands import sweep

        return sweep.main(argv)
    except INPUT_ERRORS as error:
        print(f"run_bench.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("run_bench.py: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
