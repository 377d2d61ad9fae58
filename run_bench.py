#!/usr/bin/env python
"""dlrm-bench: measure DLRM operators on this machine, write results.csv, env.json and a report."""

from __future__ import annotations

import sys

from bench.commands import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
