"""The hybrid builds its DDP wrapper under both torch signatures: torch 2.11 (the GPU machines)
has no forward_sync_buffers, torch 2.13 (the CPU pin) has it and deprecates broadcast_buffers."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bench.distributed import hybrid
from bench.distributed.plan import plan_sharding
from workloads.presets import _tables
from workloads.specs import WorkloadSpec


class Torch211DDP(DistributedDataParallel):
    """DistributedDataParallel as torch 2.11 declares it: no forward_sync_buffers keyword."""

    seen: dict = {}

    def __init__(self, module, device_ids=None, output_device=None, dim=0,
                 broadcast_buffers=True, process_group=None, bucket_cap_mb=None,
                 find_unused_parameters=False, check_reduction=False,
                 gradient_as_bucket_view=False, static_graph=False):
        Torch211DDP.seen = {"broadcast_buffers": broadcast_buffers}
        super().__init__(module, process_group=process_group)


class Torch213DDP(DistributedDataParallel):
    """DistributedDataParallel as torch 2.13 declares it: forward_sync_buffers, and a
    broadcast_buffers that must not be passed (deprecated)."""

    seen: dict = {}

    def __init__(self, module, device_ids=None, broadcast_buffers=None, process_group=None,
                 forward_sync_buffers=None):
        if broadcast_buffers is not None:
            raise AssertionError("broadcast_buffers is deprecated in torch 2.13")
        Torch213DDP.seen = {"forward_sync_buffers": forward_sync_buffers}
        super().__init__(module, process_group=process_group)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _workload() -> WorkloadSpec:
    return WorkloadSpec(name="ddp-compat", tables=_tables((300, 50), 8, 2), num_dense=4,
                        bottom_mlp=(16, 8), top_mlp=(16, 1), batch_size=4)


@pytest.mark.parametrize("ddp_class,expected", [
    (Torch211DDP, {"broadcast_buffers": False}),
    (Torch213DDP, {"forward_sync_buffers": False}),
])
def test_hybrid_builds_under_both_ddp_signatures(monkeypatch, one_rank_group, ddp_class,
                                                  expected):
    assert hybrid.no_buffer_sync_keywords(ddp_class) == expected
    monkeypatch.setattr(hybrid, "DistributedDataParallel", ddp_class)
    workload = _workload()
    plan = plan_sharding([table.rows for table in workload.tables], workload.dim, 1, "auto")
    model = hybrid.HybridDLRM(workload, plan, 0, 0, torch.device("cpu"))
    assert isinstance(model.dense, ddp_class)
    assert ddp_class.seen == expected


def test_the_installed_torch_gets_a_keyword_it_declares():
    keywords = hybrid.no_buffer_sync_keywords()
    assert set(keywords) <= set(inspect.signature(DistributedDataParallel.__init__).parameters)
