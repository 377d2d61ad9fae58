"""Hybrid-parallel DLRM over torchrun/gloo: the distributed step equals one process's step,
and a rank that crashes or hangs becomes an error row naming it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench.commands import dist as dist_command
from bench.faults import CRASH, HANG, PlantedFault
from bench.distributed.launch import run_job
from bench.distributed.plan import REPLICATED, ROW_WISE, plan_sharding
from bench.distributed.rank import base_row
from bench.records import read_rows
from workloads.presets import _tables
from workloads.specs import WorkloadSpec

pytestmark = pytest.mark.slow
REPLICATE_BELOW = 8192  # so that the small test tables include replicated ones


def workload() -> WorkloadSpec:
    """Five uneven tables: at 2 ranks auto puts table 0 row-wise, 1 and 3 replicated."""
    return WorkloadSpec(name="dist-test", tables=_tables((3000, 200, 800, 50, 1500), 8, 3),
                        num_dense=4, bottom_mlp=(16, 8), top_mlp=(16, 1), batch_size=12)


def _configs(tmp_path, ranks: int, shardings, dump: bool = True) -> list[dict]:
    items = []
    for sharding in shardings:
        args = dist_command.build_parser().parse_args(
            ["--nproc", str(ranks), "--ops", "dlrm_train", "--sharding", sharding,
             "--steps", "1", "--warmup-steps", "0"])
        for config in dist_command.configs(args, [workload()], ranks):
            config["replicate_below_bytes"] = REPLICATE_BELOW
            config["params"]["test_case"] = sharding  # distinct task keys per sharding
            config["task_key"] += sharding
            if dump:
                folder = tmp_path / f"state-{ranks}-{sharding}"
                folder.mkdir()
                config["state_dump_dir"] = str(folder)
            items.append(config)
    return items


def _run(tmp_path, ranks: int, items, timeout_s: float = 120.0, **extra) -> list:
    job = {"run_id": "test", "results": str(tmp_path / "results.csv"), "device": "cpu",
           "threads": 1, "configs": items, **extra}
    run_job(job, tmp_path, ranks, 1, "", timeout_s, lambda config: base_row(job, config))
    return read_rows(tmp_path / "results.csv")


def _single_process_step():
    """The same global batch through one process's DLRM (bench/models/dlrm.py) and SGD."""
    from bench.distributed.hybrid import global_batch
    from bench.models.dlrm import batch_tensors, build_dlrm
    from bench.ops.dlrm import train_step

    model = build_dlrm(workload(), 0, embeddings="per_table", sparse=True)
    batch, labels = global_batch(workload(), 0, 0)
    dense, indices, offsets = batch_tensors(batch, torch.device("cpu"))
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), dense, indices, offsets,
               torch.from_numpy(labels))
    return model


def _assert_same_as_single_process(folder, ranks: int, expected) -> None:
    states = [torch.load(folder / f"rank{rank}.pt") for rank in range(ranks)]
    for table, bag in enumerate(expected.embeddings.bags):
        reference = bag.weight.detach()
        assembled = torch.full_like(reference, float("nan"))
        for state in states:
            for shard_table, start, rows in state["shards"]:
                if shard_table == table:
                    assembled[start:start + rows.shape[0]] = rows
        assert not torch.isnan(assembled).any(), f"table {table}: rows held by no rank"
        torch.testing.assert_close(assembled, reference, rtol=1e-5, atol=1e-6)
    parameters = dict(expected.named_parameters())
    for state in states:  # every rank's MLP replica
        for name in ("bottom.0.weight", "bottom.2.weight", "top.0.weight", "top.2.weight"):
            torch.testing.assert_close(state["dense"][name], parameters[name].detach(),
                                       rtol=1e-5, atol=1e-6)


def test_plan_kinds_and_balance():
    sizes = [table.rows for table in workload().tables]
    plan = plan_sharding(sizes, 8, 2, "auto", replicate_below_bytes=REPLICATE_BELOW)
    assert [p.table for p in plan.of_kind(ROW_WISE)] == [0]
    assert [p.table for p in plan.of_kind(REPLICATED)] == [1, 3]
    table_plan = plan_sharding(sizes, 8, 3, "table")
    assert sorted(t for rank in range(3) for t in table_plan.owned_by(rank)) == [0, 1, 2, 3, 4]


def test_two_ranks_equal_single_process(tmp_path):
    rows = _run(tmp_path, 2, _configs(tmp_path, 2, ["table", "row", "auto"]))
    assert [row.status for row in rows] == ["ok"] * 3, [row.error for row in rows]
    expected = _single_process_step()
    for sharding in ("table", "row", "auto"):
        _assert_same_as_single_process(tmp_path / f"state-2-{sharding}", 2, expected)
    phases = json.loads(rows[0].metrics)["phases_s"]
    assert set(phases) >= {"lookup", "alltoall_forward", "mlp_forward", "mlp_backward",
                           "allreduce", "alltoall_backward", "optimizer"}


def test_three_ranks_uneven_and_a_crashing_rank(tmp_path):
    crash = _configs(tmp_path, 3, ["row"], dump=False)
    items = crash + _configs(tmp_path, 3, ["table", "auto"])
    fault = PlantedFault("dist.checking", CRASH, task_key=crash[0]["task_key"], rank=1)
    rows = _run(tmp_path, 3, items, planted_fault=fault.to_dict())
    by_case = {json.loads(row.params)["test_case"]: row for row in rows}
    assert by_case["row"].status == "error"
    assert "rank 1" in by_case["row"].error and "planted crash" in by_case["row"].error
    assert by_case["table"].status == by_case["auto"].status == "ok"
    expected = _single_process_step()
    for sharding in ("table", "auto"):
        _assert_same_as_single_process(tmp_path / f"state-3-{sharding}", 3, expected)


def test_hanging_rank_ends_the_job(tmp_path):
    items = _configs(tmp_path, 2, ["table"], dump=False)
    fault = PlantedFault("dist.building", HANG, task_key=items[0]["task_key"], rank=0)
    # The progress timeout also covers the ranks' start-up (torch import, process group),
    # which takes well over 8 s on a loaded 2-CPU machine.
    rows = _run(tmp_path, 2, items, timeout_s=30.0, planted_fault=fault.to_dict())
    assert rows[0].status == "error" and "rank 0 hung at building" in rows[0].error
    for path in (tmp_path / "status").glob("rank*.json"):  # no rank is left running
        with pytest.raises(ProcessLookupError):
            os.kill(json.loads(path.read_text())["pid"], 0)
