"""Shape selection and size accounting for tensor-train (TT-Rec) embedding tables."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence


def prime_factorization(number: int) -> dict[int, int]:
    """Return the prime factorization of a positive integer as {prime: exponent}."""
    if number < 1:
        raise ValueError(f"number must be positive, got {number}")
    factors: dict[int, int] = {}
    remaining = number
    candidate = 2
    while candidate * candidate <= remaining:
        while remaining % candidate == 0:
            factors[candidate] = factors.get(candidate, 0) + 1
            remaining //= candidate
        # After 2, only odd candidates can be prime.
        candidate += 1 if candidate == 2 else 2
    if remaining > 1:
        factors[remaining] = factors.get(remaining, 0) + 1
    return factors


def divisors(number: int) -> list[int]:
    """Return all positive divisors of a positive integer in ascending order."""
    result = [1]
    for prime, exponent in prime_factorization(number).items():
        result = [divisor * prime**power for divisor in result for power in range(exponent + 1)]
    return sorted(result)


def _nondecreasing_factorizations(
    number: int, parts: int, smallest: int, candidates: Sequence[int]
) -> Iterator[tuple[int, ...]]:
    """Yield every nondecreasing tuple of `parts` factors >= smallest whose product is number."""
    if parts == 1:
        if number >= smallest:
            yield (number,)
        return
    for factor in candidates:
        if factor < smallest:
            continue
        # The first factor is the smallest, so factor**parts may not exceed the product.
        if factor**parts > number:
            break
        if number % factor == 0:
            remaining = number // factor
            for rest in _nondecreasing_factorizations(remaining, parts - 1, factor, candidates):
                yield (factor, *rest)


def balance_score(factors: Sequence[int]) -> float:
    """Return the Shannon entropy of factors normalised to sum to one (higher is more balanced)."""
    total = sum(factors)
    return -sum(factor / total * math.log(factor / total) for factor in factors)


def most_balanced_factorization(number: int, num_factors: int) -> tuple[int, ...]:
    """Return the ascending exact factorization of number into num_factors with the best balance."""
    if num_factors < 1:
        raise ValueError(f"num_factors must be >= 1, got {num_factors}")
    candidates = divisors(number)
    return max(
        _nondecreasing_factorizations(number, num_factors, 1, candidates), key=balance_score
    )


def factorize_rows(num_rows: int, num_cores: int = 3) -> tuple[int, ...]:
    """Return ascending near-balanced row factors whose product is >= num_rows (TT-Rec rounding).

    Following TT-Rec, the row count is rounded up to a multiple of 10**k for every k from 0 up to
    (number of decimal digits - 1); each rounded count is split exactly into its most balanced
    factorization, and the candidate with the highest balance score (entropy of the normalised
    factors) wins, ties going to the smaller rounding. Rounding matters because raw counts often
    contain a large prime: 10131227 rounds to 11000000 = 200 * 220 * 250. Factors are returned in
    ascending order; factor 0 is the most significant mixed-radix digit of a row index.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be positive, got {num_rows}")
    best: tuple[float, int, tuple[int, ...]] | None = None
    for exponent in range(len(str(num_rows))):
        granularity = 10**exponent
        rounded = -(-num_rows // granularity) * granularity
        factors = most_balanced_factorization(rounded, num_cores)
        # Negated exponent so that, on equal balance, the smaller rounding (less padding) wins.
        candidate = (balance_score(factors), -exponent, factors)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    assert best is not None
    return best[2]


def factorize_dim(dim: int, num_cores: int = 3) -> tuple[int, ...]:
    """Return ascending near-balanced factors whose product is exactly dim (16 -> 2, 2, 4)."""
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    return most_balanced_factorization(dim, num_cores)


def full_ranks(ranks: int | Sequence[int], num_cores: int) -> tuple[int, ...]:
    """Expand a rank spec (int or per-bond sequence of num_cores - 1) to (1, r_1, ..., 1)."""
    if isinstance(ranks, int):
        bond_ranks = (ranks,) * (num_cores - 1)
    else:
        bond_ranks = tuple(int(rank) for rank in ranks)
        if len(bond_ranks) == num_cores + 1 and bond_ranks[0] == bond_ranks[-1] == 1:
            bond_ranks = bond_ranks[1:-1]
    if len(bond_ranks) != num_cores - 1:
        raise ValueError(f"expected {num_cores - 1} bond ranks, got {len(bond_ranks)}")
    if any(rank < 1 for rank in bond_ranks):
        raise ValueError(f"ranks must be positive, got {bond_ranks}")
    return (1, *bond_ranks, 1)


def tt_parameter_count(
    row_factors: Sequence[int], dim_factors: Sequence[int], ranks: int | Sequence[int]
) -> int:
    """Return sum_k r_{k-1} * n_k * d_k * r_k, the number of TT core parameters."""
    if len(row_factors) != len(dim_factors):
        raise ValueError("row_factors and dim_factors must have the same length")
    rank_chain = full_ranks(ranks, len(row_factors))
    return sum(
        rank_chain[core] * row_factors[core] * dim_factors[core] * rank_chain[core + 1]
        for core in range(len(row_factors))
    )


def tt_table_bytes(
    num_rows: int, dim: int, rank: int | Sequence[int], num_cores: int = 3, element_bytes: int = 4
) -> int:
    """Return the bytes of TT cores for a table using the default factorizations."""
    row_factors = factorize_rows(num_rows, num_cores)
    dim_factors = factorize_dim(dim, num_cores)
    return tt_parameter_count(row_factors, dim_factors, rank) * element_bytes


def embedding_compression_ratio(
    table_rows: Sequence[int],
    dim: int,
    num_compressed: int,
    rank: int | Sequence[int],
    num_cores: int = 3,
) -> float:
    """Return dense bytes / (TT bytes of the num_compressed largest tables + dense bytes of rest).

    This is the embedding-only model-size compression reported by TT-Rec (fp32 everywhere).
    """
    order = sorted(range(len(table_rows)), key=lambda table: table_rows[table], reverse=True)
    compressed = set(order[:num_compressed])
    dense_bytes = sum(table_rows) * dim * 4
    mixed_bytes = sum(
        tt_table_bytes(rows, dim, rank, num_cores) if table in compressed else rows * dim * 4
        for table, rows in enumerate(table_rows)
    )
    return dense_bytes / mixed_bytes
