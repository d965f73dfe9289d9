"""Localized testing at the cost of a pairwise test: screen every layer pair cheaply, test only candidates.

    scores = screen_scores(rows_a, rows_b, device)     # (L_A, L_B): how well B's layer j finds itself in A's layer i
    pairs = candidates(scores, per_ft_layer=2)         # {(a, b)}: the pairs the exact test will see

The screen of layer pair (i, j): take the SCREEN_ROWS units of B's layer j with the largest norms, find each one's
best cosine among all units of A's layer i, and take the median. A unit B kept from A (fine-tuned, pruned,
duplicated into a deeper model) finds its copy (cosine near 1); an unrelated one only the largest of many chance
cosines. One product of every A unit with the few screened B units: a fraction of the exact test's cost.

Why the p-values of the tested pairs stay exact. The screen uses every unit of A and a set of B's units chosen by
their norms, so its value does not change when the units of either model are relabelled. Under H0 the units of B
are exchangeable given A and the unordered set of B's units; the screen is a function of exactly those, so
choosing pairs by it says nothing about the order of B's units, which is all that the identity test looks at.
A pair that is not tested enters the Holm family with p = 1, which can only make the family-wise test more
conservative: the layer map keeps its level. That holds whatever decides which pairs are tested, even the tested
p-values themselves (Holm's adjusted p-values only grow when a raw p grows, and each pair's raw p is a fixed
function of the two models): so csu_all tests each ft layer's runner-up only when its best-screening pair is not
decisive (log10 p > DECISIVE_LOG10P).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from tracing import matching

SCREEN_ROWS = 32  # units of each ft matrix the screen compares (the largest by norm: a choice blind to order)
CANDIDATES_PER_FT_LAYER = 2  # base layers tested exactly for each ft layer (the best screens)
DECISIVE_LOG10P = -6.0  # a best-screening pair this significant settles its ft layer: the runner-up is not tested


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm 1, float32 (degenerate rows stay zero)."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def screened_rows(rows: torch.Tensor, k: int = SCREEN_ROWS) -> torch.Tensor:
    """The k usable rows of `rows` (n, d) with the largest norms, scaled to norm 1: (min(k, n), d)."""
    norms = rows.float().norm(dim=1) * matching.usable(rows)  # degenerate rows last
    keep = norms.topk(min(k, len(norms))).indices
    return _unit(rows.index_select(0, keep))


@torch.no_grad()
def screen_scores(rows_a: Iterable[tuple[int, torch.Tensor]], rows_b: dict[int, torch.Tensor],
                  layers_a: list[int], layers_b: list[int], device: torch.device | None = None) -> np.ndarray:
    """(len(layers_a), len(layers_b)) screen values (module docstring). `rows_a` yields (layer, (n_i, d)) one
    layer at a time (A's matrices are streamed); `rows_b` maps each ft layer to its (m_j, d) unit rows."""
    picked = [screened_rows(rows_b[j]) for j in layers_b]  # each (s_j, d)
    sizes = [len(p) for p in picked]
    device = device or picked[0].device
    stacked = torch.cat(picked).to(device)  # (Σ s_j, d)
    out = np.full((len(layers_a), len(layers_b)), np.nan)
    row_of = {i: a for a, i in enumerate(layers_a)}
    for i, rows in rows_a:
        best = (_unit(rows.to(device)) @ stacked.T).amax(dim=0)  # (Σ s_j,): each screened B unit's best cosine
        out[row_of[i]] = [float(part.median()) for part in best.cpu().split(sizes)]
    return out


def candidates(scores: np.ndarray, per_ft_layer: int = CANDIDATES_PER_FT_LAYER) -> set[tuple[int, int]]:
    """(row, column) positions in `scores` to test exactly: for every ft layer (column), its best-screening
    base layers (NaN: not comparable, never a candidate)."""
    out: set[tuple[int, int]] = set()
    for b in range(scores.shape[1]):
        col = scores[:, b]
        ok = np.flatnonzero(~np.isnan(col))
        out |= {(int(a), b) for a in ok[np.argsort(-col[ok], kind="stable")[:per_ft_layer]]}
    return out
