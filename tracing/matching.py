"""Neuron matching for alignment and every matching statistic: degenerate units, ties, fast and exact solvers.

    ok_a, ok_b = usable(rows_a), usable(rows_b)        # (n,), (m,) bool: no zero, constant or non-finite unit
    pairs = pair_units(sim, ok_a, ok_b, "greedy", seed=(0, layer))   # sim (n, m): unit pairs (pairs.a, pairs.b)
    result, solver = screened("fast", lambda solver: test(pair_units(sim, ok_a, ok_b, solver, seed)))
    perm = permutation(sim, ok_a, ok_b, "fast", seed=0)  # a full permutation (alignment)
    for r in map_in_threads(solve, layers, item_bytes=3 * n * m * 8): ...   # per-layer work on every core

Solvers (tracing/solvers.py): "lap", the optimal assignment in float64 (scipy), the paper's matching; "greedy",
the greedy matching in global order of similarity (each unit's best candidates found on the similarity's device,
the pairs taken in order from a heap). When every unit's best partner is strict and distinct, both return it.
`--matching` (METHODS): "exact" tests the "lap" matching everywhere. "fast" (default) tests the greedy one, runs
the exact one only where the greedy p is small but not yet decisive, and reports a p-value that stays valid
(below). Cosine products of bf16 weights run on the CPU's bf16 units with float32 accumulation; where a bf16
product certifies every unit's best partner, without the float32 product, and the greedy matching runs on the
bf16-result product itself (tracing/cosines.py: an elementwise rounding, so still exact under H0).

Why each matching's p is exact. Under H0 the units of B are exchangeable (relabelling them by a fixed π gives
a model with the same distribution). If M(A, πB) = π∘M(A, B) (M is equivariant), B's matched index vector is
uniform over permutations given A, and Spearman's test of it against the identity is exact. Both solvers
are equivariant when no similarities tie (the optimum is unique; the greedy order depends on the values
only); so is any elementwise rounding of the inputs (bf16 products). Ties broke it: identical units (zeroed,
dead, constant, NaN) were matched in index order, which Spearman rewards, so a pruned *independent* model
looked related (log10 p -17.7). Hence (1) degenerate units, whose values are not all finite or all equal up
to FLAT_TOL of their magnitude (zero included), are left out on either side, the narrower side matched into
the wider and n adjusted, and a layer with fewer than MIN_UNITS usable units on a side skipped; (2) unless
every best partner is strict and distinct, both sides are put in a seeded random order before solving, so
remaining ties never follow index order. (This covers tests against the identity: csu, csu_all, csh. match
compares two matchings of the same units, which relabelling B leaves unchanged; its null rests on those
matchings being unrelated: README.)

Why "fast" stays valid. G (greedy) and E (exact) are each valid, P(G <= x) <= x and P(E <= x) <= x for
every x under H0; nothing is assumed about how they depend on each other. With s = 10^SCREEN_LOG10P,
t = 10^DECISIVE_LOG10P (t < s) and f(x) = x + min(x, t) (2x up to t, x + t above), "fast" reports
    R = G      where G >= s (or the layer was skipped): the exact assignment does not run;
    R = f(E)   where t < G < s: the exact assignment runs;
    R = f(G)   where G <= t: the layer is decided, the exact assignment (15 s for an 11008² layer) does not run.
Take a < s; then G >= s cannot give R <= a. If a <= 2t, f(x) <= a means x <= a/2, and P(R <= a) <=
P(G <= a/2) + P(E <= a/2) <= a. If a > 2t, f(x) <= a means x <= a - t, and P(R <= a) <= P(G <= t) +
P(E <= a - t) <= t + (a - t) = a. For a >= s, P(R <= a) <= P(G < s) + P(s <= G <= a) = P(G <= a) <= a.
So P(R <= a) <= a for every a. The price: p doubled (log10 p + 0.30) on layers already at p <= 1e-10, and
t added to the exact p elsewhere below s (invisible unless E < 1000 t). A layer at p <= 2e-10 stays below
0.01 after a Bonferroni correction over 10^7 tests (match_all and csu_all test every layer pair).
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from tracing.choices import DEFAULT_METHOD, METHODS, check_method  # noqa: F401 (re-exported)
from tracing.cosines import LazyCosine, cpu_has_bf16, exact_bf16_cosines
from tracing.solvers import SOLVERS, distinct_best

T = TypeVar("T")
R = TypeVar("R")

SCREEN_LOG10P = -2.0  # "fast": the exact assignment runs where the greedy matching gives log10 p below this
DECISIVE_LOG10P = -10.0  # "fast": ... and above this; at or below, the greedy p (doubled) is reported
MIN_UNITS = 10  # a layer with fewer usable units on either side is skipped (counted)
FLAT_TOL = 1e-6  # a unit whose values span at most this fraction of their magnitude is constant
Seed = int | tuple[int, ...]


# ----------------------------------------------------------------------------------------- similarities
def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` (n, d) with every row of `b` (m, d): (n, m). Norms in float64, the
    product in float32 (float64 if an input is): ~1e-7 relative error, far below what moves a matching. bf16
    rows on a CPU (a bf16 checkpoint's weights): the product of the stored values on the bf16 units with float32
    accumulation (tracing.cosines), then scaled by the inverse norms: the same numbers, 2.5-3x faster."""
    if a.dtype == b.dtype == torch.bfloat16 and a.device.type == b.device.type == "cpu":
        return exact_bf16_cosines(a, b)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32

    def unit(x: torch.Tensor) -> torch.Tensor:  # rows scaled to norm 1
        x = x.double()
        return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)).to(dtype)

    return unit(a) @ unit(b).T


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | LazyCosine:
    """What pair_units takes for rows a (n, d), b (m, d): cosine_matrix(a, b), or for bf16 rows on a CPU with
    bf16 units a LazyCosine (its matching is cosine_matrix's, often found at half the cost: tracing.cosines)."""
    if a.dtype == b.dtype == torch.bfloat16 and a.device.type == b.device.type == "cpu" and cpu_has_bf16():
        return LazyCosine(a, b)
    return cosine_matrix(a, b)


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


def _lazy_pairs(sim: LazyCosine, solver: str, seed: Seed) -> Pairs:
    """pair_units for a LazyCosine whose units are all usable and whose cosines are all finite: the pairs its
    certificate finds (what every solver finds in exact()), else the greedy matching of its coarse() matrix, or
    the solver's on exact(), both in the seeded random order of both sides that pair_units uses."""
    n, m = sim.shape
    g = np.random.default_rng(seed)
    pa, pb = (torch.from_numpy(g.permutation(k)) for k in (n, m))
    shuffled = sim.permuted(pa, pb)  # the product made in the random order: no copy of the (n, m) matrix
    certified = shuffled.certified_best()
    if certified is not None:
        rows, cols = certified
        return Pairs(pa[rows].numpy(), pb[cols].numpy(), 0, 0, m <= n, immediate=True)
    rows, cols = SOLVERS[solver](shuffled.coarse() if solver == "greedy" else shuffled.exact())
    return Pairs(pa[rows].numpy(), pb[cols].numpy(), 0, 0, m <= n)


def pair_units(sim: torch.Tensor | LazyCosine, ok_a: torch.Tensor | None = None, ok_b: torch.Tensor | None = None,
               solver: str = "lap", seed: Seed = 0, min_units: int = MIN_UNITS) -> Pairs:
    """Match the usable units of A (rows of sim (n, m)) and B (columns): the narrower side into the wider.

    Units whose similarities are not all finite are left out too (those with no finite value first). Unless
    every unit of the narrower side has a strict, distinct best partner (then that is the answer, no tie
    involved), both sides are put in a seeded random order before solving, so ties never follow index order.
    A side with fewer than `min_units` usable units gives an empty (skipped) result. A LazyCosine (`similarity`)
    gives the same pairs as its exact() matrix; its float32 product is only made when needed."""
    n, m = sim.shape
    if isinstance(sim, LazyCosine):
        every = all(ok is None or bool(ok.all()) for ok in (ok_a, ok_b))
        if every and min(n, m) >= min_units and sim.bounded():
            if sim.given_exact is None:
                return _lazy_pairs(sim, solver, seed)
            certified = sim.certified_best()  # distinct_best's pairs in exact(), or None: then as exact() would
            if certified is not None:
                return Pairs(certified[0].numpy(), certified[1].numpy(), 0, 0, m <= n, immediate=True)
        sim = sim.exact()
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
    pairs = distinct_best(s)
    immediate = pairs is not None
    if not immediate:  # ties could decide: solve in a seeded random order of both sides
        g = np.random.default_rng(seed)
        pa, pb = (torch.from_numpy(g.permutation(k)).to(s.device) for k in s.shape)
        rows, cols = SOLVERS[solver](s.index_select(0, pa).index_select(1, pb))
        pairs = pa.cpu()[rows], pb.cpu()[cols]
    rows, cols = pairs  # (k,), (k,): unit rows[t] of s <-> unit cols[t]
    return Pairs(ia.cpu()[rows].numpy(), ib.cpu()[cols].numpy(), n - len(ia), m - len(ib), b_complete, immediate)


def screened(method: str, test: Callable[[str], tuple]) -> tuple[tuple, str]:
    """Run `test(solver)` (returning (rho, log10 p, ...)) as `method` prescribes: (its result with the log10 p
    that is reported, solvers used: "lap", "greedy", "greedy+lap" or "greedy, decisive").

    "exact": test("lap"). "fast": test("greedy"); where that gave log10 p < SCREEN_LOG10P, test("lap") unless
    it is already <= DECISIVE_LOG10P, and the p-value of the one reported is raised by `decisive_bound` (the
    module docstring proves that the reported p-value stays valid)."""
    if check_method(method) == "exact":
        return test("lap"), "lap"
    first = test("greedy")
    if not first[1] < SCREEN_LOG10P:  # NaN (skipped) included
        return first, "greedy"
    result, solver = (first, "greedy, decisive") if first[1] <= DECISIVE_LOG10P else (test("lap"), "greedy+lap")
    return (result[0], decisive_bound(result[1]), *result[2:]), solver


def decisive_bound(log10p: float) -> float:
    """log10 f(p) for f(p) = p + min(p, t), t = 10^DECISIVE_LOG10P: what "fast" reports below the screen."""
    return float(log10p + math.log1p(10 ** (min(log10p, DECISIVE_LOG10P) - log10p)) / math.log(10))


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


def read_ahead(fn: Callable[[T], R], items: Iterable[T], ahead: int = 2) -> Iterator[R]:
    """fn(item) for each item, in order, computed in one background thread up to `ahead` items before they are
    asked for: the next layers are read from disk while the current ones are compared (a read waits on the disk,
    not on a core)."""
    items = iter(items)
    with ThreadPoolExecutor(1) as pool:
        pending = deque(pool.submit(fn, item) for item in itertools.islice(items, ahead))
        while pending:
            done = pending.popleft()
            for item in itertools.islice(items, 1):
                pending.append(pool.submit(fn, item))
            yield done.result()
