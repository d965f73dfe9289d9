"""The two assignment solvers of tracing.matching, and the shortcut both share.

    rows, cols = greedy(sim)          # sim (n, m): greedy matching in global order of similarity
    rows, cols = lap(sim)             # the optimal assignment (scipy, float64): the paper's matching
    pairs = distinct_best(sim)        # every best partner strict and distinct: both solvers' answer, or None

Both return pairs (rows[t], cols[t]), min(n, m) of them, as CPU LongTensors. tracing.matching decides which
runs where (degenerate units, ties in random order, the fast screen) and proves why the p-values stay valid.
"""

from __future__ import annotations

import heapq
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
    """Greedy matching in global order of similarity of s (n, m): pairs (rows, cols).

    The pair taken next is the best one among free units: the best of the rows' best free columns. Each row
    keeps its k best columns in view (found on s's device), in a heap by the value of its first free one; a row
    whose k are all taken looks at its whole row again. Ties go to the lower row index."""
    n, m = s.shape
    top = s.topk(min(k, m), dim=1)
    vals, cand = top.values.cpu().numpy(), top.indices.cpu().numpy()  # (n, k): each row's best columns, best first
    pos = np.zeros(n, dtype=np.int64)  # each row's first candidate not known to be taken
    free = np.ones(m, dtype=bool)
    heap = [(-float(vals[i, 0]), i) for i in range(n)]
    heapq.heapify(heap)
    rows, cols = [], []
    while len(rows) < min(n, m):
        _, i = heapq.heappop(heap)
        p = pos[i]
        while p < cand.shape[1] and not free[cand[i, p]]:
            p += 1
        if p == pos[i]:  # its best free column: the best free pair
            free[cand[i, p]] = False
            rows.append(i)
            cols.append(int(cand[i, p]))
            continue
        if p == cand.shape[1]:  # every candidate taken: the row's best free columns again
            row = s[i].cpu().masked_fill(torch.from_numpy(~free), -torch.inf)  # (m,)
            top = row.topk(min(k, int(free.sum())))
            cand[i, :len(top.indices)], vals[i, :len(top.values)] = top.indices.numpy(), top.values.numpy()
            p = 0
        pos[i] = p
        heapq.heappush(heap, (-float(vals[i, p]), i))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


SOLVERS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {"lap": lap, "greedy": greedy}
