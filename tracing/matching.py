"""Neuron matching for alignment and every matching statistic: degenerate units, ties, fast and exact solvers.

    ok_a, ok_b = usable(rows_a), usable(rows_b)        # (n,), (m,) bool: no zero, constant or non-finite unit
    pairs = pair_units(sim, ok_a, ok_b, "greedy", seed=(0, layer))   # sim (n, m): unit pairs (pairs.a, pairs.b)
    result, solver = screened("fast", lambda solver: test(pair_units(sim, ok_a, ok_b, solver, seed)))
    perm = permutation(sim, ok_a, ok_b, "fast", seed=0)  # a full permutation (alignment)
    for r in map_in_threads(solve, layers, item_bytes=3 * n * m * 8): ...   # per-layer work on every core

Solvers: "lap", the optimal assignment in float64 (scipy), the paper's matching; "greedy", the greedy matching
in global order of similarity: mutual best pairs are taken, removed, and the step repeated, in vectorised
rounds on the similarity's device. When every unit's best partner is strict and distinct, both return it.
`--matching` (METHODS): "exact" tests the "lap" matching. "fast" (default) tests the greedy one, and only
where its p-value is below 10^SCREEN_LOG10P the exact one instead: unrelated layers, where exact assignment
is slowest (structured cost matrices of trained models: many times a random one), almost never need it.

Why p stays exact. Under H0 the units of B are exchangeable (relabelling them by a fixed π gives a model
with the same distribution). If M(A, πB) = π∘M(A, B) (M is equivariant), B's matched index vector is
uniform over permutations given A, and Spearman's test of it against the identity is exact. Both solvers
are equivariant when no similarities tie (the optimum is unique; the greedy order depends on the values
only). Ties broke it: identical units (zeroed, dead, constant, NaN) were matched in index order, which
Spearman rewards, so a pruned *independent* model looked related (log10 p -17.7). Hence (1) degenerate units,
whose values are not all finite or all equal up to FLAT_TOL of their magnitude (zero included), are left
out on either side, the narrower side matched into the wider and n adjusted, and a layer with fewer than
MIN_UNITS usable units on a side skipped; (2) unless every best partner is strict and distinct, both sides
are put in a seeded random order before solving, so remaining ties never follow index order. The screen
keeps validity: with G, E the greedy and exact p, the reported p is E if G < SCREEN, else G; for a < SCREEN
P(reported <= a) <= P(E <= a) = a, for a >= SCREEN P(reported <= a) <= P(G < SCREEN) + P(SCREEN <= G <= a)
= a. (This covers tests against the identity: csu, csu_all, csh. match compares two matchings of the same
units, which relabelling B leaves unchanged; its null rests on those matchings being unrelated: README.)
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from tracing.choices import DEFAULT_METHOD, METHODS, check_method  # noqa: F401 (re-exported)

T = TypeVar("T")
R = TypeVar("R")

SCREEN_LOG10P = -2.0  # "fast": the exact assignment runs where the greedy matching gives log10 p below this
MIN_UNITS = 10  # a layer with fewer usable units on either side is skipped (counted)
FLAT_TOL = 1e-6  # a unit whose values span at most this fraction of their magnitude is constant
GREEDY_CANDIDATES = 8  # best partners each unit keeps in view during the greedy rounds
Seed = int | tuple[int, ...]


# ----------------------------------------------------------------------------------------- similarities
def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` (n, d) with every row of `b` (m, d): (n, m). Norms in float64, the
    product in float32 (float64 if an input is): ~1e-7 relative error, far below what moves a matching."""
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32

    def unit(x: torch.Tensor) -> torch.Tensor:  # rows scaled to norm 1
        x = x.double()
        return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)).to(dtype)

    return unit(a) @ unit(b).T


def euclid_similarity(gram: torch.Tensor, sq_base: torch.Tensor, sq_ft: torch.Tensor) -> torch.Tensor:
    """-|a_i - b_j|² / 2 = a_i·b_j - |a_i|²/2 - |b_j|²/2 from the Gram matrix (width_A, width_B) and the
    squared norms (width_A,), (width_B,): maximising it minimises the total squared Euclidean distance of
    matched activation vectors (the original's cost). float64."""
    sim = gram.to(torch.float64, copy=True)  # in-place below: no further (width_A, width_B) temporaries
    sim.sub_(sq_base.double()[:, None], alpha=0.5)
    return sim.sub_(sq_ft.double()[None, :], alpha=0.5)


# ------------------------------------------------------------------------------------- degenerate units
def usable_from_range(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Usable units from the smallest and largest value of each unit (n,): finite and not constant."""
    lo, hi = lo.double(), hi.double()
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    scale = torch.maximum(lo.abs(), hi.abs())
    return finite & (hi - lo > FLAT_TOL * scale)


def usable(rows: torch.Tensor) -> torch.Tensor:
    """Usable units of `rows` (n, d), one unit per row (weights: a neuron's row; activations: transpose
    (tokens, width) first): (n,) bool, False for a unit with a non-finite value or constant values (zero too)."""
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    return usable_from_range(rows.amin(dim=1), rows.amax(dim=1))


# ---------------------------------------------------------------------------------------------- solvers
def _distinct_best(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The pairs (rows, cols) that give every unit of the narrower side its best partner, when each best is
    strictly better than the unit's other partners and all of them are distinct; else None. Such a matching
    is the optimal assignment and the greedy one, and no tie decides it (the usual case for related layers)."""
    dim = 1 if s.shape[0] <= s.shape[1] else 0
    top, best = s.max(dim=dim)  # (k,), (k,)
    if torch.unique(best).numel() != best.numel() or bool(((s == top.unsqueeze(dim)).sum(dim) > 1).any()):
        return None
    own = torch.arange(best.numel(), device=s.device)
    return (own.cpu(), best.cpu()) if dim == 1 else (best.cpu(), own.cpu())


def _lap(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact maximum-similarity assignment of s (n, m): pairs (rows, cols), min(n, m) of them. float64 (scipy)."""
    cost = s.detach().to("cpu", torch.float64).numpy()  # pair_units' own copy: negated in place
    np.negative(cost, out=cost)  # maximise similarity = minimise -similarity, without a second copy
    rows, cols = linear_sum_assignment(cost)
    return torch.from_numpy(rows), torch.from_numpy(cols)


def _first_free(cand: torch.Tensor, free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For candidate lists cand (r, k), best first: the first candidate still free (r,) and whether any is."""
    avail = free[cand]  # (r, k)
    return cand.gather(1, avail.to(torch.uint8).argmax(dim=1, keepdim=True))[:, 0], avail.any(dim=1)


def _refill(s: torch.Tensor, cand: torch.Tensor, units: torch.Tensor, free_other: torch.Tensor) -> None:
    """cand[units] = the top candidates of those units (rows of s) among the free units of the other side."""
    rows = s.index_select(0, units)  # (e, other)
    masked = torch.where(free_other[None, :], rows, torch.full_like(rows, -torch.inf))
    cand[units] = masked.topk(cand.shape[1], dim=1).indices


def _greedy(s: torch.Tensor, k: int = GREEDY_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy matching in global order of similarity of s (n, m), on s's device: pairs (rows, cols).

    Each round takes every mutual best pair among the free units (exactly the pairs the greedy order takes
    next). Each unit keeps its k best partners in view and looks further only when all are taken."""
    n, m = s.shape
    dev = s.device
    row_cand = s.topk(min(k, m), dim=1).indices  # (n, k) columns, best first
    col_cand = s.topk(min(k, n), dim=0).indices.T.contiguous()  # (m, k) rows
    st = s.T  # (m, n) view: a column's similarities as a row
    free_r, free_c = torch.ones(n, dtype=torch.bool, device=dev), torch.ones(m, dtype=torch.bool, device=dev)
    out_r, out_c = [], []
    rows, cols = torch.arange(n, device=dev), torch.arange(m, device=dev)
    while rows.numel() and cols.numel():
        rb, ok = _first_free(row_cand[rows], free_c)
        if not ok.all():
            _refill(s, row_cand, rows[~ok], free_c)
            rb, _ = _first_free(row_cand[rows], free_c)
        cb, ok = _first_free(col_cand[cols], free_r)
        if not ok.all():
            _refill(st, col_cand, cols[~ok], free_r)
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


SOLVERS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {"lap": _lap, "greedy": _greedy}


# ---------------------------------------------------------------------------------------------- pairing
@dataclass
class Pairs:
    """Matched units: unit a[t] of A <-> unit b[t] of B (original indices); the narrower side is complete."""

    a: np.ndarray  # (k,) int
    b: np.ndarray  # (k,) int
    excluded_a: int  # degenerate units of A left out
    excluded_b: int
    b_complete: bool  # every usable unit of B is matched (else every usable unit of A)
    immediate: bool = False  # every best partner was strict and distinct: both solvers give these pairs

    @property
    def skipped(self) -> bool:
        return len(self.a) == 0

    def partner(self) -> dict[int, int]:
        """Unit of the complete side -> its partner on the other side."""
        keys, vals = (self.b, self.a) if self.b_complete else (self.a, self.b)
        return dict(zip(keys.tolist(), vals.tolist()))


def _indices(ok: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device) if ok is None else ok.to(device).nonzero()[:, 0]


def pair_units(sim: torch.Tensor, ok_a: torch.Tensor | None = None, ok_b: torch.Tensor | None = None,
               solver: str = "lap", seed: Seed = 0, min_units: int = MIN_UNITS) -> Pairs:
    """Match the usable units of A (rows of sim (n, m)) and B (columns): the narrower side into the wider.

    Units whose similarities are not all finite are left out too (those with no finite value first). Unless
    every unit of the narrower side has a strict, distinct best partner (then that is the answer, no tie
    involved), both sides are put in a seeded random order before solving, so ties never follow index order.
    A side with fewer than `min_units` usable units gives an empty (skipped) result."""
    n, m = sim.shape
    ia, ib = _indices(ok_a, n, sim.device), _indices(ok_b, m, sim.device)
    s = sim if len(ia) == n and len(ib) == m else sim.index_select(0, ia).index_select(1, ib)  # (n', m')
    for rule in () if torch.isfinite(s.sum()) else (torch.Tensor.any, torch.Tensor.all):  # rows, columns
        if not torch.isfinite(s).all():  # units with no finite value first, then those with any other
            keep = rule(torch.isfinite(s), dim=1)
            ia, s = ia[keep], s[keep]
            keep = rule(torch.isfinite(s), dim=0)
            ib, s = ib[keep], s[:, keep]
    b_complete = len(ib) <= len(ia)
    if min(len(ia), len(ib)) < min_units:
        empty = np.zeros(0, dtype=np.int64)
        return Pairs(empty, empty, n - len(ia), m - len(ib), b_complete)
    pairs = _distinct_best(s)
    immediate = pairs is not None
    if not immediate:  # ties could decide: solve in a seeded random order of both sides
        g = np.random.default_rng(seed)
        pa, pb = (torch.from_numpy(g.permutation(k)).to(s.device) for k in s.shape)
        rows, cols = SOLVERS[solver](s.index_select(0, pa).index_select(1, pb))
        pairs = pa.cpu()[rows], pb.cpu()[cols]
    rows, cols = pairs  # (k,), (k,): unit rows[t] of s <-> unit cols[t]
    return Pairs(ia.cpu()[rows].numpy(), ib.cpu()[cols].numpy(), n - len(ia), m - len(ib), b_complete, immediate)


def screened(method: str, test: Callable[[str], tuple]) -> tuple[tuple, str]:
    """Run `test(solver)` (returning (rho, log10 p, ...)) as `method` prescribes: (its result, solvers used).

    "exact": test("lap"). "fast": test("greedy"), and test("lap") instead where that gave log10 p < SCREEN
    (the module docstring shows that the reported p-value stays valid)."""
    if check_method(method) == "exact":
        return test("lap"), "lap"
    first = test("greedy")
    if not first[1] < SCREEN_LOG10P:  # NaN (skipped) included
        return first, "greedy"
    return test("lap"), "greedy+lap"


def permutation(sim: torch.Tensor, ok_a: torch.Tensor | None = None, ok_b: torch.Tensor | None = None,
                method: str = DEFAULT_METHOD, seed: Seed = 0, min_units: int = MIN_UNITS) -> torch.Tensor:
    """A full permutation p (n,) for a square sim (n, n), B's unit p[i] matched to A's unit i (alignment).

    Usable units are matched ("fast": greedy; "exact": optimal assignment); units left out (degenerate or
    too few) are paired with the remaining ones in a seeded random order."""
    n = sim.shape[0]
    pairs = pair_units(sim, ok_a, ok_b, "lap" if check_method(method) == "exact" else "greedy", seed, min_units)
    perm = np.full(n, -1, dtype=np.int64)
    perm[pairs.a] = pairs.b
    perm[perm < 0] = np.random.default_rng(seed).permutation(np.setdiff1d(np.arange(n), pairs.b))
    return torch.from_numpy(perm)


# ---------------------------------------------------------------------------------------------- threads
_WORKERS: int | None = None  # set_workers(n): the run's --threads; None: default_workers()


def set_workers(n: int | None) -> None:
    """Threads for per-layer assignments from now on (None: back to default_workers())."""
    global _WORKERS
    _WORKERS = n


def default_workers() -> int:
    """Threads for per-layer work: set_workers' value, else the cores this process may use. map_in_threads
    also bounds it by memory (item_bytes)."""
    if _WORKERS is not None:
        return _WORKERS
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def available_ram() -> int:
    """Bytes of RAM this process may still use: MemAvailable, lowered to a cgroup (container, Slurm) limit."""
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), g.read().strip()
        avail = min(avail, int(limit) - int(used)) if limit.isdigit() else avail
    except (OSError, StopIteration, ValueError):
        pass
    return max(avail, 0)


def free_memory(device: torch.device | str | None = None) -> int:
    """Bytes still free on `device`: a GPU's free memory, else available_ram()."""
    device = torch.device(device or "cpu")
    return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else available_ram()


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                   item_bytes: int | None = None, device: torch.device | None = None) -> Iterator[R]:
    """fn(item) for each item, in order, with up to `workers` calls running at once (default_workers()),
    and no more than half the free memory holds (`item_bytes`: what one call needs, in RAM and, when it
    works on a GPU `device`, there too).

    For per-layer linear assignments: scipy's solver and torch release the GIL, so threads use every core
    without copying the matrices. Items are pulled in the caller's thread, at most `workers` ahead of the
    results, which bounds the memory held by pending matrices."""
    workers = workers or default_workers()
    if item_bytes:
        free = min(available_ram(), free_memory(device))
        workers = max(1, min(workers, free // 2 // item_bytes))
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
