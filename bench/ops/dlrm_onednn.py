"""fp32 impls whose Linear layers run in oneDNN rather than MKL: `fc`, and per_table
`dlrm_train` / `dlrm_infer`. Same models and float64 references as the stock impls; only the
GEMM library differs (on non-Intel CPUs MKL's sgemm runs its AVX2 kernels)."""

from __future__ import annotations

from bench.models.onednn import onednn_available, with_onednn_linears
from bench.ops.dlrm import build_infer, build_train, dense_only
from bench.ops.fc import build_fc_stack
from bench.registry import BuildContext, Prepared, Unsupported, impl

GEMM_PARAMS = {"gemm": "onednn (aten.mkldnn_linear and its backward)"}


def _require_onednn(context: BuildContext) -> None:
    if not onednn_available():
        raise Unsupported("this torch build has no oneDNN (torch.backends.mkldnn.is_available() "
                          "is False)")
    if context.device.type != "cpu":
        raise Unsupported("oneDNN Linear kernels are the CPU path; on CUDA cuBLAS already runs")
    if context.variant.get("tt_tables"):
        raise Unsupported("the onednn impls have no TT-Rec tables; use per_table or batched")


def _with_gemm_params(prepared: Prepared) -> Prepared:
    prepared.params.update(GEMM_PARAMS)
    return prepared


@impl("fc", "onednn", ("fp32",), devices=("cpu",),
      description="the same Linear stacks with fp32 GEMMs in oneDNN instead of MKL")
def build_fc_onednn(context: BuildContext) -> Prepared:
    """fc forward through oneDNN's fp32 matmul."""
    _require_onednn(context)
    return _with_gemm_params(build_fc_stack(context, prepare=with_onednn_linears))


@impl("dlrm_train", "onednn", ("fp32",), devices=("cpu",), pairs=dense_only,
      description="per_table with the MLPs' fp32 GEMMs (forward and both gradients) in oneDNN")
def build_train_onednn(context: BuildContext) -> Prepared:
    """per_table SGD step whose Linear layers run in oneDNN."""
    _require_onednn(context)
    return _with_gemm_params(build_train(context, "per_table", prepare=with_onednn_linears))


@impl("dlrm_infer", "onednn", ("fp32",), devices=("cpu",), pairs=dense_only,
      description="per_table inference with the MLPs' fp32 GEMMs in oneDNN")
def build_infer_onednn(context: BuildContext) -> Prepared:
    """per_table inference whose Linear layers run in oneDNN."""
    _require_onednn(context)
    return _with_gemm_params(build_infer(context, "per_table", prepare=with_onednn_linears))
