"""torchrec's DistributedModelParallel as the dist peer (impl torchrec_dmp) on gloo: its step
passes the float64 check, a planted wrong embedding rate fails it, a missing torchrec skips."""

from __future__ import annotations

import datetime
import json
import sys

import pytest
import torch
import torch.distributed as dist

from bench import peers
from bench.commands import dist as dist_command
from bench.distributed import rank as rank_module
from bench.distributed import torchrec_dmp
from bench.distributed.launch import run_job
from bench.faults import SCALE, PlantedFault
from bench.records import read_rows
from workloads.presets import _tables
from workloads.specs import WorkloadSpec


def workload() -> WorkloadSpec:
    """Four uneven tables, dim 8, a global batch of 12 (6 per rank)."""
    return WorkloadSpec(name="dmp-test", tables=_tables((3000, 200, 800, 50), 8, 3),
                        num_dense=4, bottom_mlp=(16, 8), top_mlp=(16, 1), batch_size=12)


def _configs(ranks: int, ops: str) -> list[dict]:
    args = dist_command.build_parser().parse_args(
        ["--nproc", str(ranks), "--ops", ops, "--impls", "torchrec_dmp", "--steps", "1",
         "--warmup-steps", "0"])
    return dist_command.configs(args, [workload()], ranks)


@pytest.mark.slow
def test_dmp_rows_pass_the_float64_check_and_a_planted_rate_fails_it(tmp_path):
    pytest.importorskip("fbgemm_gpu")
    pytest.importorskip("torchrec")
    items = _configs(2, "dlrm_train,dlrm_infer")
    faulty = {**items[0], "task_key": items[0]["task_key"] + "-planted",
              "params": {**items[0]["params"], "test_case": "planted"}}
    job = {"run_id": "test", "results": str(tmp_path / "results.csv"), "device": "cpu",
           "threads": 1, "configs": items + [faulty],
           # The fused embedding SGD of this one configuration runs at 2x the rate.
           "planted_fault": PlantedFault("dist.embedding_lr", SCALE, task_key=faulty["task_key"],
                                         value=2.0).to_dict()}
    run_job(job, tmp_path, 2, 1, "", 180.0, lambda config: rank_module.base_row(job, config))
    train, infer, planted = read_rows(tmp_path / "results.csv")
    for row, phases in ((train, torchrec_dmp.TRAIN_PHASES), (infer, torchrec_dmp.INFER_PHASES)):
        assert (row.impl, row.status) == ("torchrec_dmp", "ok"), row.error
        assert row.rel_error < 1e-5
        assert row.code_version == rank_module.TORCHREC_CODE_VERSION != rank_module.CODE_VERSION
        metrics = json.loads(row.metrics)
        assert set(metrics["phases_s"]) == set(phases)
        owners = {entry["table"]: entry["owner"] for entry in metrics["sharding_plan"]["tables"]}
        assert sorted(owners) == [0, 1, 2, 3] and set(owners.values()) == {0, 1}
        assert json.loads(row.params)["sharding"] == "table"
        assert "alltoall_bytes_per_rank" not in metrics  # not measured inside torchrec
    assert train.op == "dlrm_train" and infer.op == "dlrm_infer"
    assert planted.status == "error"
    assert "differs from the float64 single-process step" in planted.error
    assert "of part 3" in planted.error  # the updated rows (logits and MLPs still agree)


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group (run_model's collectives need one)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def test_missing_torchrec_is_a_skipped_row_naming_it(tmp_path, monkeypatch, one_rank_group):
    # Where they are installed, hide them (None in sys.modules makes their import fail);
    # elsewhere this is the real failure.
    monkeypatch.setitem(sys.modules, "fbgemm_gpu", None)
    monkeypatch.setitem(sys.modules, "torchrec", None)
    config = _configs(1, "dlrm_train")[0]
    job = {"run_id": "test", "configs": [config]}
    row = rank_module.run_model(job, 0, config, 0, rank_module.Status(str(tmp_path), 0))
    assert (row.status, row.impl) == ("skipped", "torchrec_dmp")
    assert "fbgemm_gpu is not available (ModuleNotFoundError" in row.error
    assert peers.PEERS_INSTALL in row.error


def test_dmp_configs_are_table_wise_and_not_skipped():
    for config in _configs(2, "dlrm_train,dlrm_infer"):
        assert config["sharding"] == "table" and "skip_reason" not in config
    assert torch.distributed.is_gloo_available()
