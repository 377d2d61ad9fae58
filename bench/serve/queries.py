"""Query-size distributions (items, i.e. user-item pairs, per query) and the seeded query table."""

from __future__ import annotations

import dataclasses

import numpy as np

from bench.records import dumps_compact

# The MLPerf DLRM reference aggregates 100 to 700 user-item pairs into one query.
DLRMV2_RANGE = (100, 700)
# Heavy-tailed sizes as DeepRecSys describes production traffic (most queries small, a long
# tail of large ones); a lognormal with these parameters is our model of it, not their data.
PRODUCTION_MEDIAN, PRODUCTION_SIGMA, PRODUCTION_MAX = 64, 1.0, 1024
QUERY_SIZE_HELP = ("fixed:N, uniform:LO,HI, dlrmv2 (uniform 100..700, as MLPerf DLRM), "
                   "production (heavy-tailed lognormal, median 64, sigma 1, at most 1024) or "
                   "lognormal:MEDIAN,SIGMA,MAX")
# Sample-pool rows a worker holds per item of the largest query: queries are windows of it.
POOL_ROWS_MIN = 4096


class QuerySizeError(ValueError):
    """A query-size specification that cannot be parsed; the message says how to write one."""


@dataclasses.dataclass(frozen=True)
class QuerySizes:
    """A distribution of items per query."""

    kind: str  # fixed, uniform or lognormal
    low: int = 1  # fixed: the size; uniform: the smallest
    high: int = 1  # uniform: the largest; lognormal: the cap
    median: float = 0.0  # lognormal only
    sigma: float = 0.0  # lognormal only
    name: str = ""  # the text it was parsed from

    @property
    def largest(self) -> int:
        """The largest size this distribution draws."""
        return self.low if self.kind == "fixed" else self.high

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """count sizes (int64, each in 1..largest)."""
        if self.kind == "fixed":
            return np.full(count, self.low, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=count, dtype=np.int64)
        values = rng.lognormal(np.log(self.median), self.sigma, size=count)
        return np.clip(np.rint(values), 1, self.high).astype(np.int64)

    def to_dict(self) -> dict:
        """The parameters, for params."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if value not in (0.0, "") or key == "kind"}


def _integers(text: str, count: int, spec: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or min(values) < 1:
        raise QuerySizeError(f"--query-size {spec!r}: expected {count} positive whole "
                             f"number(s); write {QUERY_SIZE_HELP}")
    return values


def parse_query_sizes(spec: str) -> QuerySizes:
    """A QuerySizes from its command-line text; QuerySizeError says what is wrong."""
    kind, _, rest = spec.strip().partition(":")
    if kind == "dlrmv2" and not rest:
        return QuerySizes("uniform", *DLRMV2_RANGE, name=spec)
    if kind == "production" and not rest:
        return QuerySizes("lognormal", 1, PRODUCTION_MAX, PRODUCTION_MEDIAN, PRODUCTION_SIGMA,
                          name=spec)
    if kind == "fixed":
        (size,) = _integers(rest, 1, spec)
        return QuerySizes("fixed", size, size, name=spec)
    if kind == "uniform":
        low, high = _integers(rest, 2, spec)
        if low > high:
            raise QuerySizeError(f"--query-size {spec!r}: LO {low} > HI {high}")
        return QuerySizes("uniform", low, high, name=spec)
    if kind == "lognormal":
        parts = rest.split(",")
        try:
            median, sigma, cap = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, IndexError):
            raise QuerySizeError(f"--query-size {spec!r}: write lognormal:MEDIAN,SIGMA,MAX, "
                                 "e.g. lognormal:64,1.0,1024") from None
        if not (median >= 1 and sigma > 0 and cap >= median) or len(parts) != 3:
            raise QuerySizeError(f"--query-size {spec!r}: need MEDIAN >= 1, SIGMA > 0, "
                                 "MAX >= MEDIAN")
        return QuerySizes("lognormal", 1, cap, median, sigma, name=spec)
    raise QuerySizeError(f"--query-size {spec!r}: unknown; write {QUERY_SIZE_HELP}")


@dataclasses.dataclass(frozen=True)
class QueryTable:
    """The queries LoadGen's sample indices name: sizes, and where each starts in the pool."""

    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    pool_rows: int

    def describe(self) -> str:
        """A stable text of the table, for task keys."""
        return dumps_compact([self.pool_rows, list(self.sizes[:8]), sum(self.sizes)])


def pool_rows_for(sizes: QuerySizes) -> int:
    """Rows of the sample pool: twice the largest query, at least POOL_ROWS_MIN."""
    return max(POOL_ROWS_MIN, 2 * sizes.largest)


def query_table(sizes: QuerySizes, count: int, seed: int) -> QueryTable:
    """count seeded queries, each a window of consecutive pool rows."""
    rng = np.random.default_rng([seed, 14])
    drawn = sizes.draw(count, rng)
    pool = pool_rows_for(sizes)
    starts = rng.integers(0, pool - drawn + 1, dtype=np.int64)
    return QueryTable(tuple(int(value) for value in drawn), tuple(int(value) for value in starts),
                      pool)


def size_summary(sizes) -> dict:
    """Count, mean, percentiles and extremes of the query sizes actually served."""
    values = np.asarray(list(sizes), dtype=np.float64)
    if values.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"count": int(values.size), "mean": round(float(values.mean()), 2),
            "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": int(values.min()), "max": int(values.max())}
