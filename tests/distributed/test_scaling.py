"""The scaling model (PREDICTIONS from measured phases and a link) and the report's dist tables."""

from __future__ import annotations

import json

import pytest

from bench.distributed import collectives, scaling
from bench.records import ResultRow, dumps_compact
from reports import dist as dist_report
from workloads.presets import PRESETS

PHASES_1 = {"lookup": 0.004, "lookup_backward": 0.002, "mlp_forward": 0.01,
            "mlp_backward": 0.02, "optimizer": 0.003, "alltoall_forward": 0.0001,
            "alltoall_backward": 0.0001, "allreduce": 0.0001}


def test_nccl_tests_bus_factors():
    assert collectives.bus_factor("alltoall", 4) == pytest.approx(0.75)
    assert collectives.bus_factor("allreduce", 4) == pytest.approx(1.5)
    assert collectives.bandwidths("allreduce", 2e9, 1.0, 2)["busbw_gbps"] == pytest.approx(2.0)


def test_link_fit_recovers_alpha_and_beta():
    points = [(size, 2e-5 * (ranks - 1) + (ranks - 1) / ranks * size / 5e9, ranks)
              for size in (1e3, 1e5, 1e7) for ranks in (2, 3)]
    link = scaling.fit_link(points)
    assert link.bytes_per_s == pytest.approx(5e9, rel=1e-6)
    assert link.latency_s == pytest.approx(2e-5, rel=1e-6)


@pytest.mark.parametrize("name", ["kaggle", "terabyte", "mlperf", "rm1", "rm2", "rm3"])
def test_strong_scaling_shrinks_compute_and_weak_keeps_it(name):
    workload = PRESETS[name]()
    link = scaling.named_link(100)
    strong = [scaling.predict(workload, PHASES_1, ranks, link, "strong") for ranks in (2, 1024)]
    weak = [scaling.predict(workload, PHASES_1, ranks, link, "weak") for ranks in (2, 1024)]
    assert strong[1]["phases_s"]["mlp_forward"] < strong[0]["phases_s"]["mlp_forward"]
    assert weak[1]["phases_s"]["mlp_forward"] == pytest.approx(PHASES_1["mlp_forward"])
    assert weak[1]["phases_s"]["allreduce"] > weak[0]["phases_s"]["allreduce"]
    faster = scaling.predict(workload, PHASES_1, 64, scaling.named_link(400), "weak")
    slower = scaling.predict(workload, PHASES_1, 64, scaling.named_link(25), "weak")
    assert faster["step_s"] < slower["step_s"]


def _row(ranks: int, step_s: float, impl: str = "hybrid", phases=None) -> ResultRow:
    workload = PRESETS["smoke"]()
    return ResultRow(op="dlrm_train", impl=impl, workload="smoke", precision="fp32",
                     batch_size=workload.batch_size, median_s=step_s, samples_per_s=1.0,
                     params=dumps_compact({"nproc": ranks, "sharding": "auto"}),
                     metrics=dumps_compact({"phases_s": phases or PHASES_1, "rank_spread": 0.0,
                                            "workload": workload.to_dict()}))


def test_model_error_against_measured_rows_and_report_tables():
    rows = [_row(1, sum(PHASES_1.values())), _row(2, 0.05)]
    link = scaling.named_link(25)
    [entry] = scaling.model_error(rows, link)
    expected = scaling.predict(PRESETS["smoke"](), PHASES_1, 2, link, "strong")["step_s"]
    assert entry["ranks"] == 2
    assert entry["error"] == pytest.approx(expected / 0.05 - 1.0)
    table = dist_report.phase_table(rows)
    assert list(table["ranks"]) == [1, 2] and "alltoall_forward_ms" in table
    predicted = ResultRow(op="dist_predicted", impl="scaling_model", workload="smoke",
                          median_s=0.01, params=json.dumps({"nproc": 4, "scaling": "strong",
                                                            "link": "given"}))
    assert dist_report.scaling_figure(rows + [predicted]).axes
    # The torchrec peer's rows sit beside the hybrid's, with the phases it could time apart;
    # the scaling model still reads hybrid rows only.
    peer = _row(2, 0.06, impl="torchrec_dmp", phases={"forward": 0.02, "backward": 0.03})
    table = dist_report.phase_table(rows + [peer])
    assert list(table["impl"]) == ["hybrid", "hybrid", "torchrec_dmp"]
    assert table["forward_ms"].iloc[2] == pytest.approx(20.0)
    assert len(scaling.model_error(rows + [peer], link)) == 1


@pytest.mark.parametrize("arguments", [["--ops", "foo"], ["--device", "cuda:x"],
                                       ["--nproc", "3", "--workload", "smoke"],
                                       ["--precision", "int8"], ["--predict", "/nonexistent"]])
def test_bad_dist_input_is_refused_before_any_work(arguments, tmp_path, capsys):
    from bench.commands import main

    assert main(["dist", *arguments, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not any(tmp_path.iterdir())
