"""Linear assignment: the argmax fast path is optimal, rectangular inputs match the right way round,
and per-layer work in threads comes back in order."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from tracing import matching


def _value(sim: np.ndarray, cols: np.ndarray) -> float:
    return float(sim[np.arange(len(cols)), cols].sum())


@pytest.mark.parametrize("shape", [(30, 30), (20, 35)])
@pytest.mark.parametrize("planted", [False, True])
def test_match_is_an_optimal_assignment(shape, planted):
    rng = np.random.default_rng(0)
    sim = rng.standard_normal(shape)
    if planted:  # distinct best partners: the fast path answers
        sim[np.arange(shape[0]), rng.permutation(shape[1])[:shape[0]]] += 10
    cols = matching.match(sim)
    assert len(set(cols.tolist())) == shape[0]
    assert _value(sim, cols) == pytest.approx(_value(sim, linear_sum_assignment(sim, maximize=True)[1]))


def test_more_rows_than_columns_gives_a_row_per_column():
    rng = np.random.default_rng(1)
    rows = rng.permutation(12)[:5]  # column j belongs to row rows[j]
    sim = rng.standard_normal((12, 5))
    sim[rows, np.arange(5)] += 10
    assert matching.match(sim).tolist() == rows.tolist()


def test_map_in_threads_keeps_the_order():
    assert list(matching.map_in_threads(lambda x: x * x, iter(range(10)), workers=3)) == [x * x for x in range(10)]


def test_match_leaves_the_callers_matrix_alone():
    sim = np.random.default_rng(2).standard_normal((25, 25))  # colliding argmaxes: full assignment
    for given in (sim, torch.from_numpy(sim)):  # float64 ndarray and a tensor sharing its memory
        before = sim.copy()
        matching.match(given)
        assert np.array_equal(sim, before)
