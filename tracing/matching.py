"""Neuron matching: linear assignment on similarity matrices (float64), for alignment and every matching statistic.

    sim = cosine_matrix(rows_a, rows_b)           # (n, m) similarities of the units of A and B
    cols = match(sim)                             # row i of A <-> column cols[i] of B
    idx = assign(sim)                             # B's units into A's (the rectangular form match statistics use)
    for r in map_in_threads(solve, layers): ...   # per-layer assignments on every core (scipy releases the GIL)
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

T = TypeVar("T")
R = TypeVar("R")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` (n, d) with every row of `b` (m, d): (n, m).

    Norms in float64, the product in float32 (float64 if an input is float64): half the time of a float64
    product on a CPU, far less on most GPUs, and ~1e-7 relative error, far below what moves an assignment.
    """
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32

    def unit(x: torch.Tensor) -> torch.Tensor:  # rows scaled to norm 1
        x = x.double()
        return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)).to(dtype)

    return unit(a) @ unit(b).T


def match(sim: torch.Tensor | np.ndarray) -> np.ndarray:
    """Maximum-similarity assignment. For sim (n, m) with n <= m returns `cols` (n,): row i <-> column cols[i].

    For n > m the roles flip: returns `rows` (m,) such that column j <-> row rows[j].
    Fast path: when every row's best column is distinct, that choice reaches the upper bound (the sum of
    the row maxima) of any assignment, so it is optimal and no linear assignment runs (the usual case for
    related models). Otherwise the float64 cost matrix is negated in place when this function made it, so
    that scipy (which copies to negate for maximize=True) holds no second n x m copy.
    """
    if isinstance(sim, torch.Tensor):
        src = sim.detach().cpu()
        s = src.double().numpy()
        owned = s.ctypes.data != src.data_ptr()  # a converted copy, not the caller's memory
    else:
        s = np.asarray(sim, dtype=np.float64)
        owned = s is not sim
    if s.shape[0] > s.shape[1]:
        s, owned = np.ascontiguousarray(s.T), True
    if not np.isfinite(s).all():
        s, owned = np.nan_to_num(s, nan=-1.0, posinf=1.0, neginf=-1.0, copy=not owned), True
    best = s.argmax(axis=1)  # (n,)
    if np.bincount(best, minlength=s.shape[1]).max() <= 1:  # every column chosen at most once
        return best
    cost = np.negative(s, out=s) if owned else np.negative(s)  # maximise similarity = minimise -similarity
    _, cols = linear_sum_assignment(cost)
    return cols


def assign(sim_ab: torch.Tensor) -> np.ndarray:
    """Match B's units into A's for a similarity (width_A, width_B), width_B <= width_A.

    Returns `idx` (width_B,): unit j of B <-> unit idx[j] of A. Square inputs give a permutation.
    """
    if sim_ab.shape[0] == sim_ab.shape[1]:  # square: match gives A -> B; its inverse is B -> A
        return np.argsort(match(sim_ab))
    return match(sim_ab)  # more rows than columns: one row of A per column of B


def euclid_similarity(gram: torch.Tensor, sq_base: torch.Tensor, sq_ft: torch.Tensor) -> torch.Tensor:
    """-|a_i - b_j|² / 2 = a_i·b_j - |a_i|²/2 - |b_j|²/2 from the Gram matrix (width_A, width_B) and the
    squared norms (width_A,), (width_B,): maximising it minimises the total squared Euclidean distance of
    matched activation vectors (the original's cost). float64."""
    sim = gram.to(torch.float64, copy=True)  # in-place below: no further (width_A, width_B) temporaries
    sim.sub_(sq_base.double()[:, None], alpha=0.5)
    return sim.sub_(sq_ft.double()[None, :], alpha=0.5)


def rank(idx: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of distinct indices (a permutation), so index vectors of a rectangular matching compare."""
    return np.argsort(np.argsort(idx, kind="stable"), kind="stable")


_WORKERS: int | None = None  # set_workers(n): the run's --threads; None: default_workers()


def set_workers(n: int | None) -> None:
    """Threads for per-layer assignments from now on (None: back to default_workers())."""
    global _WORKERS
    _WORKERS = n


def default_workers() -> int:
    """Threads for per-layer assignments: the usable cores, at most 4 (each holds an n x n float64 matrix)."""
    if _WORKERS is not None:
        return _WORKERS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """fn(item) for each item, in order, with up to `workers` calls running at once.

    For per-layer linear assignments: scipy's solver releases the GIL, so threads use every core without
    copying the matrices. Items are pulled in the caller's thread, at most `workers` ahead of the results,
    which bounds the memory held by pending matrices. Default: `default_workers()`.
    """
    workers = workers or default_workers()
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
