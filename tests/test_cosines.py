"""Cosines of bf16 rows: a bf16 product certifies the matching only where the float32 product would find the same
one (then every p-value is what the float32 matrix gives); where it cannot, "fast" matches greedily on the bf16
product itself, which stays exact under H0, and "exact" makes the float32 product."""

import numpy as np
import pytest
import torch

from tracing import cosines, matching
from tracing.statistics.common import identity_test


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).bfloat16()  # (n, d)


def _derived(a: torch.Tensor, seed: int, noise: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = a.float() + noise * torch.randn(a.shape, generator=g)
    return b[torch.randperm(a.shape[0], generator=g)].bfloat16()  # its units in another order


def test_the_bf16_products_error_bound_holds():
    """The bound the certificate uses, |bf16-result cosine - float32 cosine| <= 2^-8/(1-2^-8) |coarse| + 2 d 2^-24,
    on cosines of every size (related rows near 1, unrelated ones near 0)."""
    a = _rows(300, 512, 0)
    b = torch.cat([_derived(a, 1)[:150], _rows(150, 512, 2)])
    exact = cosines.exact_bf16_cosines(a, b)  # (300, 300)
    coarse = (a @ b.T).float() * cosines.inv_norms(a)[:, None] * cosines.inv_norms(b)[None, :]
    u = cosines.BF16_ROUNDING
    bound = u / (1 - u) * coarse.abs() + 2 * a.shape[1] * cosines.FP32_UNIT
    assert ((coarse - exact).abs() <= bound).all()
    assert ((coarse - exact).abs() > 0.1 * bound).any()  # a bound that is not vacuous


def test_certified_pairs_are_the_float32_matrix_pairs():
    a = _rows(200, 256, 3)
    b = _derived(a, 4)
    lazy = matching.similarity(a, b) if cosines.cpu_has_bf16() else cosines.LazyCosine(a, b)
    pairs = lazy.certified_best()
    assert pairs is not None and lazy._exact is None and lazy._coarse is None  # no (n, m) matrix was made
    exact = matching.pair_units(matching.cosine_matrix(a, b), solver="greedy")
    assert exact.immediate
    assert dict(zip(*(p.tolist() for p in pairs))) == dict(zip(exact.a.tolist(), exact.b.tolist()))


@pytest.mark.parametrize("kind", ["related", "degenerate", "wider A"])
def test_identity_test_on_lazy_cosines_is_the_float32_one(kind):
    a = _rows(150, 128, 5)
    b = {"related": lambda: _derived(a, 6), "degenerate": lambda: _derived(a, 6),
         "wider A": lambda: _derived(a, 6)[:120]}[kind]()
    if kind == "degenerate":
        b[3] = 0  # a zeroed unit: left out, so the float32 path decides
    ok_a, ok_b = matching.usable(a), matching.usable(b)
    for method in ("fast", "exact"):
        lazy = identity_test(cosines.LazyCosine(a, b), ok_a, ok_b, method, seed=1)
        full = identity_test(matching.cosine_matrix(a, b), ok_a, ok_b, method, seed=1)
        for key in ("rho", "log10_pvalue", "n_units", "excluded_base", "excluded_ft", "solver"):
            assert lazy[key] == full[key] or (np.isnan(lazy[key]) and np.isnan(full[key])), (kind, method, key)


def test_unrelated_rows_are_matched_on_the_bf16_product_without_a_float32_one(monkeypatch):
    """fast: greedy on the coarse cosines (no float32 product); exact: the float32 matrix's optimal assignment."""
    a, b = _rows(150, 128, 5), _rows(150, 128, 7)
    ok = torch.ones(150, dtype=torch.bool)
    full = identity_test(matching.cosine_matrix(a, b), ok, ok, "exact", seed=1)
    assert identity_test(cosines.LazyCosine(a, b), ok, ok, "exact", seed=1)["log10_pvalue"] == full["log10_pvalue"]
    monkeypatch.setattr(cosines, "exact_bf16_cosines", lambda *args: pytest.fail("a float32 product was made"))
    rec = identity_test(cosines.LazyCosine(a, b), ok, ok, "fast", seed=1)
    assert rec["solver"] == "greedy" and rec["n_units"] == 150 and rec["log10_pvalue"] > -2


def test_greedy_on_the_bf16_product_is_calibrated_under_ties():
    """Rows of a few integer values: their bf16-result cosines tie everywhere. The random order of both sides keeps
    the matching exchangeable, so p < 0.05 in about 5% of independent pairs (observed: 15 of 300)."""
    g = torch.Generator().manual_seed(11)
    small = []
    for _ in range(300):
        a, b = (torch.randint(-2, 3, (40, 12), generator=g).bfloat16() for _ in range(2))
        ok_a, ok_b = matching.usable(a), matching.usable(b)
        seed = int(torch.randint(1 << 30, (1,), generator=g))
        rec = identity_test(cosines.LazyCosine(a, b), ok_a, ok_b, "fast", seed=seed)
        small.append(rec["log10_pvalue"] < np.log10(0.05))
    assert 4 <= sum(small) <= 30  # binomial(300, 0.05): 15 expected, 99.99% interval 4..30


def test_alignment_permutation_on_lazy_cosines_is_the_float32_one():
    a = _rows(120, 64, 8)
    b = _derived(a, 9)
    ok = torch.ones(120, dtype=torch.bool)
    assert torch.equal(matching.permutation(cosines.LazyCosine(a, b), ok, ok, "fast", seed=2),
                       matching.permutation(matching.cosine_matrix(a, b), ok, ok, "fast", seed=2))


def test_a_given_exact_matrix_stands_for_the_cosines():
    """LazyCosine(..., exact=f): f() is what pairs, values and the fallback use (tracing.grams gives float64
    cosines of activations); a certificate still decides related rows without it."""
    a = _rows(120, 64, 8)
    for b in (_derived(a, 9, noise=0.01), _rows(120, 64, 10)):  # related, unrelated
        given = matching.cosine_matrix(a.double(), b.double())  # (120, 120) float64
        made = []
        lazy = cosines.LazyCosine(a, b, exact=lambda made=made, given=given: made.append(1) or given)
        got, want = (matching.pair_units(s, solver="greedy", seed=3) for s in (lazy, given))
        assert (got.a.tolist(), got.b.tolist(), got.immediate) == (want.a.tolist(), want.b.tolist(), want.immediate)
        assert bool(made) != want.immediate  # the given matrix is made only where no certificate decides
        rows = torch.arange(5)
        assert torch.equal(lazy[rows, rows], given[rows, rows])
        with pytest.raises(ValueError, match="cannot be reordered"):
            lazy.permuted(rows, rows)
