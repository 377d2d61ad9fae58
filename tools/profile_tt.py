"""torch.profiler table of one TT op's timed closure: what remains when a target is missed."""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench.registry import BuildContext, impls
from workloads import presets
from workloads.specs import IndexDistribution


def main(argv: list[str]) -> int:
    """Build op/impl on a preset as the sweep does, run it, print the profiler's op table."""
    parser = argparse.ArgumentParser(prog="tools/profile_tt.py", description=__doc__)
    parser.add_argument("--op", default="tt_sls", choices=("tt_sls", "dlrm_train"))
    parser.add_argument("--impl", default="tt_fused")
    parser.add_argument("--workload", default="kaggle")
    parser.add_argument("--dist", default="zipf:1.05")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tt-tables", type=int, default=7, help="dlrm_train only")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rows", type=int, default=30, help="rows of the printed table")
    args = parser.parse_args(argv)
    # One thread, as the speed figures are measured.
    torch.set_num_threads(1)
    workload = presets.preset(args.workload).with_distribution(
        IndexDistribution.parse(args.dist))
    variant = ({"rank": args.rank} if args.op == "tt_sls"
               else {"tt_tables": args.tt_tables, "tt_rank": args.rank})
    context = BuildContext(workload=workload, variant=variant, precision="fp32",
                           device=torch.device("cpu"), seed=0, options={})
    prepared = impls(args.op)[args.impl].build(context)
    for _ in range(3):  # warm-up outside the profile
        prepared.run()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.calls):
            prepared.run()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
