"""Tests of the empirical-Bayes moderated t (reports/moderated.py) and its use by check --ab."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ttest_1samp

from bench.records import ResultRow
from reports.compare import ROUND_TEST_MODERATED, ROUND_TEST_PAIRED, Side, compare_rows
from reports.moderated import moderated_p_values, variance_prior


def _rows_from_prior(rng, rows: int, values: int, prior_dof: float, prior_variance: float):
    """Null rows: each has its own variance drawn from the scaled inverse-chi^2 prior."""
    variances = prior_dof * prior_variance / rng.chisquare(prior_dof, size=rows)
    return [rng.normal(0.0, math.sqrt(variance), size=values) for variance in variances]


def test_the_prior_is_recovered_from_many_rows():
    rng = np.random.default_rng(7)
    samples = _rows_from_prior(rng, 4000, 3, prior_dof=6.0, prior_variance=0.01)
    variances = np.array([np.var(values, ddof=1) for values in samples])
    prior_dof, prior_variance = variance_prior(variances, np.full(len(samples), 2.0))
    assert prior_dof == pytest.approx(6.0, rel=0.25)
    assert prior_variance == pytest.approx(0.01, rel=0.1)


def test_rows_sharing_one_variance_get_an_infinite_prior():
    rng = np.random.default_rng(3)
    samples = [rng.normal(0.0, 0.1, size=3) for _ in range(3000)]
    variances = np.array([np.var(values, ddof=1) for values in samples])
    prior_dof, prior_variance = variance_prior(variances, np.full(len(samples), 2.0))
    assert prior_dof > 50  # infinite, or so large that the rows' own variances hardly count
    assert prior_variance == pytest.approx(0.01, rel=0.1)


def test_too_few_rows_fall_back_to_the_ordinary_t_test():
    samples = [np.array([0.1, 0.2, 0.15]), np.array([0.0, -0.1, 0.05])]
    expected = [ttest_1samp(values, 0.0).pvalue for values in samples]
    assert moderated_p_values(samples) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2 values"):
        moderated_p_values([np.array([0.1])])


def test_null_rows_are_calibrated_and_a_shift_gains_power():
    """Under the null p < 0.05 about 5% of the time; a 25% shift that 3 rounds alone rarely
    prove is proven far more often once the rows' shared noise lends degrees of freedom."""
    rng = np.random.default_rng(11)
    null = _rows_from_prior(rng, 4000, 3, prior_dof=8.0, prior_variance=0.08 ** 2)
    p_null = np.array(moderated_p_values(null))
    assert 0.035 < np.mean(p_null < 0.05) < 0.065
    shifted = [values + math.log(1.25) for values in
               _rows_from_prior(rng, 400, 3, prior_dof=8.0, prior_variance=0.08 ** 2)]
    p_moderated = np.array(moderated_p_values(null[:3600] + shifted))[3600:]
    p_paired = np.array([ttest_1samp(values, 0.0).pvalue for values in shifted])
    assert np.mean(p_moderated < 0.01) > np.mean(p_paired < 0.01) + 0.2
    assert not np.isnan(p_moderated).any()


def _round(medians: dict[str, float]) -> list[ResultRow]:
    """One round's rows: just the task keys and medians the paired tests read."""
    return [ResultRow(task_key=key, op="sls", impl="embedding_bag", workload="smoke",
                      precision="fp32", status="ok", fingerprint="fp", code_version="cv",
                      median_s=median, n_samples=5,
                      samples_s=str([median] * 5), metrics='{"calls_per_rep":1}')
            for key, median in medians.items()]


def test_check_ab_can_test_rounds_with_the_moderated_t():
    """24 rows, 3 rounds, noise about 5% a round: a 25% slowdown of every row is proven by
    the moderated t on most rows, by the per-row paired t on few."""
    rng = np.random.default_rng(5)
    keys = [f"k{index}" for index in range(24)]
    baseline_rounds, candidate_rounds = [], []
    for _ in range(3):
        baseline_rounds.append(_round({key: 1.0 for key in keys}))
        candidate_rounds.append(_round({key: 1.25 * math.exp(rng.normal(0, 0.05))
                                        for key in keys}))
    verdicts = {}
    for test in (ROUND_TEST_PAIRED, ROUND_TEST_MODERATED):
        found = compare_rows(Side(baseline_rounds[0], rounds=baseline_rounds),
                             Side(candidate_rounds[0], rounds=candidate_rounds),
                             check_code_version=False, round_test=test)
        verdicts[test] = sum(verdict.verdict == "REGRESSED" for verdict in found)
    assert verdicts[ROUND_TEST_MODERATED] >= 20
    assert verdicts[ROUND_TEST_MODERATED] > verdicts[ROUND_TEST_PAIRED]
    with pytest.raises(ValueError, match="round_test must be one of"):
        compare_rows([], [], round_test="sign")
