"""torchrec's EmbeddingBagCollection over a KeyedJaggedTensor on `sls_multi` (fp32, sum), on the
CPU or, with FBGEMM's CUDA build, on cuda."""

from __future__ import annotations


import torch

from bench import peers
from bench.ops.common import Unsupported
from bench.ops.fbgemm_placement import peers_on, placed
from bench.ops.sls import all_tables
from bench.ops.sls import multi_prepared, table_major_calls
from bench.ops.sls_fbgemm import tbe_lookup_bound, tbe_multi_params
from bench.registry import BuildContext, Prepared, impl


# torchrec's jagged-tensor ops are FBGEMM's: on cuda they need its CUDA build too.
@impl("sls_multi", "torchrec_ebc", ("fp32",), available=peers_on("fbgemm_gpu", "torchrec"),
      requires={"torchrec": peers.PEERS_INSTALL},
      description="torchrec EmbeddingBagCollection over a KeyedJaggedTensor (unsharded; CPU, or "
                  "cuda with FBGEMM's CUDA build)")
def build_torchrec_ebc(context: BuildContext) -> Prepared:
    """Every table in one EmbeddingBagCollection, one feature per table, sum pooling."""
    placed(context.device, "fbgemm_gpu", "torchrec")
    torchrec = peers.require("torchrec")
    if context.precision != "fp32":
        raise Unsupported("the unsharded EmbeddingBagCollection impl runs at fp32 only")
    weights, rotations, rotation = all_tables(context)
    names = [f"table_{index}" for index in range(len(weights))]
    keys = [f"feature_{index}" for index in range(len(weights))]
    collection = torchrec.EmbeddingBagCollection(
        tables=[torchrec.EmbeddingBagConfig(name=name, embedding_dim=weight.shape[1],
                                            num_embeddings=weight.shape[0], feature_names=[key],
                                            pooling=torchrec.PoolingType.SUM)
                for name, key, weight in zip(names, keys, weights, strict=True)],
        device=context.device)
    with torch.no_grad():
        for name, weight in zip(names, weights, strict=True):
            collection.embedding_bags[name].weight.copy_(weight)  # onto the device

    def pool(values, jagged_offsets):
        # As the other sls_multi impls, inputs arrive per table; the jagged tensor that a
        # torchrec input pipeline would hand over is built here, in the timed call.
        features = torchrec.KeyedJaggedTensor(keys=keys, values=values, offsets=jagged_offsets)
        with torch.no_grad():
            return collection(features).values()  # [batch, tables * dim], keys in order

    calls = table_major_calls(pool, rotations, context.workload.batch_size)
    bytes_per_row = weights[0].shape[1] * weights[0].element_size()
    return multi_prepared(context, calls, weights, rotations, rotation, bytes_per_row,
                          tbe_multi_params(context.workload, bytes_per_row, {
                              "collection": "torchrec.EmbeddingBagCollection (unsharded)"}),
                          bound=tbe_lookup_bound)
