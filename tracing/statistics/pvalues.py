"""p-values in log space: Spearman (t-approximation), Fisher's method and PERMTEST, all as log10 p.

Related models routinely give p far below 1e-308, so nothing here ever forms p itself: every tail is
computed as a logarithm, and "how small" stays visible (e.g. -1.2e4) instead of becoming 0.0.

    rho, lp = identity_spearman(cols)          # matching vs identity, one-sided
    combined, n_skipped = fisher_log10p([lp1, lp2, ...])
    layer = bonferroni_log10p([lp1, lp2, ...])   # dependent tests (the experts of one layer)
    adjusted = holm_log10(matrix)               # Holm's step-down correction, any shape
    permtest_log10p(observed, null, higher_is_related=True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.special
import torch

from tracing.errors import TracingError

LN10 = math.log(10.0)


# ---------------------------------------------------------------------------- Student-t tail
def log_t_sf(t: float, df: float) -> float:
    """ln P(T > t) for Student's t with df degrees of freedom, as scipy.stats.t.logsf computes it (log of the upper
    tail above the median, log1p of minus the lower one below it; -inf where the tail underflows), without
    importing scipy.stats (a quarter of a second at start-up)."""
    with np.errstate(divide="ignore"):
        if t > 0:
            return float(np.log(scipy.special.stdtr(df, -t)))
        return float(np.log1p(-scipy.special.stdtr(df, t)))


def _log_t_sf_series(log_x: float, a: float) -> float:
    """ln of P(T > t) for t > 0, Student t with 2a degrees of freedom, where x = 2a / (2a + t^2) < 1.

    P(T > t) = I_x(a, 1/2) / 2 and I_x(a, b) = x^a / (a B(a, b)) * 2F1(a, 1-b; a+1; x); the
    hypergeometric series has positive terms c_{k+1}/c_k = (a+k)(k+1/2) x / ((a+k+1)(k+1)) < x,
    so it converges geometrically and is exact to double precision for any t (no underflow). The terms
    are summed in log space, a chunk of them at a time, until they no longer change the sum.
    """
    ln_total, k0, chunk, ln_c = 0.0, 0, 256, 0.0  # ln c_0 = 0
    while k0 < 10_000_000:
        k = np.arange(k0, k0 + chunk, dtype=np.float64)
        ln_ratio = np.log(a + k) + np.log(k + 0.5) + log_x - np.log(a + k + 1) - np.log(k + 1)
        ln_terms = ln_c + np.cumsum(ln_ratio)  # ln c_{k0+1} .. ln c_{k0+chunk}
        ln_total = float(np.logaddexp(ln_total, scipy.special.logsumexp(ln_terms)))
        ln_c = float(ln_terms[-1])
        ln_rest = ln_c + log_x - math.log(-math.expm1(log_x))  # remaining tail < c_last * x / (1 - x)
        if ln_rest < ln_total - 40.0:
            break
        k0, chunk = k0 + chunk, chunk * 2
    return math.log(0.5) + a * log_x - math.log(a) - scipy.special.betaln(a, 0.5) + ln_total


def spearman_log10p(rho: float, n: int) -> float:
    """log10 of the ONE-SIDED p-value P(rho' >= rho) for a Spearman correlation of n pairs under H0.

    H1 is positive correlation: related models give a matching close to the identity, rho > 0; a
    negative rho is no evidence of relatedness (p >= 1/2). This is a deliberate departure from the
    original code, which used scipy.stats.spearmanr's two-sided p (twice as large for rho > 0, and
    "significant" for rho < 0 too). The tail uses the t-approximation t = rho sqrt((n-2)/(1-rho^2)),
    df = n-2. With x = df/(df+t^2) = 1 - rho^2 the tail is computed from (1-rho)(1+rho) directly, by
    scipy's t.logsf near the centre and an exact hypergeometric series in the far tail, where logsf
    underflows to -inf. The result is never below the exact bound -log10(n!): one of the n!
    orderings gives rho = 1, so rho = 1 (perfect matching) reports exactly log10(1/n!).
    NaN rho (constant input) gives NaN.
    """
    if rho is None or math.isnan(rho):
        return math.nan
    if n < 1:
        raise TracingError(f"Spearman p-value needs at least one pair, got n={n}")
    rho = min(max(float(rho), -1.0), 1.0)
    log10_bound = -math.lgamma(n + 1) / LN10  # P(rho = 1) = 1/n! under H0
    if rho == 1.0:
        return log10_bound
    if rho == -1.0:
        return 0.0
    if n < 3:  # n = 2 has rho = +-1 only; n = 1 has no correlation
        return math.nan
    df = n - 2
    log_x = math.log1p(-rho) + math.log1p(rho)  # ln(1 - rho^2), precise for rho near +-1
    ln_p = math.nan
    if rho <= 0 or log_x >= math.log(0.5):  # central part: scipy is exact there
        ln_p = log_t_sf(rho * math.sqrt(df / math.exp(log_x)), df)
    if rho > 0 and not ln_p > -700.0:  # far tail, where logsf loses precision or underflows to -inf
        ln_p = _log_t_sf_series(log_x, df / 2)
    return max(min(ln_p / LN10, 0.0), log10_bound)


def _as_numpy(v: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64).ravel()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan  # constant input: correlation undefined
    ra, rb = _ranks(a), _ranks(b)  # average ranks for ties
    n = len(a)
    if len(np.unique(ra)) == n and len(np.unique(rb)) == n:  # no ties: exact integer formula, rho = 1 exactly
        d2 = int(((ra.astype(np.int64) - rb.astype(np.int64)) ** 2).sum())
        return 1.0 - 6.0 * d2 / (n * (n * n - 1))
    import scipy.stats  # ties (never between the partners of two matchings): imported only here, 0.27 s

    return float(scipy.stats.spearmanr(a, b).statistic)


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a (n,), tied values sharing their mean rank: scipy.stats.rankdata's default."""
    order = np.argsort(a, kind="stable")
    s = a[order]
    first = np.concatenate([[True], s[1:] != s[:-1]])  # (n,) the first of each run of equal values
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(a)))
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.repeat(starts + 1 + (counts - 1) / 2, counts)
    return ranks


def identity_spearman(perm: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """Spearman rho between `perm` (n,) and arange(n), with its one-sided log10 p. Constant input: (nan, nan)."""
    p = _as_numpy(perm)
    rho = _spearman(p, np.arange(len(p), dtype=np.float64))
    return rho, spearman_log10p(rho, len(p))


def perm_pair_spearman(p1: np.ndarray | torch.Tensor, p2: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """Spearman rho between two index vectors of equal length (e.g. two matchings), with its one-sided log10 p."""
    a, b = _as_numpy(p1), _as_numpy(p2)
    if len(a) != len(b):
        raise TracingError(f"cannot correlate index vectors of lengths {len(a)} and {len(b)}: "
                           "compare matchings of the same layer width")
    rho = _spearman(a, b)
    return rho, spearman_log10p(rho, len(a))


# ---------------------------------------------------------------------------- Fisher
def fisher_log10p(log10ps: Sequence[float]) -> tuple[float, int]:
    """Fisher's method on k log10 p-values: returns (combined log10 p, number of NaN inputs skipped).

    X = -2 sum ln p_i follows chi2 with 2k df under H0. For even df the survival function is exact
    in closed form, P(X > x) = e^{-y} sum_{j<k} y^j / j! with y = x/2 = -sum ln p_i, evaluated with
    logsumexp: exact for any k and any size of p (no underflow). No usable input gives NaN.
    """
    vals = np.asarray([math.nan if v is None else float(v) for v in log10ps], dtype=np.float64)
    nan = np.isnan(vals)
    n_skipped = int(nan.sum())
    if n_skipped:
        warnings.warn(f"Fisher's method: skipped {n_skipped} NaN p-value(s) of {len(vals)} "
                      "(constant input, e.g. a degenerate layer)", stacklevel=2)
    vals = np.minimum(vals[~nan], 0.0)  # log10 p <= 0; clip round-off
    k = len(vals)
    if k == 0:
        return math.nan, n_skipped
    y = -LN10 * float(vals.sum())  # = X / 2 >= 0
    if math.isinf(y):
        return -math.inf, n_skipped
    if y == 0.0:
        return 0.0, n_skipped
    j = np.arange(k, dtype=np.float64)
    ln_sf = -y + float(scipy.special.logsumexp(j * math.log(y) - scipy.special.gammaln(j + 1)))
    return min(ln_sf / LN10, 0.0), n_skipped


def bonferroni_log10p(log10ps: Sequence[float]) -> float:
    """Bonferroni's combination of k log10 p-values: log10 min(1, k · min p), valid under any dependence between
    them (NaN inputs skipped and not counted; none usable: NaN). For the experts of one MoE layer, which an upcycle
    makes near-copies of each other: their tests are not independent, so Fisher's method would overstate."""
    vals = np.asarray([math.nan if v is None else float(v) for v in log10ps], dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    if len(vals) == 0:
        return math.nan
    return min(float(vals.min()) + math.log10(len(vals)), 0.0)


# ---------------------------------------------------------------------------- Holm
def holm_log10(log10ps: np.ndarray) -> np.ndarray:
    """Holm-adjusted log10 p-values (same shape), computed in log space; NaN counts as p = 1.

    Controls the family-wise error rate under any dependence between the tests."""
    flat = np.nan_to_num(np.asarray(log10ps, np.float64).ravel(), nan=0.0)
    m = len(flat)
    order = np.argsort(flat, kind="stable")
    adj = flat[order] + np.log10(m - np.arange(m))  # (m - k) p_(k), k = 0..m-1
    adj = np.minimum(np.maximum.accumulate(adj), 0.0)
    out = np.empty(m)
    out[order] = adj
    return out.reshape(np.shape(log10ps))


# ---------------------------------------------------------------------------- PERMTEST
def permtest_log10p(observed: float, null: Sequence[float], higher_is_related: bool = True) -> float:
    """log10 of the exact permutation-test p = (1 + #{null at least as extreme}) / (T + 1).

    "At least as extreme" is >= observed when higher values mean related, <= otherwise. A NaN null
    value counts as extreme (conservative). Never rounded: T = 19 and no exceedance gives -log10(20).
    """
    if observed is None or math.isnan(observed):
        return math.nan
    vals = np.asarray(list(null), dtype=np.float64)
    extreme = vals >= observed if higher_is_related else vals <= observed
    count = int(extreme.sum()) + int(np.isnan(vals).sum())
    return math.log10(1 + count) - math.log10(len(vals) + 1)
