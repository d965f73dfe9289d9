"""Neuron matching: both solvers are what they claim (optimal assignment; greedy in global order), both are
permutation-equivariant, degenerate units are left out, ties never follow index order, the fast screen runs
the exact matching only where it must, and per-layer work in threads comes back in order."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from tracing import matching
from tracing.errors import TracingError
from tracing.statistics.common import agreement_test, identity_test
from tracing.statistics.pvalues import identity_spearman, perm_pair_spearman


def _value(sim: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float(sim[a, b].sum())


def _greedy_reference(sim: np.ndarray) -> set[tuple[int, int]]:
    """Greedy matching the slow, obvious way: all entries in descending order, take a pair if both are free."""
    used_a, used_b, out = set(), set(), set()
    for flat in np.argsort(-sim, axis=None, kind="stable"):
        i, j = divmod(int(flat), sim.shape[1])
        if i not in used_a and j not in used_b:
            used_a.add(i), used_b.add(j), out.add((i, j))
    return out


@pytest.mark.parametrize("shape", [(30, 30), (20, 35), (35, 20)])
def test_lap_is_an_optimal_assignment_and_greedy_is_the_greedy_order(shape):
    rng = np.random.default_rng(0)
    sim = rng.standard_normal(shape)
    lap = matching.pair_units(torch.from_numpy(sim), solver="lap", seed=3)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    assert len(lap.a) == min(shape) and _value(sim, lap.a, lap.b) == pytest.approx(_value(sim, rows, cols))
    greedy = matching.pair_units(torch.from_numpy(sim), solver="greedy", seed=3)
    assert set(zip(greedy.a.tolist(), greedy.b.tolist())) == _greedy_reference(sim)
    assert lap.b_complete == (shape[1] <= shape[0])  # the narrower side is matched into the wider


@pytest.mark.parametrize("solver", ["lap", "greedy"])
def test_both_solvers_are_permutation_equivariant(solver):
    """Relabelling B's units relabels the matching: the matched pairs are the same units."""
    rng = np.random.default_rng(1)
    sim = torch.from_numpy(rng.standard_normal((40, 40)))
    pi = torch.from_numpy(rng.permutation(40))  # B's unit pi[k] becomes unit k
    base = matching.pair_units(sim, solver=solver, seed=0)
    relabelled = matching.pair_units(sim[:, pi], solver=solver, seed=7)
    assert set(zip(base.a.tolist(), base.b.tolist())) == {(a, int(pi[b])) for a, b in zip(relabelled.a, relabelled.b)}


def test_distinct_best_partners_are_the_answer_of_both_solvers():
    rng = np.random.default_rng(2)
    sim = rng.standard_normal((25, 25))
    planted = rng.permutation(25)
    sim[np.arange(25), planted] += 10
    for solver in ("lap", "greedy"):
        p = matching.pair_units(torch.from_numpy(sim), solver=solver)
        assert dict(zip(p.a.tolist(), p.b.tolist())) == dict(enumerate(planted.tolist()))


@pytest.mark.parametrize("shape", [(25, 40), (40, 25)])
def test_distinct_best_and_column_topk_on_either_narrower_side(shape):
    from tracing import solvers

    rng = np.random.default_rng(9)
    sim = torch.from_numpy(rng.standard_normal(shape))
    values, rows = solvers.column_topk(sim, 3)  # (m, 3)
    ref = sim.topk(3, dim=0)
    assert torch.equal(values, ref.values.T) and torch.equal(rows, ref.indices.T)
    k = min(shape)
    planted = rng.permutation(max(shape))[:k]  # each unit of the narrower side has a clear, distinct best
    if shape[0] <= shape[1]:
        sim[np.arange(k), planted] += 10
    else:
        sim[planted, np.arange(k)] += 10
    a, b = solvers.distinct_best(sim)
    expected = dict(zip(range(k), planted.tolist()))
    assert (dict(zip(a.tolist(), b.tolist())) if shape[0] <= shape[1] else dict(zip(b.tolist(), a.tolist()))) == \
        expected


def test_degenerate_units_are_left_out_and_counted():
    rng = np.random.default_rng(3)
    rows_a, rows_b = torch.randn(30, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    rows_b[[1, 5]] = 0.0  # pruned
    rows_b[7] = 0.25  # constant
    rows_b[9, 3] = float("nan")
    rows_a[2, 0] = float("inf")
    ok_a, ok_b = matching.usable(rows_a), matching.usable(rows_b)
    assert (~ok_a).nonzero().flatten().tolist() == [2] and (~ok_b).nonzero().flatten().tolist() == [1, 5, 7, 9]
    sim = matching.cosine_matrix(torch.nan_to_num(rows_a), torch.nan_to_num(rows_b))
    p = matching.pair_units(sim, ok_a, ok_b, "lap", seed=int(rng.integers(100)))
    assert (p.excluded_a, p.excluded_b, len(p.a)) == (1, 4, 26)
    assert not {1, 5, 7, 9} & set(p.b.tolist()) and 2 not in p.a
    few = torch.zeros(30, dtype=torch.bool)
    few[:matching.MIN_UNITS - 1] = True
    assert matching.pair_units(sim, ok_a, few).skipped  # too few usable units: the layer is skipped


def test_non_finite_similarities_drop_their_unit_instead_of_crashing():
    sim = torch.randn(20, 20, dtype=torch.float64)
    sim[4] = float("nan")  # a unit whose similarities overflowed
    sim[:, 6] = float("inf")
    p = matching.pair_units(sim, solver="greedy")
    assert (p.excluded_a, p.excluded_b) == (1, 1) and 4 not in p.a and 6 not in p.b


def test_greedy_takes_exact_ties_and_exhausted_candidates_in_its_stride():
    """Every value equal, or few distinct values (bf16-rounded cosines): greedy still matches every unit of the
    narrower side in the greedy order (ties to the lower row), also where a row's 8 candidates are all taken."""
    from tracing.solvers import greedy

    rows, cols = greedy(torch.zeros(40, 25))
    assert sorted(cols.tolist()) == list(range(25)) and len(set(rows.tolist())) == 25
    sim = torch.randint(0, 3, (50, 60), generator=torch.Generator().manual_seed(0)).double()
    rows, cols = greedy(sim, k=2)
    assert len(rows) == 50 and len(set(cols.tolist())) == 50
    assert _value(sim.numpy(), rows.numpy(), cols.numpy()) == _value(sim.numpy(), *zip(*_greedy_reference(sim.numpy())))


def test_ties_fall_in_random_order_not_index_order():
    """Half of B's units, spread over the layer, tie with every unit of A (what zeroed rows look like after
    cosine similarity). scipy alone breaks the ties in index order and pairs them monotonically with A's
    leftover units: a positive rho under independence, the false "related" of pruned models. The random
    order does not."""
    old, new = [], []
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        sim = torch.randn(60, 60, generator=g, dtype=torch.float64)
        sim[:, torch.randperm(60, generator=g)[:30]] = 0.0
        old.append(identity_spearman(linear_sum_assignment(-sim.numpy())[1])[0])
        new.append(identity_test(sim, None, None, "exact", seed=seed)["rho"])
    assert np.mean(old) > 0.12 and abs(np.mean(new)) < 0.08  # observed: 0.19 and -0.002 (sd of a mean: 0.024)


def test_fast_runs_the_exact_matching_only_between_the_screen_and_decisive():
    calls = []

    def test(result):
        def run(solver):
            calls.append(solver)
            return result[solver]
        return run

    assert matching.screened("fast", test({"greedy": (0.1, -0.5)})) == ((0.1, -0.5), "greedy")
    (rho, logp), solver = matching.screened("fast", test({"greedy": (0.9, -5.0), "lap": (0.95, -7.0)}))
    assert (rho, solver) == (0.95, "greedy+lap") and logp == pytest.approx(np.log10(1e-7 + 1e-10), abs=1e-12)
    (rho, logp), solver = matching.screened("fast", test({"greedy": (0.99, -4000.0)}))  # decided: no exact run
    assert (rho, solver) == (0.99, "greedy, decisive") and logp == pytest.approx(-4000 + np.log10(2))
    assert matching.screened("exact", test({"lap": (0.2, -1.0)})) == ((0.2, -1.0), "lap")
    assert calls == ["greedy", "greedy", "lap", "greedy", "lap"]
    with pytest.raises(TracingError, match="unknown --matching 'hungarian'; valid: fast .*exact"):
        matching.screened("hungarian", test({}))


def test_fast_is_valid_against_the_worst_joint_law_of_greedy_and_exact(monkeypatch):
    """G and E each uniform, coupled as badly as they can be: E = G - t (mod 1), so that below the screen the
    exact p is smallest exactly where the greedy one was not decisive. Reporting G where decisive and E elsewhere
    would give P(p <= a) = a + t; "fast"'s bound (module docstring) keeps it at a."""
    monkeypatch.setattr(matching, "SCREEN_LOG10P", np.log10(0.3))
    monkeypatch.setattr(matching, "DECISIVE_LOG10P", np.log10(0.05))
    t, n = 0.05, 40000
    g = (np.arange(n) + 0.5) / n  # G uniform on (0, 1), evenly spread
    e = (g - t) % 1.0  # E uniform too
    reported = np.array([10 ** matching.screened("fast", lambda solver, k=k: (0.0, np.log10(
        g[k] if solver == "greedy" else e[k])))[0][1] for k in range(n)])
    naive = np.where(g >= 0.3, g, np.where(g <= t, g, e))
    for a in (0.01, 0.04, 0.08, 0.1, 0.2, 0.29, 0.5):
        assert (reported <= a).mean() <= a + 1e-9, a
        if a + min(a, t) < 0.3:  # below the screen the naive skip is not valid: P = a + min(a, t)
            assert (naive <= a).mean() == pytest.approx(a + min(a, t), abs=1e-4)


def test_agreement_of_two_matchings_sees_a_shared_permutation():
    g = torch.Generator().manual_seed(4)
    gate, up = torch.randn(50, 50, generator=g, dtype=torch.float64), torch.randn(50, 50, generator=g,
                                                                                dtype=torch.float64)
    planted = torch.randperm(50, generator=g)
    for s in (gate, up):
        s[torch.arange(50), planted] += 10.0  # both projections point to the same partners
    rec = agreement_test(lambda solver: (gate, up), None, None, "fast", seed=0)
    assert rec["rho"] == 1.0 and rec["log10_pvalue"] < -60 and rec["solver"] == "greedy, decisive"
    unrelated = agreement_test(lambda solver: (gate, torch.randn(50, 50, generator=g, dtype=torch.float64)),
                               None, None, "fast", seed=0)
    assert unrelated["log10_pvalue"] > -3


def test_permutation_places_degenerate_units_at_random():
    sim = torch.randn(30, 30, dtype=torch.float64)
    ok = torch.ones(30, dtype=torch.bool)
    ok[:5] = False
    p = matching.permutation(sim, ok, ok, "exact", seed=1)
    assert sorted(p.tolist()) == list(range(30))
    expected = matching.pair_units(sim, ok, ok, "lap", seed=1)
    assert all(int(p[a]) == b for a, b in zip(expected.a, expected.b))


def test_pair_units_leaves_the_callers_matrix_alone():
    sim = torch.randn(25, 25, dtype=torch.float64)  # colliding argmaxes: the full assignment runs
    before = sim.clone()
    for solver in ("lap", "greedy"):
        matching.pair_units(sim, solver=solver)
    assert torch.equal(sim, before)


def test_bf16_rows_give_float32_cosines_from_their_exact_values():
    """bf16 weights: the product runs on the bf16 units, yet every input is exact, so the cosines are those of
    float64 up to float32 summation (no bf16 rounding of the result), and equal the float32 path's."""
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(300, 256, generator=g).bfloat16(), torch.randn(200, 256, generator=g).bfloat16()
    fast = matching.cosine_matrix(a, b)  # (300, 200)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast.double(), matching.cosine_matrix(a.double(), b.double()), atol=1e-6, rtol=0)
    assert torch.allclose(fast, matching.cosine_matrix(a.float(), b.float()), atol=1e-6, rtol=0)
    assert len(torch.unique(fast)) > 0.99 * fast.numel()  # float32 resolution: no bf16 ties


def test_map_in_threads_keeps_the_order_and_bounds_workers_by_memory():
    assert list(matching.map_in_threads(lambda x: x * x, iter(range(10)), workers=3)) == [x * x for x in range(10)]
    huge = 10 * matching.available_ram()  # one item needs more than the machine: still runs, one at a time
    assert list(matching.map_in_threads(lambda x: x + 1, range(4), workers=8, item_bytes=huge)) == [1, 2, 3, 4]


def test_exact_is_the_papers_statistic_bit_for_bit():
    """Without ties or degenerate units, --matching exact is the original computation: scipy's assignment, then
    Spearman against the identity (csu, csh) or between the gate and the up matching of B's units (match)."""
    rng = np.random.default_rng(6)
    sim, gate, up = (rng.standard_normal((64, 64)) for _ in range(3))
    rec = identity_test(torch.from_numpy(sim), None, None, "exact", seed=5)
    assert (rec["rho"], rec["log10_pvalue"]) == identity_spearman(linear_sum_assignment(-sim)[1])
    b_into_a = lambda s: np.argsort(linear_sum_assignment(-s)[1])  # B unit j <-> A unit b_into_a[j]
    rec = agreement_test(lambda solver: (torch.from_numpy(gate), torch.from_numpy(up)), None, None, "exact", 5)
    assert (rec["rho"], rec["log10_pvalue"]) == perm_pair_spearman(b_into_a(gate), b_into_a(up))
