"""Frozen, validated workload specs: what a benchmark runs, independent of how it is timed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from pathlib import Path
import typing
from typing import Any, Optional

INDEX_DISTRIBUTIONS = ("uniform", "zipf", "trace", "hitrate", "reuse")
# Kinds whose indices come from one locality-controlled stream per table (see generators).
LOCALITY_DISTRIBUTIONS = ("trace", "hitrate", "reuse")
TRACE_SUFFIXES = (".npy", ".csv", ".txt")
DIST_FORMS = "uniform, zipf:ALPHA, trace:PATH, hitrate:RATE@CAPACITY_ROWS or reuse:COLD_PROB,MEAN"
POOLING_DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal")
INTERACTIONS = ("dot", "cat", "dcn")


class SpecError(ValueError):
    """A workload spec that cannot be run; the message says which field and why."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


class SpecDict:
    """to_dict/from_dict for a frozen spec dataclass, driven by its own fields: a field added to a
    spec travels to the worker with no other edit, and an unknown or missing one is an error."""

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able values (nested specs as dicts, tuples as lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of to_dict; a SpecError names an unknown or missing field."""
        if not isinstance(data, dict):
            raise SpecError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        _require(not unknown, f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        missing = [name for name, field in fields.items() if name not in data
                   and field.default is dataclasses.MISSING
                   and field.default_factory is dataclasses.MISSING]
        _require(not missing, f"{cls.__name__}: missing field(s) {', '.join(missing)}")
        return cls(**{name: _from_plain(hints[name], value) for name, value in data.items()})


def _from_plain(kind, value):
    """A plain JSON value converted back to the annotated field type (specs, tuples)."""
    if isinstance(kind, type) and issubclass(kind, SpecDict):
        return kind.from_dict(value)
    if typing.get_origin(kind) is tuple:
        arguments = typing.get_args(kind)
        element = arguments[0] if arguments else Any
        return tuple(_from_plain(element, item) for item in value)
    return value


def _number_text(value: float) -> str:
    """Shortest text that parses back to the same float ('0.9', '100000')."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _number_pair(text: str, value: str, separator: str, first_type, second_type, form: str):
    """Two numbers written FIRST<separator>SECOND, or a SpecError showing the form."""
    first, found, second = value.partition(separator)
    try:
        numbers = first_type(first), second_type(second)
    except ValueError:
        numbers = None
    _require(numbers is not None and bool(found), f"--dist {text!r}: write {form}")
    return numbers


def _check_trace_contents(text: str, path: str) -> None:
    """Load a trace file once, so a corrupt one is refused before the sweep, not per row."""
    from workloads.traces import TraceFormatError, load_trace

    try:
        load_trace(path)
    except TraceFormatError as error:
        raise SpecError(f"--dist {text!r}: {error}") from None
    except OSError as error:  # unreadable (permissions, a directory named .npy)
        raise SpecError(f"--dist {text!r}: cannot read {path}: {error.strerror}") from None


@dataclasses.dataclass(frozen=True)
class IndexDistribution(SpecDict):
    """How row ids are drawn within a table."""

    kind: str = "uniform"  # one of INDEX_DISTRIBUTIONS
    alpha: float = 0.0  # Zipf exponent; hot rows are spread over the table by a seeded shuffle
    path: str = ""  # trace: the file whose row ids are replayed (modulo the table's rows)
    target_hit_rate: float = 0.0  # hitrate: exact LRU hit rate at capacity_rows
    capacity_rows: int = 0  # hitrate: the LRU capacity (rows) that target_hit_rate refers to
    cold_probability: float = 0.0  # reuse: chance an access touches a row not reused lately
    mean_distance: float = 0.0  # reuse: mean LRU stack distance of the other (geometric) accesses

    def __post_init__(self):
        _require(self.kind in INDEX_DISTRIBUTIONS,
                 f"index distribution {self.kind!r}: choose {', '.join(INDEX_DISTRIBUTIONS)}")
        if self.kind == "zipf":
            _require(self.alpha > 0, f"zipf alpha must be > 0, got {self.alpha}")
        elif self.kind == "trace":
            _require(bool(self.path), "trace distribution needs a file: write trace:PATH")
            _require(Path(self.path).suffix.lower() in TRACE_SUFFIXES,
                     f"trace file {self.path!r}: use a {', '.join(TRACE_SUFFIXES)} file")
            _require(Path(self.path).is_file(), f"trace file {self.path!r} does not exist")
        elif self.kind == "hitrate":
            _require(0.0 <= self.target_hit_rate <= 1.0,
                     f"hitrate target must be in [0, 1], got {self.target_hit_rate}")
            _require(isinstance(self.capacity_rows, numbers.Integral)
                     and self.capacity_rows >= 1,
                     f"hitrate capacity must be a whole number of rows >= 1, "
                     f"got {self.capacity_rows}")
        elif self.kind == "reuse":
            _require(0.0 <= self.cold_probability <= 1.0,
                     f"reuse cold probability must be in [0, 1], got {self.cold_probability}")
            _require(math.isfinite(self.mean_distance) and self.mean_distance >= 0,
                     f"reuse mean distance must be finite and >= 0, got {self.mean_distance}")

    @property
    def is_locality(self) -> bool:
        """Whether indices come from a per-table locality stream (trace, hitrate, reuse)."""
        return self.kind in LOCALITY_DISTRIBUTIONS

    @classmethod
    def parse(cls, text: str) -> "IndexDistribution":
        """Parse uniform, zipf:ALPHA, trace:PATH, hitrate:RATE@CAPACITY_ROWS, reuse:COLD,MEAN."""
        kind, _, value = text.partition(":")
        if kind == "zipf":
            try:
                return cls("zipf", float(value))
            except ValueError:
                raise SpecError(f"--dist {text!r}: write zipf:ALPHA, e.g. zipf:1.05") from None
        if kind == "trace":
            _require(bool(value), f"--dist {text!r}: write trace:PATH (.npy, .csv or .txt)")
            distribution = cls("trace", path=value)
            _check_trace_contents(text, value)
            return distribution
        if kind == "hitrate":
            rate, capacity = _number_pair(text, value, "@", float, int,
                                          "hitrate:RATE@CAPACITY_ROWS, e.g. hitrate:0.9@100000")
            return cls("hitrate", target_hit_rate=rate, capacity_rows=capacity)
        if kind == "reuse":
            cold, mean = _number_pair(text, value, ",", float, float,
                                      "reuse:COLD_PROB,MEAN_DISTANCE, e.g. reuse:0.1,1000")
            return cls("reuse", cold_probability=cold, mean_distance=mean)
        _require(kind == "uniform" and not value, f"--dist {text!r}: choose {DIST_FORMS}")
        return cls("uniform")

    def label(self) -> str:
        """Short text form, the inverse of parse."""
        if self.kind == "zipf":
            return f"zipf:{self.alpha:g}"
        if self.kind == "trace":
            return f"trace:{self.path}"
        if self.kind == "hitrate":
            return f"hitrate:{_number_text(self.target_hit_rate)}@{self.capacity_rows}"
        if self.kind == "reuse":
            return (f"reuse:{_number_text(self.cold_probability)},"
                    f"{_number_text(self.mean_distance)}")
        return "uniform"


@dataclasses.dataclass(frozen=True)
class PoolingDistribution(SpecDict):
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
        _require(self.maximum >= 0, f"pooling maximum must be >= 0, got {self.maximum}")
        if self.kind == "fixed":
            _require(float(self.mean).is_integer(), f"fixed pooling must be whole, got {self.mean}")
            _require(self.maximum in (0, ) or self.maximum >= self.mean,
                     f"fixed pooling {self.mean:g} exceeds its maximum {self.maximum}")

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
class TableSpec(SpecDict):
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
class WorkloadSpec(SpecDict):
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
