"""--device validation against the GPUs visible here, with the count faked: a GPU that is not
there is one line on stderr, exit 2, and nothing written."""

from __future__ import annotations

import pytest

from bench import commands
from bench.run import devices


@pytest.mark.parametrize("count,name,canonical", [
    (0, "cpu", "cpu"), (1, "cuda", "cuda:0"), (1, "cuda:0", "cuda:0"), (4, "cuda:3", "cuda:3"),
])
def test_visible_devices_are_accepted(monkeypatch, count, name, canonical):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: count)
    assert devices.normalize_device(name) == canonical


@pytest.mark.parametrize("count,name,words", [
    (0, "cuda", ["--device cuda", "no CUDA GPU is visible", "--device cpu"]),
    (0, "cuda:0", ["--device cuda:0", "no CUDA GPU is visible"]),
    (1, "cuda:3", ["--device cuda:3", "only 1 GPU", "cuda:0"]),
    (2, "cuda:2", ["--device cuda:2", "only 2 GPU", "cuda:0, cuda:1"]),
    (1, "gpu", ["unknown device 'gpu'"]),
    (1, "cuda:-1", ["unknown device 'cuda:-1'"]),
])
def test_a_gpu_that_is_not_here_is_one_line_exit_2_nothing_written(monkeypatch, capsys,
                                                                    tmp_path, count, name,
                                                                    words):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: count)
    out = tmp_path / "runs"
    code = commands.main(["--ops", "fc", "--workload", "smoke", "--device", name,
                          "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("run_bench.py: error: "), captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []  # no run directory, no results
