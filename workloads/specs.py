"""Frozen, validated workload specs: what a benchmark runs, independent of how it is timed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

INDEX_DISTRIBUTIONS = ("uniform", "zipf")
POOLING_DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal")
INTERACTIONS = ("dot", "cat", "dcn")


class SpecError(ValueError):
    """A workload spec that cannot be run; the message says which field and why."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


@dataclasses.dataclass(frozen=True)
class IndexDistribution:
    """How row ids are drawn within a table."""

    kind: str = "uniform"  # "uniform" or "zipf"
    alpha: float = 0.0  # Zipf exponent; hot rows are spread over the table by a seeded shuffle

    def __post_init__(self):
        _require(self.kind in INDEX_DISTRIBUTIONS,
                 f"index distribution {self.kind!r}: choose {', '.join(INDEX_DISTRIBUTIONS)}")
        if self.kind == "zipf":
            _require(self.alpha > 0, f"zipf alpha must be > 0, got {self.alpha}")

    @classmethod
    def parse(cls, text: str) -> "IndexDistribution":
        """Parse 'uniform' or 'zipf:ALPHA'."""
        kind, _, value = text.partition(":")
        if kind == "zipf":
            try:
                return cls("zipf", float(value))
            except ValueError:
                raise SpecError(f"--dist {text!r}: write zipf:ALPHA, e.g. zipf:1.05") from None
        _require(kind == "uniform" and not value,
                 f"--dist {text!r}: choose uniform or zipf:ALPHA (e.g. zipf:1.05)")
        return cls("uniform")

    def label(self) -> str:
        """Short text form, the inverse of parse."""
        return "uniform" if self.kind == "uniform" else f"zipf:{self.alpha:g}"


@dataclasses.dataclass(frozen=True)
class PoolingDistribution:
    """Lookups per bag: a fixed count, or drawn per bag from a distribution (at least 1)."""

    kind: str = "fixed"
    mean: float = 1.0  # fixed count, or the distribution's mean
    spread: float = 0.0  # uniform: half-width; normal: std; lognormal: sigma of log
    maximum: int = 0  # cap on a drawn count (0: 4x the mean)

    def __post_init__(self):
        _require(self.kind in POOLING_DISTRIBUTIONS,
                 f"pooling {self.kind!r}: choose one of {', '.join(POOLING_DISTRIBUTIONS)}")
        _require(self.mean >= 1, f"pooling mean must be >= 1, got {self.mean}")
        _require(self.spread >= 0, f"pooling spread must be >= 0, got {self.spread}")
        if self.kind == "fixed":
            _require(float(self.mean).is_integer(), f"fixed pooling must be whole, got {self.mean}")

    @classmethod
    def parse(cls, text: str) -> "PoolingDistribution":
        """Parse 'N' (fixed) or 'KIND:MEAN,SPREAD' (uniform, normal, lognormal)."""
        kind, _, value = text.partition(":")
        try:
            if not value:
                return cls("fixed", float(int(kind)))
            mean, _, spread = value.partition(",")
            return cls(kind, float(mean), float(spread or 0.0))
        except ValueError:
            raise SpecError(
                f"--pooling {text!r}: write N or uniform|normal|lognormal:MEAN,SPREAD") from None

    @property
    def cap(self) -> int:
        """Largest count a bag may draw."""
        return self.maximum or max(1, int(round(4 * self.mean)))

    def label(self) -> str:
        """Short text form."""
        if self.kind == "fixed":
            return str(int(self.mean))
        return f"{self.kind}:{self.mean:g},{self.spread:g}"


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One embedding table and how it is looked up."""

    rows: int
    dim: int
    pooling: PoolingDistribution = PoolingDistribution()
    distribution: IndexDistribution = IndexDistribution()
    original_rows: int = 0  # rows before --max-rows capped it (0: not capped)

    def __post_init__(self):
        _require(self.rows >= 1, f"table rows must be >= 1, got {self.rows}")
        _require(self.dim >= 1, f"embedding dim must be >= 1, got {self.dim}")

    @property
    def capped(self) -> bool:
        """Whether --max-rows reduced this table."""
        return self.original_rows > self.rows


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """A DLRM-shaped workload: embedding tables, dense features and the two MLP stacks."""

    name: str
    tables: tuple[TableSpec, ...]
    num_dense: int  # dense features entering the bottom MLP
    bottom_mlp: tuple[int, ...]  # output widths of the bottom MLP; the last equals the dim
    top_mlp: tuple[int, ...]  # output widths of the top MLP; the last is 1 (the logit)
    interaction: str = "dot"
    batch_size: int = 2048
    description: str = ""
    source: str = ""  # where the shapes come from
    data_path: str = ""  # a Criteo file that supplies the inputs instead of the generators

    def __post_init__(self):
        _require(bool(self.name), "workload name must not be empty")
        _require(len(self.tables) >= 1, f"{self.name}: needs at least one table")
        dims = {table.dim for table in self.tables}
        _require(len(dims) == 1, f"{self.name}: all tables must share one dim, got {sorted(dims)}")
        _require(self.num_dense >= 1, f"{self.name}: num_dense must be >= 1")
        _require(len(self.bottom_mlp) >= 1 and len(self.top_mlp) >= 1,
                 f"{self.name}: MLPs need at least one layer")
        _require(all(width >= 1 for width in self.bottom_mlp + self.top_mlp),
                 f"{self.name}: MLP widths must be >= 1")
        _require(self.bottom_mlp[-1] == self.dim,
                 f"{self.name}: bottom MLP must end at the embedding dim {self.dim}, "
                 f"got {self.bottom_mlp[-1]}")
        _require(self.top_mlp[-1] == 1, f"{self.name}: top MLP must end in 1 (the logit)")
        _require(self.interaction in INTERACTIONS,
                 f"{self.name}: interaction {self.interaction!r} not in {INTERACTIONS}")
        _require(self.batch_size >= 1, f"{self.name}: batch size must be >= 1")

    @property
    def dim(self) -> int:
        """The shared embedding dimension."""
        return self.tables[0].dim

    @property
    def num_features(self) -> int:
        """Vectors entering the interaction: the bottom MLP output plus one per table."""
        return 1 + len(self.tables)

    @property
    def interaction_width(self) -> int:
        """Width of the interaction output, the top MLP's input."""
        if self.interaction == "dot":
            count = self.num_features
            return self.dim + count * (count - 1) // 2
        return self.dim * self.num_features

    @property
    def total_rows(self) -> int:
        """Rows over all tables."""
        return sum(table.rows for table in self.tables)

    def embedding_bytes(self, bytes_per_value: float = 4.0) -> int:
        """Bytes held by the embedding tables at a given element size."""
        return int(self.total_rows * self.dim * bytes_per_value)

    def largest_table(self) -> int:
        """Index of the table with the most rows (the single-table SLS target)."""
        return max(range(len(self.tables)), key=lambda index: self.tables[index].rows)

    def with_batch_size(self, batch_size: Optional[int]) -> "WorkloadSpec":
        """Same workload at another batch size (None keeps it)."""
        return self if batch_size is None else dataclasses.replace(self, batch_size=batch_size)

    def capped(self, max_rows: Optional[int]) -> "WorkloadSpec":
        """Same workload with every table capped at max_rows, remembering the original size."""
        if max_rows is None:
            return self
        _require(max_rows >= 1, f"--max-rows must be >= 1, got {max_rows}")
        tables = tuple(
            dataclasses.replace(table, rows=max_rows,
                                original_rows=table.original_rows or table.rows)
            if table.rows > max_rows else table
            for table in self.tables
        )
        return dataclasses.replace(self, tables=tables)

    def with_distribution(self, distribution: Optional[IndexDistribution]) -> "WorkloadSpec":
        """Same workload with every table drawing indices from another distribution."""
        if distribution is None:
            return self
        tables = tuple(dataclasses.replace(table, distribution=distribution)
                       for table in self.tables)
        return dataclasses.replace(self, tables=tables)

    def capped_tables(self) -> int:
        """How many tables --max-rows reduced."""
        return sum(table.capped for table in self.tables)

    def describe(self) -> dict:
        """A JSON-ready summary that identifies the workload's shapes."""
        return {
            "name": self.name,
            "rows": [table.rows for table in self.tables],
            "dim": self.dim,
            "pooling": [table.pooling.label() for table in self.tables],
            "distribution": sorted({table.distribution.label() for table in self.tables}),
            "num_dense": self.num_dense,
            "bottom_mlp": list(self.bottom_mlp),
            "top_mlp": list(self.top_mlp),
            "interaction": self.interaction,
            "capped_tables": self.capped_tables(),
            "data_path": self.data_path,
        }

    def key(self) -> str:
        """A stable short hash of the shapes (not the name)."""
        text = json.dumps(self.describe() | {"name": ""}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]
