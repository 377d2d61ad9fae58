"""`serve --device`: GPU workers, one per GPU, refused where the GPUs are not there; the
device-independent parts run here with a faked GPU count, the real GPU run only on a GPU."""

from __future__ import annotations

import dataclasses
import json
import queue

import pytest
import torch

from bench import registry
from bench.commands import main
from bench.commands import serve
from bench.commands.common import UsageError
from bench.records import STATUS_OK, read_rows
from bench.run import devices
from bench.run.devices import DeviceError
from bench.serve import pool as pool_module
from bench.serve.batching import BatchPolicy
from bench.serve.pool import SamplePool
from bench.serve.queries import parse_query_sizes, query_table
from bench.serve.workers import WorkerConfig, serve_forever
from conftest import tiny_workload
from workloads.specs import PoolingDistribution


@pytest.fixture
def gpus(monkeypatch):
    """Fake the number of visible GPUs (the project's device helper asks torch)."""
    def fake(count: int) -> None:
        monkeypatch.setattr(devices, "cuda_device_count", lambda: count)

    return fake


def test_the_device_flag_parses_and_defaults_to_cpu():
    parser = serve.build_parser()
    assert parser.parse_args([]).device == "cpu"
    assert parser.parse_args(["--device", "cuda:1"]).device == "cuda:1"


def test_each_worker_gets_its_own_gpu(gpus):
    gpus(4)
    assert serve.worker_devices("cpu", 3) == ["cpu"] * 3
    assert serve.worker_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert serve.worker_devices("cuda:1", 3) == ["cuda:1", "cuda:2", "cuda:3"]
    with pytest.raises(UsageError, match=r"GPUs 2\.\.4, 4 visible"):
        serve.worker_devices("cuda:2", 3)
    with pytest.raises(UsageError, match="a GPU per worker"):
        serve.worker_devices("cuda", 5)
    with pytest.raises(DeviceError, match="only 4 GPU"):
        serve.worker_devices("cuda:4", 1)
    with pytest.raises(DeviceError, match="unknown device"):
        serve.worker_devices("gpu", 1)
    gpus(0)
    with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
        serve.worker_devices("cuda", 1)


@pytest.mark.parametrize("count, argv, message", [
    (0, ["--device", "cuda"], "no CUDA GPU is visible"),
    (1, ["--device", "cuda:3"], "only 1 GPU"),
    (1, ["--device", "cuda", "--workers", "2"], "a GPU per worker"),
    (2, ["--device", "cuda", "--workers", "1,3"], "a GPU per worker"),
    (2, ["--device", "tpu"], "unknown device"),
])
def test_bad_devices_are_one_line_exit_2_nothing_written(gpus, tmp_path, capsys, count, argv,
                                                         message):
    pytest.importorskip("mlperf_loadgen")
    gpus(count)
    code = main(["serve", "--workload", "smoke", "--qps", "10", "--out", str(tmp_path), *argv])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and message in error
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_cuda_without_a_gpu_is_refused_before_work(tmp_path, capsys):
    pytest.importorskip("mlperf_loadgen")
    code = main(["serve", "--workload", "smoke", "--qps", "10", "--device", "cuda",
                 "--out", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "no CUDA GPU" in error
    assert not any(tmp_path.iterdir())


def test_gpu_workers_need_no_cores_each(gpus):
    # --workers x --threads is a CPU budget only where workers are pinned (on the CPU).
    pytest.importorskip("mlperf_loadgen")
    gpus(2)
    threads = len(__import__("os").sched_getaffinity(0)) + 1
    args = serve.build_parser().parse_args(["--workload", "smoke", "--qps", "10", "--device",
                                            "cuda", "--workers", "2", "--threads",
                                            str(threads)])
    choices = serve.validate(args)
    configs = serve.worker_configs(args, choices, query_table(parse_query_sizes("fixed:2"), 4,
                                                              0), "fp32", 2)
    assert choices["device"] == "cuda:0"
    assert [config.device for config in configs] == ["cuda:0", "cuda:1"]
    assert [config.index for config in configs] == [0, 1]
    with pytest.raises(UsageError, match="CPUs"):
        serve.validate(serve.build_parser().parse_args(
            ["--workload", "smoke", "--qps", "10", "--threads", str(threads)]))


class _Recorded(Exception):
    pass


def test_the_worker_builds_and_batches_on_its_device(monkeypatch):
    """The worker's body, run in this process with stand-ins for what needs a GPU: the device
    string reaches the build context, the thread pinning and the sample pool."""
    seen: dict[str, list] = {"build": [], "pin": [], "pool": []}
    real = registry.impls("dlrm_infer")["per_table"]

    class StandIn:
        code_version = real.code_version

        @staticmethod
        def build(context):
            seen["build"].append(str(context.device))
            # The check and the serving then run on the CPU: no GPU here.
            return real.build(dataclasses.replace(context, device=torch.device("cpu")))

    class CpuPool(SamplePool):
        def __init__(self, workload, seed, rows, device="cpu"):
            seen["pool"].append(device)
            super().__init__(workload, seed, rows)

    def pin(threads, device="cpu", first=0):
        seen["pin"].append(device)
        return [first]

    monkeypatch.setattr(registry, "impls", lambda op: {"stand_in": StandIn})
    monkeypatch.setattr(pool_module, "SamplePool", CpuPool)
    monkeypatch.setattr("bench.run.worker.pin_threads", pin)
    table = query_table(parse_query_sizes("uniform:1,6"), 8, 0)
    config = WorkerConfig(1, 0, 1, tiny_workload(), "stand_in", "fp32", 0,
                          (BatchPolicy(True, 4, 0.0),), table, device="cuda:1")
    inbox, outbox = queue.Queue(), queue.Queue()
    for sample in range(3):
        inbox.put((0, 100 + sample, sample))
    inbox.put(("stop",))
    serve_forever(config, inbox, outbox)
    messages = []
    while not outbox.empty():
        messages.append(outbox.get())
    assert seen == {"build": ["cuda:1"], "pin": ["cuda:1"], "pool": ["cuda:1"]}
    assert messages[0][0] == "ready", messages[0]
    assert messages[0][2]["device"] == "cuda:1" and messages[0][2]["rel_error"] < 1e-4
    answered = {query: items for message in messages[1:] for query, items in message[2]}
    assert answered == {100 + sample: table.sizes[sample] for sample in range(3)}


def test_variable_pooling_batches_match_their_windows_alone():
    workload = tiny_workload(pooling=PoolingDistribution("uniform", 3.0, 2.0))
    pool = SamplePool(workload, 0, 64, "cpu")
    windows = [(3, 5), (40, 1), (10, 7)]
    dense, indices, offsets = pool.batch(windows)
    alone = [pool.batch([window]) for window in windows]
    assert torch.equal(dense, torch.cat([part[0] for part in alone]))
    for table in range(len(workload.tables)):
        bags = [indices[table][start:end].tolist() for start, end in
                zip(offsets[table].tolist(), offsets[table].tolist()[1:] + [
                    indices[table].numel()])]
        expected = []
        for part in alone:
            part_offsets = part[2][table].tolist() + [part[1][table].numel()]
            expected += [part[1][table][start:end].tolist()
                         for start, end in zip(part_offsets, part_offsets[1:])]
        assert bags == expected


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_serving_on_a_gpu_answers_every_query(tmp_path):
    pytest.importorskip("mlperf_loadgen")
    code = main(["serve", "--workload", "smoke", "--query-size", "uniform:1,24", "--queries",
                 "128", "--min-queries", "300", "--min-duration", "0.2", "--scenario",
                 "offline", "--batching", "on", "--max-batch", "64", "--device", "cuda",
                 "--out", str(tmp_path), "--run-id", "gpu"])
    assert code == 0
    (row,) = read_rows(tmp_path / "gpu" / "results.csv")
    assert row.status == STATUS_OK and row.device == "cuda:0"
    assert json.loads(row.params)["worker_devices"] == ["cuda:0"]
    assert row.rel_error < 1e-3
