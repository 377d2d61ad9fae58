"""TT-Rec: tensor-train compressed embedding bags with a hot-row cache, in pure PyTorch."""

from bench.models.ttrec.cache import CACHE_POLICIES, RowCache
from bench.models.ttrec.factorize import (
    embedding_compression_ratio,
    factorize_dim,
    factorize_rows,
    tt_parameter_count,
    tt_table_bytes,
)
from bench.models.ttrec.tt_embedding import (
    TTEmbeddingBag,
    reconstruct_tt_rows,
    tt_embedding_bag,
)

__all__ = [
    "CACHE_POLICIES",
    "RowCache",
    "TTEmbeddingBag",
    "embedding_compression_ratio",
    "factorize_dim",
    "factorize_rows",
    "reconstruct_tt_rows",
    "tt_embedding_bag",
    "tt_parameter_count",
    "tt_table_bytes",
]
