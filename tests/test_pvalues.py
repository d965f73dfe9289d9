"""Log-space p-values: Spearman (one-sided t tail), Fisher, PERMTEST, checked against mpmath at high precision."""

import math
import warnings

import mpmath
import numpy as np
import pytest
import scipy.stats

from tracing.errors import TracingError
from tracing.statistics.pvalues import (
    fisher_log10p,
    identity_spearman,
    perm_pair_spearman,
    permtest_log10p,
    spearman_log10p,
)

mpmath.mp.dps = 60


def mp_spearman_log10p(rho: float, n: int) -> float:
    """Reference: P(T_{n-2} > t) = I_{1-rho^2}((n-2)/2, 1/2) / 2 for rho > 0, at 60 digits."""
    a, x = mpmath.mpf(n - 2) / 2, 1 - mpmath.mpf(rho) ** 2
    return float(mpmath.log10(mpmath.betainc(a, mpmath.mpf(1) / 2, 0, x, regularized=True) / 2))


def mp_fisher_log10p(log10ps: list[float]) -> float:
    """Reference: chi2 survival with 2k df at x = -2 sum ln p, by the closed form for even df, at 60 digits."""
    y = -mpmath.log(10) * sum(mpmath.mpf(v) for v in log10ps)
    return float(mpmath.log10(mpmath.exp(-y) * sum(y ** j / mpmath.factorial(j) for j in range(len(log10ps)))))


@pytest.mark.parametrize("rho,n", [(0.05, 11008), (0.3, 11008), (0.99, 11008), (0.999999, 11008),
                                   (0.1, 50), (0.9, 128), (0.7, 4096), (0.6, 4096),
                                   (0.2, 100_000), (0.5, 10)])
def test_spearman_tail_matches_mpmath_far_beyond_float_underflow(rho, n):
    got = spearman_log10p(rho, n)
    assert got == pytest.approx(mp_spearman_log10p(rho, n), rel=1e-6)


def test_related_layer_of_real_size_reports_about_minus_ten_thousand_not_zero():
    got = spearman_log10p(0.99, 11008)
    assert -1e4 < got < -9e3  # p ~ 1e-9364: far below float's 1e-308, still reported
    assert scipy.stats.t.logsf(0.99 * math.sqrt(11006 / (1 - 0.99 ** 2)), 11006) == -math.inf  # scipy alone fails


def test_spearman_is_one_sided_half_of_scipys_two_sided_p():
    rng = np.random.default_rng(0)
    x = np.arange(200)
    y = x + rng.normal(0, 150, 200)
    res = scipy.stats.spearmanr(x, y)
    assert spearman_log10p(res.statistic, 200) == pytest.approx(math.log10(res.pvalue / 2), rel=1e-9)
    assert spearman_log10p(-0.5, 200) > math.log10(0.5)  # negative correlation is no evidence of relatedness


@pytest.mark.parametrize("n", [3, 10, 128, 11008])
def test_perfect_matching_gets_exact_bound_one_over_n_factorial(n):
    assert spearman_log10p(1.0, n) == -math.lgamma(n + 1) / math.log(10)
    rho, lp = identity_spearman(np.arange(n))
    assert rho == 1.0 and lp == -math.lgamma(n + 1) / math.log(10)
    assert spearman_log10p(1 - 1e-15, n) >= -math.lgamma(n + 1) / math.log(10)  # never below the bound


def test_spearman_is_finite_and_at_most_zero_everywhere():
    for n in (3, 4, 17, 1000, 11008):
        for rho in np.linspace(-1, 1, 201):
            lp = spearman_log10p(float(rho), n)
            assert math.isfinite(lp) and lp <= 0.0, (rho, n, lp)
    assert spearman_log10p(-1.0, 100) == 0.0


def test_identity_spearman_on_permutations_and_constant_input():
    perm = np.random.default_rng(1).permutation(500)
    rho, lp = identity_spearman(perm)
    ref = scipy.stats.spearmanr(perm, np.arange(500))
    assert rho == pytest.approx(ref.statistic, abs=1e-12)
    assert lp == pytest.approx(math.log10(ref.pvalue / 2) if ref.statistic > 0 else lp)
    assert identity_spearman(np.arange(500)[::-1].copy())[1] == 0.0
    rho, lp = identity_spearman(np.zeros(8))
    assert math.isnan(rho) and math.isnan(lp)


def test_perm_pair_spearman_correlates_two_index_vectors():
    p = np.random.default_rng(2).permutation(300)
    assert perm_pair_spearman(p, p) == (1.0, -math.lgamma(301) / math.log(10))
    with pytest.raises(TracingError, match="same layer width"):
        perm_pair_spearman(p, p[:10])


@pytest.mark.parametrize("log10ps", [[-3.0, -200.0, -5000.0], [-0.3, -0.1], [-400.0] * 32,
                                     [-1e4, -1e4, -2.0, -0.01], [-0.5]])
def test_fisher_matches_mpmath_exact_chi2_tail(log10ps):
    got, skipped = fisher_log10p(log10ps)
    assert skipped == 0
    assert got == pytest.approx(mp_fisher_log10p(log10ps), rel=1e-9)


def test_fisher_of_one_p_is_that_p_and_moderate_values_agree_with_scipy():
    assert fisher_log10p([-7.25])[0] == pytest.approx(-7.25, rel=1e-12)
    ps = [0.2, 0.03, 0.5, 0.01]
    ref = scipy.stats.combine_pvalues(ps, method="fisher").pvalue
    assert fisher_log10p([math.log10(p) for p in ps])[0] == pytest.approx(math.log10(ref), rel=1e-9)


def test_fisher_skips_nan_layers_with_a_warning_and_counts_them():
    with pytest.warns(UserWarning, match="skipped 2 NaN"):
        got, skipped = fisher_log10p([-10.0, math.nan, -20.0, math.nan])
    assert skipped == 2 and got == pytest.approx(mp_fisher_log10p([-10.0, -20.0]), rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, skipped = fisher_log10p([math.nan])
    assert math.isnan(got) and skipped == 1  # nothing to combine


def test_permtest_p_is_one_plus_count_over_T_plus_one_unrounded():
    assert permtest_log10p(5.0, [1.0] * 19) == -math.log10(20)
    assert permtest_log10p(5.0, [1.0] * 18 + [5.0]) == math.log10(2) - math.log10(20)  # ties count
    assert permtest_log10p(0.1, [1.0] * 19, higher_is_related=False) == -math.log10(20)
    assert permtest_log10p(0.1, [1.0] * 19, higher_is_related=True) == 0.0


def test_t_tail_and_ranks_match_scipy_stats_bit_for_bit():
    """pvalues leaves scipy.stats unimported (a quarter of a second at start-up) but computes what it would."""
    from tracing.statistics.pvalues import _ranks, log_t_sf

    rng = np.random.default_rng(0)
    for _ in range(500):
        df, t = int(rng.integers(1, 20000)), float(rng.normal() * rng.choice([0.01, 1.0, 30.0, 300.0]))
        assert log_t_sf(t, df) == float(scipy.stats.t.logsf(t, df))  # -inf alike where the tail underflows
        a = rng.integers(0, int(rng.integers(1, 10)), int(rng.integers(1, 40))).astype(float)
        assert np.array_equal(_ranks(a), scipy.stats.rankdata(a))  # ties share their mean rank
