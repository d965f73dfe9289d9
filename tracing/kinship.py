"""Kinship of two related models: how far apart they are and which one is the parent, from evidence that
survives changes of shape. The family trees (tracing/trees.py) are built from it.

    pa, pb = profile(src_a), profile(src_b)      # what one read of each model keeps (MLP rows, matrix norms, ...)
    k = kinship(pa, pb)
    k["distance"]     # symmetric: mean of d(A->B) and d(B->A) (below)
    k["direction"]    # > 0: A is B's parent, < 0: B is A's; |1000|: from shapes, |<=1|: from the weak signal
    k["why"], k["label"]   # "B's blocks are some of A's: B pruned", "layers pruned"

Distance d(X->Y): each block of X is mapped to the block of Y whose MLP units it finds best (statistics/screen.py);
each MLP up-projection row of X's block is paired with its nearest row (cosine) in Y's block, and d is the RMS of
the row differences over the RMS of the partner rows, averaged over X's blocks. Rows are paired by nearest
neighbour, so the order of units does not matter and a pruned MLP finds its kept rows; a block X has that Y lacks
(dropped by pruning) finds only unrelated rows (d about 1), so the mean of both directions stays small only
between parent and child. The residual stream must be in the same basis (not permuted or rotated).

Direction, strongest first (STRONG: from shapes, which training does not undo):
  vocabulary   sizes differ and the shared ids are the same strings: the larger vocabulary is the child
  depth        every block of the shallower model is one of the deeper model's (screen >= LINED_UP) and not the
               other way round: the shallower is pruned from the deeper; every block of the deeper is one of the
               shallower's: the deeper is up-scaled from it
  widths       the narrower MLP or residual stream is the child (pruned)
  same shapes  a weak vote in [-1, 1] over the matched weight matrices: `norm` (default), the child's Frobenius norm
               is larger (training without weight decay grows norms: Adam's steps are nearly orthogonal to the
               weights); or `kurtosis`, MoTHer's signal (Horwitz et al., ICLR 2025: their code sums the excess
               kurtosis of the square weight matrices and charges an edge whose child has the higher kurtosis,
               i.e. fine-tuning lowers it; for Stable Diffusion they reverse it). Both are measured in
               docs/generated/trees.md; neither is a law.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tracing.arch import mlp
from tracing.shares import block_keys
from tracing.sources import Source
from tracing.statistics import screen
from tracing.statistics.fits import hidden_size, mlp_units, vocab_disagrees

STRONG = 1000.0  # |direction| of evidence from shapes
LINED_UP = 0.8  # screen value above which a block of one model is taken to be a block of the other
WEAK = ("norm", "kurtosis")
CHUNK = 4096  # query rows per cosine product


def _kurtosis(w: torch.Tensor) -> float:
    x = w.double().flatten()
    x = x - x.mean()
    m2 = float(x.square().mean())
    return float(x.pow(4).mean()) / m2 ** 2 - 3.0 if m2 > 0 else 0.0


def profile(src: Source) -> dict[str, Any]:
    """What kinship needs of one model, read once: MLP up rows per block (float32), each block matrix's squared
    norm and excess kurtosis (keyed by its key in the block), widths and vocabulary."""
    spec = src.spec
    rows, norms, kurt = [], [], []
    for i, roles in enumerate(spec.layers):
        w = src.get(roles.up)
        rows.append(spec.neuron_rows(w, roles.up, mlp(i)).float())  # (n_neurons, hidden)
        mats = {local: src.get(key) for local, key in block_keys(src, i).items()}
        norms.append({k: float(v.double().square().sum()) for k, v in mats.items()})
        kurt.append({k: _kurtosis(v) for k, v in mats.items()})
    return {"name": src.name, "source": src, "rows": rows, "norms": norms, "kurtosis": kurt,
            "layers": spec.n_layers, "hidden": hidden_size(src), "mlp": mlp_units(src),
            "vocab": src.shape(spec.embed)[0]}


def _screen(pa: dict, pb: dict) -> np.ndarray:
    """(L_A, L_B): how well each block of B finds its units in each block of A."""
    la, lb = range(pa["layers"]), range(pb["layers"])
    return screen.screen_scores(((i, pa["rows"][i]) for i in la), dict(enumerate(pb["rows"])), list(la), list(lb))


def nearest_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """RMS of (row of x - its nearest row of y by cosine) over the RMS of those rows of y."""
    yn = y / y.norm(dim=1, keepdim=True).clamp_min(1e-30)
    diff = ref = 0.0
    for s in range(0, len(x), CHUNK):
        q = x[s:s + CHUNK]  # (c, d)
        partner = y[(q @ yn.T).argmax(dim=1)]  # (c, d)
        diff += float((q - partner).double().square().sum())
        ref += float(partner.double().square().sum())
    return (diff / ref) ** 0.5 if ref > 0 else float("inf")


def _weak(pa: dict, pb: dict, map_ba: list[int], signal: str) -> float:
    """The vote in [-1, 1] (> 0: A is the parent) over B's blocks' matrices and their mapped blocks of A."""
    table = "norms" if signal == "norm" else "kurtosis"
    votes = []
    for j, i in enumerate(map_ba):
        a, b = pa[table][i], pb[table][j]
        for key in a.keys() & b.keys():
            votes.append(b[key] > a[key] if signal == "norm" else b[key] < a[key])
    return 2 * float(np.mean(votes)) - 1 if votes else 0.0


def _shapes(pa: dict, pb: dict, cover_ab: bool, cover_ba: bool) -> tuple[float, str, str] | None:
    """Direction from shapes: (+-STRONG, why, label) when every shape rule that speaks agrees, (0, why, label) when
    they disagree (a pruned MLP beside an up-scaled depth: neither is the other's parent), None when none speaks."""
    votes: list[tuple[int, str, str]] = []  # (+1: A the parent, -1: B the parent, why, short label)
    if pa["vocab"] != pb["vocab"] and vocab_disagrees(pa["source"], pb["source"]) is None:
        child = "B" if pb["vocab"] > pa["vocab"] else "A"
        votes.append((1 if child == "B" else -1,
                      f"{child}'s vocabulary extends the other's ({pa['vocab']} -> {pb['vocab']} tokens)", "vocab"))
    if pa["layers"] != pb["layers"]:
        deep, shallow = ("A", "B") if pa["layers"] > pb["layers"] else ("B", "A")
        if (cover_ab if deep == "A" else cover_ba):  # every block of the deeper model is one of the shallower's
            votes.append((1 if shallow == "A" else -1, f"{deep}'s blocks are all {shallow}'s: {deep} up-scaled",
                          "up-scaled"))
        elif (cover_ba if deep == "A" else cover_ab):
            votes.append((1 if deep == "A" else -1, f"{shallow}'s blocks are some of {deep}'s: {shallow} pruned",
                          "layers pruned"))
    for what in ("hidden", "mlp"):
        if pa[what] != pb[what]:
            narrow = "B" if pb[what] < pa[what] else "A"
            votes.append((1 if narrow == "B" else -1, f"{narrow}'s {what} width is smaller: {narrow} pruned",
                          f"{what} pruned"))
    if not votes:
        return None
    signs = {v for v, _, _ in votes}
    why, label = "; ".join(w for _, w, _ in votes), ", ".join(x for _, _, x in votes)
    return (STRONG * signs.pop(), why, label) if len(signs) == 1 else (0.0, f"shapes disagree ({why})", "conflict")


def kinship(pa: dict, pb: dict, signal: str = "norm") -> dict[str, Any]:
    """Distance and direction between two profiled models (module docstring); plain data but for no tensors."""
    if signal not in WEAK:
        raise ValueError(f"signal is one of {WEAK}, got {signal}")
    out: dict[str, Any] = {"a": pa["name"], "b": pb["name"], "distance": None, "d_ab": None, "d_ba": None}
    if pa["hidden"] == pb["hidden"]:
        s_ab = _screen(pa, pb)  # (L_A, L_B): B's blocks found in A's
        s_ba = _screen(pb, pa)  # (L_B, L_A)
        map_ba, map_ab = s_ab.argmax(axis=0).tolist(), s_ba.argmax(axis=0).tolist()
        cover_ba = bool((s_ab.max(axis=0) >= LINED_UP).all())  # every block of B is one of A's
        cover_ab = bool((s_ba.max(axis=0) >= LINED_UP).all())
        d_ba = float(np.mean([nearest_distance(pb["rows"][j], pa["rows"][i]) for j, i in enumerate(map_ba)]))
        d_ab = float(np.mean([nearest_distance(pa["rows"][i], pb["rows"][j]) for i, j in enumerate(map_ab)]))
        out.update(distance=(d_ab + d_ba) / 2, d_ab=d_ab, d_ba=d_ba, map_ab=map_ab, map_ba=map_ba,
                   cover_ab=cover_ab, cover_ba=cover_ba)
    else:
        cover_ab = cover_ba = False
        map_ba = None
    strong = _shapes(pa, pb, cover_ab, cover_ba)
    if strong is not None:
        out["direction"], out["why"], out["label"] = strong
    elif map_ba is not None:
        vote = _weak(pa, pb, map_ba, signal)
        out["direction"], out["label"] = vote, f"{signal} {vote:+.2f}"
        out["why"] = f"{signal} vote {vote:+.2f} ({'A' if vote >= 0 else 'B'} the parent)"
    else:
        out["direction"], out["why"], out["label"] = 0.0, "no evidence of direction", "?"
    out["votes"] = {s: _weak(pa, pb, map_ba, s) for s in WEAK} if map_ba is not None else None
    return out
