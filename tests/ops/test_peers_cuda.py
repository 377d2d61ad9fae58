"""The FBGEMM / torchrec peers on cuda without a GPU: the placement spec each device gets, the
CUDA-build check the planner makes (left out, or a skip row naming the install, when fbgemm_gpu
is its CPU build), and the arguments a cuda TBE is built with, through recording stand-ins.
FBGEMM's CUDA kernels cannot run here (no GPU, CPU build installed): a GPU run checks them."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from bench import peers, registry
from bench.registry import BuildContext, Unsupported
from bench.run import devices
from bench.run.execute import print_left_out
from bench.run.sweep import LeftOut, Named, plan
from bench.ops import dlrm_fbgemm, fbgemm_placement, sls_fbgemm
from bench.ops.fbgemm_placement import placement
from workloads import presets

CPU, CUDA = torch.device("cpu"), torch.device("cuda:0")
SMOKE = presets.smoke()
HAVE_FBGEMM = importlib.util.find_spec("fbgemm_gpu") is not None
needs_fbgemm = pytest.mark.skipif(not HAVE_FBGEMM, reason="fbgemm-gpu-cpu not installed")
# Every peer impl, and a precision each runs at on cuda.
PEER_IMPLS = [("sls", "fbgemm_tbe", "fp32"), ("sls", "fbgemm_tbe_infer", "int8"),
              ("sls_multi", "fbgemm_tbe", "fp16"), ("sls_multi", "fbgemm_tbe_infer", "int4"),
              ("sls_multi", "torchrec_ebc", "fp32"), ("dlrm_train", "fbgemm_tbe", "fp32"),
              ("dlrm_train", "fbgemm_tbe_adagrad", "fp32"), ("dlrm_infer", "fbgemm_tbe", "int8")]
TORCH_211_CU130 = ("2.11.0+cu130", "13.0")  # the GPU machines' torch (shared notes)
CU130_INSTALL = ("pip uninstall -y fbgemm-gpu-cpu; pip install --no-deps fbgemm-gpu==1.6.0 "
                 "--index-url https://download.pytorch.org/whl/cu130 && "
                 "pip install --no-deps torchrec==1.6.0")


@pytest.fixture
def gpu_torch(monkeypatch):
    """One visible GPU and the GPU machines' torch version, as the planner reads them."""
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(fbgemm_placement.torch, "__version__", TORCH_211_CU130[0])
    monkeypatch.setattr(fbgemm_placement.torch.version, "cuda", TORCH_211_CU130[1])


@pytest.fixture
def fbgemm_build(monkeypatch, tmp_path):
    """Install a stand-in fbgemm_gpu package recording this build variant (None: no file)."""
    def install(variant):
        package = tmp_path / "fbgemm_gpu"
        (package / "docs").mkdir(parents=True, exist_ok=True)
        target = package / "docs" / "target.default.json.py"
        if variant is None:
            target.unlink(missing_ok=True)
        else:
            target.write_text(json.dumps({"version": "1.6.0", "target": "default",
                                          "variant": variant}))
        real = importlib.util.find_spec

        def find_spec(name, *args):
            if name == "fbgemm_gpu":
                return SimpleNamespace(submodule_search_locations=[str(package)])
            return real(name, *args)
        monkeypatch.setattr(peers.importlib.util, "find_spec", find_spec)
    return install


def _context(op: str, precision: str, device=CUDA) -> BuildContext:
    variant = {"mode": "sum"} if op.startswith("sls") else {}
    return BuildContext(workload=SMOKE, variant=variant, precision=precision, device=device,
                        seed=0, options={})


# ---------------------------------------------------------------- the placement spec

def test_placement_spec_of_each_device():
    assert placement(CPU) == fbgemm_placement.Placement("HOST", "CPU", CPU)
    assert placement(CUDA) == fbgemm_placement.Placement("DEVICE", "CUDA", CUDA)
    assert placement(torch.device("cuda:1")).device == torch.device("cuda:1")
    assert placement(CPU).label() == "HOST, CPU"
    with pytest.raises(Unsupported, match="cpu or cuda, not meta"):
        placement(torch.device("meta"))


@needs_fbgemm
def test_placement_names_are_fbgemm_enum_members():
    common = sls_fbgemm._fbgemm().common
    assert placement(CPU).enums(common) == (common.EmbeddingLocation.HOST,
                                            common.ComputeDevice.CPU)
    assert placement(CUDA).enums(common) == (common.EmbeddingLocation.DEVICE,
                                             common.ComputeDevice.CUDA)


# ---------------------------------------------------------------- which build, which install

@needs_fbgemm
def test_the_installed_build_is_read_without_importing_it():
    assert peers.fbgemm_build() == "cpu"  # fbgemm-gpu-cpu, as the peers extra installs it


def test_the_build_variant_comes_from_fbgemm_own_target_file(fbgemm_build, monkeypatch):
    fbgemm_build("cuda")
    assert peers.fbgemm_build() == "cuda"
    fbgemm_build(None)
    assert peers.fbgemm_build() == "unknown"
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name, *args: None)
    assert peers.fbgemm_build() == ""


@pytest.mark.parametrize("torch_version, release", [
    ("2.11.0+cu130", "1.6.0"), ("2.13.0", "1.8.0"), ("2.5.1", "1.0.0"), ("2.4.0", None),
    ("3.0.0", None), ("nightly", None)])
def test_fbgemm_release_paired_with_torch(torch_version, release):
    assert peers.fbgemm_release(torch_version) == release


def test_the_cuda_install_pairs_fbgemm_and_torchrec_with_torch_and_its_cuda():
    install = peers.cuda_peers_install(*TORCH_211_CU130)
    assert install.startswith(CU130_INSTALL)
    assert "cu<your CUDA>" in peers.cuda_peers_install("2.11.0", None)
    unknown = peers.cuda_peers_install("2.4.0", "12.1")
    assert "whl/cu121" in unknown and peers.FBGEMM_RELEASES in unknown


# ---------------------------------------------------------------- the plan on cuda

@pytest.mark.parametrize("op, impl_name, precision", PEER_IMPLS)
def test_a_cpu_build_refuses_each_peer_on_cuda_and_names_the_install(gpu_torch, fbgemm_build,
                                                                      op, impl_name, precision):
    fbgemm_build("cpu")
    entry = registry.impls(op)[impl_name]
    variant = _context(op, precision).variant
    refusal = registry.refusal(entry, variant, precision, devices.normalize_device("cuda"), {})
    assert refusal.about == registry.ABOUT_IMPL
    assert "its cpu build, whose TBE kernels run on CPU only" in refusal.short
    assert CU130_INSTALL in refusal.short
    # The CPU path is as it was: nothing refused there.
    assert registry.refusal(entry, variant, precision, "cpu", {}) is None or not HAVE_FBGEMM
    # The builder's safety net refuses with the planner's reason, before touching the device.
    with pytest.raises(Unsupported) as raised:
        entry.build(_context(op, precision))
    assert str(raised.value) == refusal.short


def _plan(named: Named):
    left_out = LeftOut()
    planned = plan(["sls", "sls_multi", "dlrm_train", "dlrm_infer"], [SMOKE],
                   ["fp32", "fp16", "int8"], [devices.normalize_device("cuda")], ["native"], [1],
                   seed=0, options={"sls_modes": ["sum"]}, named=named, left_out=left_out)
    return planned, left_out


PEER_NAMES = {f"{op}/{impl_name}" for op, impl_name, _ in PEER_IMPLS}


def test_default_plan_on_cuda_leaves_the_peers_out_with_the_install(gpu_torch, fbgemm_build,
                                                                     capsys):
    fbgemm_build("cpu")
    planned, left_out = _plan(Named())
    assert not {f"{item.task.op}/{item.task.impl}" for item in planned} & PEER_NAMES
    assert {item.task.impl for item in planned} >= {"embedding_bag", "per_table"}
    records = [record for record in left_out.records() if CU130_INSTALL in record["reason"]]
    assert len(records) == 1  # one summarised reason for every peer
    # torchrec_ebc's reason is the same one: the CPU build is what it lacks first.
    assert set(records[0]["impls"]) == PEER_NAMES
    print_left_out(left_out)
    assert CU130_INSTALL in capsys.readouterr().err


def test_a_peer_named_on_cuda_is_a_skip_row_with_the_install(gpu_torch, fbgemm_build):
    fbgemm_build("cpu")
    names = frozenset({"fbgemm_tbe", "fbgemm_tbe_infer", "fbgemm_tbe_adagrad", "torchrec_ebc"})
    planned, _ = _plan(Named(impls=names))
    peer_rows = [item for item in planned if item.task.impl in names]
    assert {f"{item.task.op}/{item.task.impl}" for item in peer_rows} == PEER_NAMES
    assert all(CU130_INSTALL in item.skip_reason and "cpu build" in item.skip_reason
               for item in peer_rows)
    reason = next(item.skip_reason for item in peer_rows if item.task.op == "dlrm_infer")
    assert reason.startswith("dlrm_infer/fbgemm_tbe: fbgemm_gpu here is its cpu build")


def test_without_fbgemm_the_cuda_reason_still_names_the_cuda_install(gpu_torch, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None
                        if name.split(".")[0] == "fbgemm_gpu" else real(name, *args))
    planned, _ = _plan(Named(impls=frozenset({"fbgemm_tbe"})))
    reasons = {item.skip_reason for item in planned if item.task.impl == "fbgemm_tbe"}
    assert reasons and all("fbgemm_gpu is not installed; on cuda it needs FBGEMM's CUDA build"
                           in reason and CU130_INSTALL in reason for reason in reasons)


def test_a_cuda_build_lets_the_peers_into_the_plan(gpu_torch, fbgemm_build, monkeypatch):
    fbgemm_build("cuda")
    planned, left_out = _plan(Named())
    impls = {f"{item.task.op}/{item.task.impl}" for item in planned if not item.skip_reason}
    have_torchrec = importlib.util.find_spec("torchrec") is not None
    assert impls >= PEER_NAMES - (set() if have_torchrec else {"sls_multi/torchrec_ebc"})
    assert not any(CU130_INSTALL in record["reason"] for record in left_out.records())
    # fp16 training on cuda stays out, as for per_table (loss scaling).
    assert not any(item.task.op == "dlrm_train" and item.task.impl == "fbgemm_tbe"
                   and item.task.precision == "fp16" for item in planned)
    # torchrec is the one module torchrec_ebc needs beyond the CUDA build.
    real = importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name, *args: None if name == "torchrec" else real(name, *args))
    reason = registry.refusal(registry.impls("sls_multi")["torchrec_ebc"], {"mode": "sum"},
                              "fp32", "cuda:0", {}).short
    assert reason.startswith("torchrec is not installed") and CU130_INSTALL in reason


# ---------------------------------------------------------------- what a cuda TBE is built with

class Recording:
    """Stands in for an FBGEMM TBE class: records its arguments, holds host tables."""

    built: list = []

    def __init__(self, specs, **kwargs):
        Recording.built.append((specs, kwargs))
        rows_and_dims = [(spec[1], spec[2]) if isinstance(spec[0], str) else spec[:2]
                         for spec in specs]
        self.tables = [torch.empty(rows, dim) for rows, dim in rows_and_dims]
        self.bounds_check_mode_int, self.row_alignment, self.scale_bias_size_in_bytes = 1, 16, 4

    def split_embedding_weights(self):
        return self.tables

    def initialize_weights(self):
        pass

    def assign_embedding_weights(self, weights):
        pass


@pytest.fixture
def recording():
    Recording.built = []
    return Recording


@needs_fbgemm
@pytest.mark.parametrize("tables, kind", [(sls_fbgemm.TrainingTables, "SplitTable"),
                                          (sls_fbgemm.InferenceTables, "IntNBit")])
def test_lookup_tbe_on_cuda_is_placed_in_device_memory(recording, tables, kind):
    real = sls_fbgemm._fbgemm()
    training = SimpleNamespace(SplitTableBatchedEmbeddingBagsCodegen=recording)
    inference = SimpleNamespace(IntNBitTableBatchedEmbeddingBagsCodegen=recording,
                                rounded_row_size_in_bytes=lambda *args: 16)
    fake = SimpleNamespace(**{**vars(real), "training": training, "inference": inference})
    weights = [torch.rand(10, 8), torch.rand(7, 8)]
    built = tables(fake, weights, "fp16", "sum", placement(CUDA))
    specs, kwargs = recording.built[-1]
    common = real.common
    assert kwargs["device"] == CUDA
    if kind == "SplitTable":
        assert specs == [(10, 8, common.EmbeddingLocation.DEVICE, common.ComputeDevice.CUDA),
                         (7, 8, common.EmbeddingLocation.DEVICE, common.ComputeDevice.CUDA)]
        assert built.bytes_per_row == 8 * 4  # the stand-in's fp32 tables
    else:
        assert [spec[4] for spec in specs] == [common.EmbeddingLocation.DEVICE] * 2
    assert built.kind.endswith("(DEVICE, CUDA)")


@needs_fbgemm
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_training_tbe_on_cuda_is_placed_in_device_memory(monkeypatch, recording, optimizer):
    training, inference, common, configs, quantize = dlrm_fbgemm._fbgemm()
    stand_in = SimpleNamespace(SplitTableBatchedEmbeddingBagsCodegen=recording)
    monkeypatch.setattr(dlrm_fbgemm, "_fbgemm",
                        lambda: (stand_in, inference, common, configs, quantize))
    weights = [torch.rand(10, 8), torch.rand(7, 8)]
    dlrm_fbgemm.TBEEmbeddings(weights, optimizer, 0.1, where=placement(CUDA))
    specs, kwargs = recording.built[-1]
    assert specs == [(10, 8, common.EmbeddingLocation.DEVICE, common.ComputeDevice.CUDA),
                     (7, 8, common.EmbeddingLocation.DEVICE, common.ComputeDevice.CUDA)]
    assert kwargs["device"] == CUDA and kwargs["learning_rate"] == 0.1
    # The CPU default is the placement the impls had before cuda existed for them.
    dlrm_fbgemm.TBEEmbeddings(weights, optimizer, 0.1)
    specs, kwargs = recording.built[-1]
    assert specs[0][2:] == (common.EmbeddingLocation.HOST, common.ComputeDevice.CPU)
    assert kwargs["device"] == CPU


@needs_fbgemm
def test_inference_tbe_on_cuda_is_placed_in_device_memory(monkeypatch, recording):
    training, inference, common, configs, quantize = dlrm_fbgemm._fbgemm()
    stand_in = SimpleNamespace(IntNBitTableBatchedEmbeddingBagsCodegen=recording,
                               unpadded_row_size_in_bytes=inference.unpadded_row_size_in_bytes)
    monkeypatch.setattr(dlrm_fbgemm, "_fbgemm",
                        lambda: (training, stand_in, common, configs, quantize))
    dlrm_fbgemm.TBEInferenceEmbeddings([torch.rand(10, 8)], "int8", placement(CUDA))
    specs, kwargs = recording.built[-1]
    assert specs[0][4] == common.EmbeddingLocation.DEVICE and kwargs["device"] == CUDA
