"""The two assignment solvers of tracing.matching, and the shortcut both share.

    rows, cols = greedy(sim)          # sim (n, m): greedy matching in global order of similarity, on sim's device
    rows, cols = lap(sim)             # the optimal assignment (scipy, float64): the paper's matching
    pairs = distinct_best(sim)        # every best partner strict and distinct: both solvers' answer, or None

Both return pairs (rows[t], cols[t]), min(n, m) of them, as CPU LongTensors. tracing.matching decides which
runs where (degenerate units, ties in random order, the fast screen) and proves why the p-values stay valid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

GREEDY_CANDIDATES = 8  # best partners each unit keeps in view during the greedy rounds


def distinct_best(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The pairs (rows, cols) that give every unit of the narrower side its best partner, when each best is
    strictly better than the unit's other partners and all of them are distinct; else None. Such a matching
    is the optimal assignment and the greedy one, and no tie decides it (the usual case for related layers)."""
    rows_narrower = s.shape[0] <= s.shape[1]
    k = min(2, max(s.shape))
    top, idx = s.topk(k, dim=1) if rows_narrower else column_topk(s, k)  # (units, k): best and second best
    best = idx[:, 0]  # (units,)
    if torch.unique(best).numel() != best.numel():
        return None
    if k == 2 and not bool((top[:, 0] > top[:, 1]).all()):
        return None  # a tie for some unit's best partner
    own = torch.arange(best.numel(), device=s.device)
    return (own.cpu(), best.cpu()) if rows_narrower else (best.cpu(), own.cpu())


def lap(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact maximum-similarity assignment of s (n, m): pairs (rows, cols), min(n, m) of them. float64 (scipy)."""
    cost = s.detach().to("cpu", torch.float64).numpy()  # pair_units' own copy: negated in place
    np.negative(cost, out=cost)  # maximise similarity = minimise -similarity, without a second copy
    rows, cols = linear_sum_assignment(cost)
    return torch.from_numpy(rows), torch.from_numpy(cols)


def _first_free(cand: torch.Tensor, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For candidate lists cand (r, k), best first: the first candidate still free (r,) and whether any is."""
    avail = free[cand]  # (r, k)
    return cand.gather(1, avail.to(torch.uint8).argmax(dim=1, keepdim=True))[:, 0], avail.any(dim=1)


def _refill(s: torch.Tensor, cand: torch.Tensor, units: torch.Tensor, free_other: torch.Tensor, dim: int) -> None:
    """cand[units] = the top candidates of those units (rows of s for dim 0, columns for dim 1) among the free
    units of the other side."""
    rows = s.index_select(dim, units)  # (e, other), or (other, e) for columns
    rows = rows if dim == 0 else rows.T.contiguous()  # gathering columns first: a gather of rows of s.T is slow
    masked = torch.where(free_other[None, :], rows, torch.full_like(rows, -torch.inf))
    cand[units] = masked.topk(cand.shape[1], dim=1).indices


ROW_BLOCK = 1024  # rows per step of column_topk


def column_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best rows of every column of s (n, m): values and row indices, (m, k) each, best first. Each block of
    rows is transposed whole (a contiguous block transposes ~5x faster than a strided block of columns, and topk
    along the first axis is slower still), its columns' best k kept, and the blocks' candidates merged."""
    vals, idx = [], []
    for r in range(0, s.shape[0], ROW_BLOCK):
        block = s[r:r + ROW_BLOCK].T.contiguous()  # (m, rows in the block)
        top = block.topk(min(k, block.shape[1]), dim=1)
        vals.append(top.values)
        idx.append(top.indices + r)
    v, i = torch.cat(vals, dim=1), torch.cat(idx, dim=1)  # (m, k per block)
    top = v.topk(k, dim=1)
    return top.values, i.gather(1, top.indices)


def greedy(s: torch.Tensor, k: int = GREEDY_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy matching in global order of similarity of s (n, m), on s's device: pairs (rows, cols).

    Each round takes every mutual best pair among the free units (exactly the pairs the greedy order takes
    next). Each unit keeps its k best partners in view and looks further only when all are taken."""
    n, m = s.shape
    dev = s.device
    row_cand = s.topk(min(k, m), dim=1).indices  # (n, k) columns, best first
    col_cand = column_topk(s, min(k, n))[1]  # (m, k) rows, best first
    free_r, free_c = torch.ones(n, dtype=torch.bool, device=dev), torch.ones(m, dtype=torch.bool, device=dev)
    out_r, out_c = [], []
    rows, cols = torch.arange(n, device=dev), torch.arange(m, device=dev)
    while rows.numel() and cols.numel():
        rb, ok = _first_free(row_cand[rows], free_c)
        if not ok.all():
            _refill(s, row_cand, rows[~ok], free_c, dim=0)
            rb, _ = _first_free(row_cand[rows], free_c)
        cb, ok = _first_free(col_cand[cols], free_r)
        if not ok.all():
            _refill(s, col_cand, cols[~ok], free_r, dim=1)
            cb, _ = _first_free(col_cand[cols], free_r)
        best_row = torch.full((m,), -1, dtype=torch.long, device=dev)
        best_row[cols] = cb
        mutual = best_row[rb] == rows  # (r,)
        i, j = rows[mutual], rb[mutual]
        out_r.append(i)
        out_c.append(j)
        free_r[i], free_c[j] = False, False
        rows, cols = rows[free_r[rows]], cols[free_c[cols]]
    return torch.cat(out_r).cpu(), torch.cat(out_c).cpu()


SOLVERS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {"lap": lap, "greedy": greedy}
