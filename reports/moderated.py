"""Empirical-Bayes moderated t-tests (Smyth 2004): many short rows share one variance prior."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.special import digamma, polygamma
from scipy.stats import t as student_t

# Below this many rows with a spread the prior cannot be estimated; each row keeps its own
# variance (d0 = 0, the ordinary one-sample t-test).
MIN_ROWS_FOR_PRIOR = 3


def _trigamma(value: float) -> float:
    """psi'(x)."""
    return float(polygamma(1, value))


def _trigamma_inverse(value: float) -> float:
    """The x > 0 with psi'(x) = value (psi' falls monotonically from +inf to 0)."""
    low, high = 1e-8, 1e8
    if value >= _trigamma(low):
        return low
    if value <= _trigamma(high):
        return high
    return float(brentq(lambda x: _trigamma(x) - value, low, high, xtol=1e-10))


def variance_prior(variances: np.ndarray, dofs: np.ndarray) -> tuple[float, float]:
    """(d0, s0^2) of the scaled inverse-chi^2 prior fitted to the rows' sample variances.

    The method of moments on log variances (Smyth 2004, section 6.2): the spread of the
    log variances beyond what chi^2 sampling alone gives is the rows' real heterogeneity."""
    usable = (variances > 0) & np.isfinite(variances) & (dofs > 0)
    if usable.sum() < MIN_ROWS_FOR_PRIOR:
        return 0.0, math.nan
    variances, dofs = variances[usable], dofs[usable]
    logs = np.log(variances) - digamma(dofs / 2) + np.log(dofs / 2)
    mean_log = float(logs.mean())
    excess = float(logs.var(ddof=1) - np.mean(polygamma(1, dofs / 2)))
    if excess <= 0:  # no more spread than sampling gives: all rows share one variance
        return math.inf, math.exp(mean_log)
    prior_dof = 2 * _trigamma_inverse(excess)
    prior_variance = math.exp(mean_log + digamma(prior_dof / 2) - math.log(prior_dof / 2))
    return prior_dof, prior_variance


def moderated_p_values(samples: Sequence[np.ndarray]) -> list[float]:
    """Two-sided p-values that each row's mean is 0, its variance shrunk towards the prior.

    samples: one array per row (>= 2 values each, e.g. a row's per-round log ratios). The
    moderated t has d + d0 degrees of freedom: with 3 rounds a row alone has 2, and the
    rows' shared noise level lends it more."""
    counts = np.array([len(values) for values in samples], dtype=np.float64)
    if np.any(counts < 2):
        raise ValueError("every row needs at least 2 values for a variance")
    means = np.array([float(np.mean(values)) for values in samples])
    variances = np.array([float(np.var(values, ddof=1)) for values in samples])
    return moderated_t_p_values(means, variances, counts - 1, 1 / counts)


def moderated_t_p_values(effects: np.ndarray, variances: np.ndarray, dofs: np.ndarray,
                         scales: np.ndarray) -> list[float]:
    """Two-sided p-values of effect / sqrt(posterior variance * scale), one per row.

    A row with dof 0 (no variance of its own) takes the prior's variance, or, without a
    fitted prior, the pooled variance of the rows that have one; NaN when no row has any.
    Two-sample rows give the difference of means, the pooled variance (dof n1 + n2 - 2)
    and scale 1/n1 + 1/n2; one-sample rows the mean, the variance and 1/n."""
    effects, variances = np.asarray(effects, float), np.asarray(variances, float)
    dofs, scales = np.asarray(dofs, float), np.asarray(scales, float)
    prior_dof, prior_variance = variance_prior(variances, dofs)
    own = (dofs > 0) & np.isfinite(variances)
    pooled_dof = float(dofs[own].sum())
    pooled = float((dofs[own] * variances[own]).sum() / pooled_dof) if pooled_dof else math.nan
    p_values = []
    for effect, variance, dof, scale in zip(effects, variances, dofs, scales):
        if prior_dof == 0 and dof > 0:
            posterior, total_dof = variance, dof
        elif prior_dof == 0:  # no prior and no variance of its own: the rows' pooled one
            posterior, total_dof = pooled, pooled_dof
        elif math.isinf(prior_dof):
            posterior, total_dof = prior_variance, math.inf
        else:
            dof = dof if dof > 0 else 0.0
            posterior = (prior_dof * prior_variance + dof * (variance if dof else 0.0)) / (
                prior_dof + dof)
            total_dof = prior_dof + dof
        if not math.isfinite(posterior) or total_dof <= 0:
            p_values.append(math.nan)
            continue
        if posterior <= 0:  # identical values and no prior: undefined t, decide on the effect
            p_values.append(1.0 if effect == 0 else 0.0)
            continue
        statistic = effect / math.sqrt(posterior * scale)
        p_values.append(float(2 * student_t.sf(abs(statistic), total_dof)))
    return p_values
