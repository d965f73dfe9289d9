"""Least-squares shares of one block: y = sum_m w_m x_m + e over a block's weight matrices, with intervals and
p-values that treat each MLP neuron (gate row, up row, down column) and each row of the other matrices as one
unit (tracing/attribution.py explains the model and why).

    sums = block_sums(suspect, j, [(src_a, j), (src_b, j)])   # per-unit X'X, X'y, y'y of block j's matrices
    f = fit(sums)                          # share, se, lo, hi, log10p (per regressor), residual, alone
    f = fit(sums, ci="bootstrap")          # percentile interval over units drawn with replacement

Only the 2-D weights of the block enter (attention and MLP matrices); norm gains and biases are left out: they
sit near a common value (1 or 0) in every model, so one such vector would pull any two models together.
Sums are float64; matrices whose units are rows are read in pieces of rows (statistics/common.row_pieces), a down
projection (neurons are its columns) whole.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special
import torch

from tracing.arch import RESID, mlp
from tracing.sources import Source
from tracing.statistics.common import row_pieces

EPS32 = float(torch.finfo(torch.float32).eps)
Z975 = -float(scipy.special.ndtri(0.025))  # scipy.stats.norm.isf(0.025)
LN10 = math.log(10)


def block_keys(src: Source, i: int) -> dict[str, str]:
    """{key relative to the block: state-dict key} of the 2-D weights of block i of `src`."""
    spec, shapes = src.spec, src.shapes()
    return {spec.local_key(k): k for k, layer in spec.layer_of.items()
            if layer == i and k in shapes and len(shapes[k]) == 2}


def _sums(y: torch.Tensor, xs: list[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """For y (n, d) and the regressors' (n, d): per row X'X (n, k, k), X'y (n, k), y'y (n,), and per column
    X'X (d, k, k), X'y (d, k); float64."""
    y = y.double()
    x = torch.stack([t.double() for t in xs])  # (k, n, d)
    return (torch.einsum("krd,lrd->rkl", x, x).numpy(), torch.einsum("krd,rd->rk", x, y).numpy(),
            y.square().sum(1).numpy(), torch.einsum("krd,lrd->dkl", x, x).numpy(),
            torch.einsum("krd,rd->dk", x, y).numpy())


def _oriented(src: Source, key: str, i: int, w: torch.Tensor) -> tuple[torch.Tensor, str, bool]:
    """`w` as (units, residual dims), the units' name ("mlp" for the MLP neurons of block i: a neuron is a row of
    the gate and up matrices and a column of the down matrix, one unit; else the matrix's key), and whether the
    stored rows are the units."""
    spec = src.spec
    if mlp(i) in spec.axes[key]:
        rows = spec.neuron_rows(w, key, mlp(i))
        return rows.reshape(rows.shape[0], -1), "mlp", spec.axis(key, mlp(i)) == 0
    if spec.axis(key, RESID) == 0:
        return w.T, spec.local_key(key), False
    return w, spec.local_key(key), True


class _Clusters:
    """Sums of the entries of one cluster (an index per cluster name), for the sandwich."""

    def __init__(self, k: int):
        self.index: dict[tuple[str, int], int] = {}
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.k = k

    def add(self, name: str, start: int, *sums: np.ndarray) -> None:
        ids = np.array([self.index.setdefault((name, start + r), len(self.index)) for r in range(len(sums[0]))])
        self.parts.append((ids, *sums))

    def total(self) -> list[np.ndarray]:
        n, k = len(self.index), self.k
        out = [np.zeros((n, k, k)), np.zeros((n, k)), np.zeros(n)][:len(self.parts[0]) - 1]
        for ids, *sums in self.parts:
            for acc, part in zip(out, sums):
                np.add.at(acc, ids, part)
        return out


def block_sums(suspect: Source, j: int, regressors: list[tuple[Source, int]]) -> dict:
    """Sums per cluster of block j of the suspect against block i of each regressor (source, i): xx (U, k, k),
    xy (U, k), yy (U,) over the units (an MLP neuron across the gate, up and down matrices; a row of any other
    matrix, oriented so its residual axis is last), xx_r (D, k, k), xy_r (D, k) over the residual dimensions
    (one is a column of every matrix read from or a row of every matrix written to the residual stream), the
    number of values, `equal`: for each regressor the fraction of values equal to its own bit for bit (TIES and
    DARE leave many at the base's), and `eps`: the suspect's storage precision (the largest machine epsilon of
    its dtypes)."""
    keys = block_keys(suspect, j)
    theirs = [block_keys(src, i) for src, i in regressors]
    units, resid = _Clusters(len(regressors)), _Clusters(len(regressors))
    equal, values, eps = np.zeros(len(regressors)), 0, EPS32
    for local, key in keys.items():
        by_rows = suspect.spec.axis(key, mlp(j)) in (None, 0)  # neurons are not columns: read in pieces of rows
        for rows in row_pieces(suspect.shape(key)) if by_rows else [None]:
            y = suspect.get(key, rows)
            xs = [src.get(blk[local], rows) for (src, _), blk in zip(regressors, theirs)]
            equal += [int((y == x).sum()) for x in xs]
            values += y.numel()
            eps = max(eps, float(torch.finfo(y.dtype).eps)) if y.is_floating_point() else eps
            y_or, name, rows_are_units = _oriented(suspect, key, j, y)  # (n_units, d_resid)
            x_or = [_oriented(src, blk[local], i, x)[0] for (src, i), blk, x in zip(regressors, theirs, xs)]
            uxx, uxy, uyy, rxx, rxy = _sums(y_or, x_or)
            start = 0 if rows is None else rows.start
            has_resid = suspect.spec.axis(key, RESID) is not None
            units.add(name, start if rows_are_units else 0, uxx, uxy, uyy)
            resid.add("resid" if has_resid else local, 0 if rows_are_units else start, rxx, rxy)
    (xx, xy, yy), (xx_r, xy_r) = units.total(), resid.total()
    return {"xx": xx, "xy": xy, "yy": yy, "xx_r": xx_r, "xy_r": xy_r, "values": values,
            "equal": (equal / max(values, 1)).tolist(), "eps": eps}


def fit(sums: dict, ci: str = "sandwich", n_boot: int = 200, seed: int = 0) -> dict:
    """The least-squares shares of one block from its per-unit sums: share, se (cluster-robust over units, floored
    by the rounding of the suspect's storage dtype), lo / hi (95%: share +- 1.96 se, or bootstrap percentiles),
    log10p (two-sided z against zero), residual ||e|| / ||y||, `noise`: the part of that residual rounding to the
    storage dtype explains (eps / sqrt(12), relative), and `alone`: ||y - x_m|| / ||y|| for each regressor."""
    xx, xy, yy = sums["xx"], sums["xy"], sums["yy"]
    units, k = xy.shape
    a, b = xx.sum(0), xy.sum(0)  # (k, k), (k,)
    a_inv = np.linalg.pinv(a)
    w = a_inv @ b
    g = xy - xx @ w  # (U, k): X_u' e_u, the score of unit u
    meat = g.T @ g * units / max(units - k, 1)
    if "xy_r" in sums:  # two-way: + the residual dimensions' scores (the entries' own term not taken off: larger)
        g_r = sums["xy_r"] - sums["xx_r"] @ w  # (D, k)
        meat = meat + g_r.T @ g_r * len(g_r) / max(len(g_r) - k, 1)
    noise = sums.get("eps", EPS32) / math.sqrt(12)  # RMS rounding error relative to a value (uniform in an ulp)
    floor = noise ** 2 * yy.sum() / max(sums["values"], 1)  # variance of one rounding per value
    cov = a_inv @ meat @ a_inv + floor * a_inv
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    z = np.abs(w) / np.maximum(se, 1e-300)
    log10p = np.minimum(0.0, (math.log(2) + scipy.special.log_ndtr(-z)) / LN10)  # norm.logsf(z)
    if ci == "bootstrap":
        counts = np.random.default_rng(seed).multinomial(units, np.full(units, 1.0 / units), size=n_boot)  # (B, U)
        a_boot = (counts @ xx.reshape(units, -1)).reshape(n_boot, k, k)
        w_boot = np.einsum("bkl,bl->bk", np.linalg.pinv(a_boot), counts @ xy)  # (B, k): each resample's shares
        lo, hi = np.percentile(w_boot, [2.5, 97.5], axis=0)
    else:
        lo, hi = w - Z975 * se, w + Z975 * se
    total = yy.sum()
    rss = max(total - 2 * w @ b + w @ a @ w, 0.0)
    alone = [max(total - 2 * b[m] + a[m, m], 0.0) for m in range(k)]
    return {"share": w, "se": se, "lo": lo, "hi": hi, "log10p": log10p,
            "residual": math.sqrt(rss / total) if total > 0 else 0.0, "noise": noise,
            "alone": [math.sqrt(r / total) if total > 0 else 0.0 for r in alone]}
