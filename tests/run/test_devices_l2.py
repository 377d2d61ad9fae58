"""The GPU's L2 size recorded beside NVML's facts, only where torch's device is the same GPU."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.run import devices


def test_l2_bytes_come_from_torch_for_the_same_gpu_only(monkeypatch):
    properties = {0: SimpleNamespace(name="NVIDIA H200", L2_cache_size=60 << 20),
                  1: SimpleNamespace(name="NVIDIA H100", L2_cache_size=50 << 20)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties[index])
    sizes = devices.torch_l2_bytes(["NVIDIA H200", "NVIDIA H200", "NVIDIA H200"])
    assert sizes == [60 << 20, 0, 0]


def test_no_cuda_means_no_l2_figures(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.torch_l2_bytes(["NVIDIA H200"]) == [0]
