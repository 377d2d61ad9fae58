"""Where FBGEMM's TBE keeps and computes its tables on a device (host memory on cpu, GPU memory
on cuda), and the plan-time check that a cuda run has the peers' CUDA builds."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from bench import peers
from bench.registry import Unsupported


@dataclasses.dataclass(frozen=True)
class Placement:
    """A TBE's placement on one device, as member names of FBGEMM's enums."""

    location: str  # EmbeddingLocation: HOST (host memory) or DEVICE (the GPU's memory)
    compute: str  # ComputeDevice: CPU or CUDA (FBGEMM takes one for all tables of a TBE)
    device: torch.device  # where the TBE's buffers, its inputs and its outputs live

    def enums(self, common) -> tuple:
        """(EmbeddingLocation, ComputeDevice) members from FBGEMM's common module."""
        return (getattr(common.EmbeddingLocation, self.location),
                getattr(common.ComputeDevice, self.compute))

    def label(self) -> str:
        """As rows record it, e.g. "HOST, CPU"."""
        return f"{self.location}, {self.compute}"


def placement(device: torch.device) -> Placement:
    """The TBE placement of a device: tables in host memory computed by the CPU kernels, or in
    the GPU's memory computed by the CUDA kernels (no UVM or cache: the tables must fit)."""
    if device.type == "cpu":
        return Placement("HOST", "CPU", device)
    if device.type == "cuda":
        return Placement("DEVICE", "CUDA", device)
    raise Unsupported(f"FBGEMM's TBE runs on cpu or cuda, not {device.type}")


def peers_on(*modules: str) -> Callable[[str, dict], str]:
    """A plan-time `available` for peer impls that need these modules: on cuda, FBGEMM's CUDA
    build and the modules (the reason names the install); on cpu '' (`requires` covers a
    missing module there, with the CPU install)."""
    def available(device: str, options: dict) -> str:
        if device.split(":")[0] != "cuda":
            return ""
        return peers.cuda_peer_reason(modules, torch.__version__, torch.version.cuda)
    return available


def placed(device: torch.device, *modules: str) -> Placement:
    """The builders' safety net: the placement, or Unsupported with the plan-time reason."""
    where = placement(device)
    reason = peers_on(*modules)(device.type, {})
    if reason:
        raise Unsupported(reason)
    return where
